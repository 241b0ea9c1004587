//! One plugin: run for an image (its request on stdin, its answer on stdout, within the
//! timeout), its answers cached, its failures held back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use estargz::lock;
use registry::Credentials;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::config::{PluginSpec, duration_of};
use super::exchange::{Answer, CacheKeyType, GLOBAL_CACHE_KEY, parse_response};
use super::matching::{image_matches, pick_auth, registry_of};

const REQUEST_KIND: &str = "CredentialProviderRequest";

/// A plugin that failed for an image is not run again for it this long: lazy reads of a
/// basic-auth registry ask for credentials on every request, and each would wait out the
/// timeout of a hanging plugin.
pub(super) const FAILURE_BACKOFF: Duration = Duration::from_secs(30);
/// More than any real answer; a plugin printing without end is cut off.
const MAX_RESPONSE_BYTES: u64 = 1 << 20;
const MAX_STDERR_BYTES: u64 = 64 << 10;
/// How much of a failing plugin's stderr reaches the log.
const STDERR_LINES: usize = 3;
const STDERR_LINE_CHARS: usize = 200;

pub(super) type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

struct CachedAnswer {
    expires: Instant,
    auth: Arc<[(String, Credentials)]>,
}

/// One plugin, with its cache.
pub(super) struct Plugin {
    pub(super) spec: PluginSpec,
    pub(super) path: PathBuf,
    /// By image, registry or `global`, as each answer said.
    cache: Mutex<HashMap<String, CachedAnswer>>,
    /// Images the plugin just failed for, and until when it is not run for them again.
    failed: Mutex<HashMap<String, Instant>>,
    /// One run per image at a time; the others wait and take its answer from the cache.
    flights: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Plugin {
    pub(super) fn new(spec: PluginSpec, bin_dir: &Path) -> Self {
        Plugin {
            path: bin_dir.join(&spec.name),
            spec,
            cache: Mutex::default(),
            failed: Mutex::default(),
            flights: Mutex::default(),
        }
    }

    pub(super) fn wants(&self, image: &str) -> bool {
        self.spec
            .match_images
            .iter()
            .any(|pattern| image_matches(pattern, image))
    }

    /// kubelet's lookup order: the image's entry, the registry's, the global one.
    fn cached(&self, image: &str, now: Instant) -> Option<Arc<[(String, Credentials)]>> {
        let cache = lock(&self.cache);
        [image, registry_of(image), GLOBAL_CACHE_KEY]
            .iter()
            .filter_map(|key| cache.get(*key))
            .find(|entry| entry.expires > now)
            .map(|entry| entry.auth.clone())
    }

    fn keep(&self, image: &str, answer: &Answer, now: Instant) {
        let lifetime = match answer.cache_duration {
            Some(nanos) => duration_of(nanos),
            None => self.spec.default_cache_duration,
        };
        if lifetime.is_zero() {
            return;
        }
        let key = match answer.cache_key_type {
            CacheKeyType::Image => image,
            CacheKeyType::Registry => registry_of(image),
            CacheKeyType::Global => GLOBAL_CACHE_KEY,
        };
        let mut cache = lock(&self.cache);
        cache.retain(|_, entry| entry.expires > now);
        cache.insert(
            key.to_string(),
            CachedAnswer {
                expires: now + lifetime,
                auth: answer.auth.clone().into(),
            },
        );
    }

    fn failed_recently(&self, image: &str, now: Instant) -> bool {
        lock(&self.failed)
            .get(image)
            .is_some_and(|until| *until > now)
    }

    pub(super) async fn credentials(
        &self,
        image: &str,
        timeout: Duration,
        clock: &Clock,
    ) -> Option<Credentials> {
        if let Some(auth) = self.cached(image, clock()) {
            return pick_auth(&auth, image);
        }
        let flight = lock(&self.flights)
            .entry(image.to_string())
            .or_default()
            .clone();
        let found = {
            let _running = flight.lock().await;
            self.run_once(image, timeout, clock).await
        };
        let mut flights = lock(&self.flights);
        // Only the map and this call hold it: nobody waits for it any more.
        if Arc::strong_count(&flight) == 2 {
            flights.remove(image);
        }
        found
    }

    /// Runs the plugin unless an answer came meanwhile (another caller's run) or it
    /// failed for this image a moment ago.
    async fn run_once(&self, image: &str, timeout: Duration, clock: &Clock) -> Option<Credentials> {
        if let Some(auth) = self.cached(image, clock()) {
            return pick_auth(&auth, image);
        }
        if self.failed_recently(image, clock()) {
            tracing::debug!(plugin = %self.spec.name, %image, "credential provider plugin failed a moment ago; not run again yet");
            return None;
        }
        let answer = match self.exec(image, timeout).await {
            Ok(answer) => answer,
            Err(why) => {
                tracing::warn!(
                    plugin = %self.spec.name,
                    %image,
                    "kubelet credential provider plugin failed; the other credential sources apply: {why}"
                );
                let mut failed = lock(&self.failed);
                let now = clock();
                failed.retain(|_, until| *until > now);
                failed.insert(image.to_string(), now + FAILURE_BACKOFF);
                return None;
            }
        };
        self.keep(image, &answer, clock());
        let found = pick_auth(&answer.auth, image);
        if found.is_none() {
            tracing::warn!(
                plugin = %self.spec.name,
                %image,
                keys = ?answer.auth.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                "kubelet credential provider plugin answered no credentials for the image; the other credential sources apply"
            );
        } else {
            tracing::info!(plugin = %self.spec.name, %image, "credentials from a kubelet credential provider plugin");
        }
        found
    }

    /// Runs the plugin for `image`: the request on stdin, the answer on stdout. After
    /// `timeout` the plugin and whatever it started are killed.
    async fn exec(&self, image: &str, timeout: Duration) -> Result<Answer, String> {
        let request = serde_json::json!({
            "kind": REQUEST_KIND,
            "apiVersion": self.spec.api_version,
            "image": image,
        })
        .to_string();
        let mut child = tokio::process::Command::new(&self.path)
            .args(&self.spec.args)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // Its own group, so a timeout kills what a script started too.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.path.display()))?;
        let group = child.id();
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let talk = async {
            if let Some(mut stdin) = stdin {
                // A plugin may exit without reading its request (kubelet ignores this too).
                let _ = stdin.write_all(request.as_bytes()).await;
            }
            let mut out = Vec::new();
            let mut err = Vec::new();
            let read_out = async {
                if let Some(s) = stdout {
                    s.take(MAX_RESPONSE_BYTES + 1).read_to_end(&mut out).await?;
                }
                std::io::Result::Ok(())
            };
            let read_err = async {
                if let Some(s) = stderr {
                    s.take(MAX_STDERR_BYTES).read_to_end(&mut err).await?;
                }
                std::io::Result::Ok(())
            };
            let (read_out, read_err) = tokio::join!(read_out, read_err);
            read_out.and(read_err)?;
            let status = child.wait().await?;
            std::io::Result::Ok((status, out, err))
        };
        let (status, out, err) = match tokio::time::timeout(timeout, talk).await {
            Ok(done) => done.map_err(|e| format!("talking to the plugin: {e}"))?,
            Err(_) => {
                if let Some(pid) = group.and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.kill().await;
                return Err(format!("no answer within {timeout:?}; killed"));
            }
        };
        if !status.success() {
            return Err(format!("{status}; stderr: {}", first_lines(&err)));
        }
        if out.len() as u64 > MAX_RESPONSE_BYTES {
            return Err(format!("answered more than {MAX_RESPONSE_BYTES} bytes"));
        }
        parse_response(&out, &self.spec.api_version)
    }
}

/// The start of a plugin's stderr, on one line, for the log.
fn first_lines(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(STDERR_LINES)
        .map(|l| l.chars().take(STDERR_LINE_CHARS).collect())
        .collect();
    if lines.is_empty() {
        "(empty)".into()
    } else {
        lines.join(" | ")
    }
}
