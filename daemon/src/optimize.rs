//! `lazysnap optimize SRC DST`: learns which files an image's command reads and puts
//! them first in its layers, so lazysnapd prefetches them with one request per layer.
//!
//! It converts SRC to DST without priorities, pulls DST lazily through containerd, runs
//! the image's command once in a container (`ctr run`) on lazysnap with a time limit,
//! reads from lazysnapd's own access log (`GET /accessed` on its status socket) which
//! files of DST's layers were opened and when, and converts SRC to DST again with those
//! files prioritized in first-open order. Nothing runs inside the container but its
//! own command.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use converter::cli::ConvertArgs;

use crate::rpull::{LayerOutcome, RpullOptions, rpull};

#[derive(Debug, Clone, clap::Args)]
pub struct OptimizeArgs {
    #[command(flatten)]
    pub convert: ConvertArgs,
    /// containerd's socket.
    #[arg(long, short = 'a', default_value = "/run/containerd/containerd.sock")]
    pub address: PathBuf,
    /// containerd namespace for the run.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// The lazysnap snapshotter's name in containerd's config.
    #[arg(long, default_value = "lazysnap")]
    pub snapshotter: String,
    /// lazysnapd's root (its status socket serves the access log).
    #[arg(long, default_value = crate::config::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Seconds the command may run; then it is killed and what it read so far counts.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// Also write the prioritized paths (first-open order) to this file.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
}

/// What an optimize run learnt.
pub struct Optimized {
    /// Paths in first-open order, across the image's layers.
    pub files: Vec<Prioritized>,
    /// How the command ended: its exit status, or killed at the time limit.
    pub ended: String,
    pub digest: String,
}

fn ctr(args: &OptimizeArgs) -> Command {
    let mut cmd = Command::new("ctr");
    cmd.arg("--address")
        .arg(&args.address)
        .arg("--namespace")
        .arg(&args.namespace);
    cmd
}

/// Runs the image's command in a container on lazysnap; kills it at the time limit.
fn run_once(args: &OptimizeArgs, reference: &str) -> anyhow::Result<String> {
    let id = format!("lazysnap-optimize-{}", std::process::id());
    let mut child = ctr(args)
        .args([
            "run",
            "--rm",
            "--snapshotter",
            &args.snapshotter,
            reference,
            &id,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting ctr run (Debian package containerd)")?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(format!("exited ({status})"));
        }
        if Instant::now() >= deadline {
            let _ = ctr(args)
                .args(["tasks", "kill", "--signal", "SIGKILL", &id])
                .output();
            // `ctr run --rm` then deletes the task and the container itself.
            let status = child.wait()?;
            return Ok(format!(
                "killed at the {} s time limit ({status})",
                args.timeout
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A file the command opened, with the byte ranges it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prioritized {
    pub path: String,
    pub ranges: Vec<[u64; 2]>,
}

impl Prioritized {
    /// Its line in a `--prioritize` list: the path, a tab, the ranges (none for a file
    /// opened and never read, so none of its chunks is marked).
    pub fn list_line(&self) -> String {
        let ranges: Vec<String> = self
            .ranges
            .iter()
            .map(|[s, e]| format!("{s}-{e}"))
            .collect();
        format!("{}\t{}", self.path, ranges.join(","))
    }
}

/// Orders the layers' access records into one list by first open; a path in several
/// layers counts once, at its earliest open, with the ranges read of every copy (the
/// top layer's copy is what the container saw, and the converter prioritizes each copy
/// in its own layer). Every file opened is listed: it goes before the landmark, as
/// `ctr-remote optimize` does, and the ranges say which of its chunks lazysnapd
/// prefetches, so a big library read here and there costs only what was read.
pub fn merge_access(layers: &[crate::observe::LayerAccess]) -> Vec<Prioritized> {
    let mut all: Vec<(u64, &str)> = layers
        .iter()
        .flat_map(|l| l.files.iter())
        .map(|f| (f.first_open_us, f.path.as_str()))
        .collect();
    all.sort();
    let mut ranges: std::collections::HashMap<&str, Vec<[u64; 2]>> = Default::default();
    for f in layers.iter().flat_map(|l| l.files.iter()) {
        ranges.entry(f.path.as_str()).or_default().extend(&f.ranges);
    }
    let mut seen = std::collections::HashSet::new();
    all.into_iter()
        .filter(|(_, p)| seen.insert(*p))
        .map(|(_, p)| {
            let mut r = ranges.remove(p).unwrap_or_default();
            r.sort_unstable();
            let mut merged: Vec<[u64; 2]> = Vec::with_capacity(r.len());
            for [s, e] in r {
                match merged.last_mut() {
                    Some(last) if s <= last[1] => last[1] = last[1].max(e),
                    _ => merged.push([s, e]),
                }
            }
            Prioritized {
                path: p.to_string(),
                ranges: merged,
            }
        })
        .collect()
}

pub fn optimize(
    args: &OptimizeArgs,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Optimized> {
    let dst = args.convert.dst.clone();
    if dst.starts_with("oci:") {
        bail!("optimize runs DST through containerd, so DST must be a registry reference");
    }
    if args.convert.prioritize.is_some() {
        bail!("optimize finds the prioritized files itself; --prioritize does not apply");
    }
    // 1. Without priorities, so that the run sees every file the same way.
    runtime
        .block_on(args.convert.run())
        .with_context(|| format!("converting {} to {dst}", args.convert.src))?;
    // 2. Lazily, onto fresh snapshots of DST's layers.
    let options = RpullOptions {
        address: args.address.clone(),
        namespace: args.namespace.clone(),
        snapshotter: args.snapshotter.clone(),
        plain_http: args.convert.plain_http,
        ..RpullOptions::default()
    };
    let report = runtime
        .block_on(rpull(&dst, &options))
        .with_context(|| format!("pulling {dst} lazily"))?;
    if report
        .layers
        .iter()
        .any(|l| l.outcome == LayerOutcome::Present)
    {
        tracing::warn!(
            "some layers of {dst} were already snapshots: files read through earlier mounts count too"
        );
    }
    let ran = run_once(args, &report.image);
    // 3. What the container opened, from lazysnapd, for DST's layers only.
    let accessed = runtime.block_on(crate::observe::fetch_accessed(&args.root));
    let _ = ctr(args)
        .args(["images", "rm", "--sync", &report.image])
        .output();
    let ended = ran?;
    let digests: Vec<&str> = report.layers.iter().map(|l| l.digest.as_str()).collect();
    let layers: Vec<_> = accessed?
        .into_iter()
        .filter(|l| digests.contains(&l.layer.as_str()))
        .collect();
    if layers.is_empty() {
        bail!(
            "lazysnapd at {} serves no layer of {dst}: was it pulled lazily by that daemon?",
            args.root.display()
        );
    }
    let files = merge_access(&layers);
    // 4. Again, with those files first.
    let list = match &args.record {
        Some(path) => path.clone(),
        None => std::env::temp_dir().join(format!("lazysnap-optimize-{}.list", std::process::id())),
    };
    let mut text = String::new();
    for f in &files {
        text.push_str(&f.list_line());
        text.push('\n');
    }
    std::fs::write(&list, text).with_context(|| format!("writing {}", list.display()))?;
    let mut again = args.convert.clone();
    if again.soci {
        // The layers stay as they are: what was read becomes prefetch artifacts.
        again.soci_prefetch = Some(list.clone());
    } else {
        again.prioritize = Some(list.clone());
    }
    let summary = runtime.block_on(again.run());
    if args.record.is_none() {
        let _ = std::fs::remove_file(&list);
    }
    let summary = summary
        .with_context(|| format!("converting {} to {dst} with priorities", args.convert.src))?;
    Ok(Optimized {
        files,
        ended,
        digest: summary.root.digest.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{AccessedFile, LayerAccess};

    fn layer(files: &[(&str, u64, &[[u64; 2]])]) -> LayerAccess {
        LayerAccess {
            layer: "sha256:x".into(),
            image: "i".into(),
            files: files
                .iter()
                .map(|&(p, t, ranges)| AccessedFile {
                    path: p.to_string(),
                    first_open_us: t,
                    read_bytes: ranges.iter().map(|[s, e]| e - s).sum(),
                    size: 1 << 20,
                    ranges: ranges.to_vec(),
                })
                .collect(),
        }
    }

    #[test]
    fn access_logs_merge_by_first_open_across_layers_with_their_ranges() {
        let merged = merge_access(&[
            layer(&[
                ("usr/bin/python3", 10, &[[0, 4096]]),
                ("usr/lib/libz.so", 30, &[[8192, 9000]]),
            ]),
            layer(&[
                ("etc/ld.so.cache", 20, &[]),
                ("usr/lib/libz.so", 25, &[[0, 100], [9000, 12000]]),
            ]),
        ]);
        let paths: Vec<&str> = merged.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["usr/bin/python3", "etc/ld.so.cache", "usr/lib/libz.so"]
        );
        assert_eq!(merged[2].ranges, [[0, 100], [8192, 12000]]);
        let lines: Vec<String> = merged.iter().map(Prioritized::list_line).collect();
        assert_eq!(
            lines,
            [
                "usr/bin/python3\t0-4096",
                "etc/ld.so.cache\t",
                "usr/lib/libz.so\t0-100,8192-12000"
            ]
        );
    }
}
