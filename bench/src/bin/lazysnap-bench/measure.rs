//! One cold start, and what is read around it: the registry's bytes, range requests,
//! the daemon's memory, the floor, and the link itself.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use bench::cold::floor::{self, FloorBytes, LinkRate};
use bench::cold::images::{self, ImageKind};
use bench::cold::memory;
use bench::cold::report::{self, Run};
use bench::cold::{self, Target, oci};

use crate::forms::{Form, Mode};
use crate::node::{Node, OwnNode, PEER_SNAPSHOTTER};
use crate::{Bench, say};

impl Bench {
    /// Range requests of the layers lazysnapd serves, from `lazysnap status`: with the
    /// link's round trip, they say where a lazy run's time goes.
    fn range_requests(&self, root: &Path) -> u64 {
        let mut cmd = Command::new(&self.lazysnap);
        cmd.arg("status").arg("--root").arg(root).arg("--json");
        let Ok(out) = cold::run(cmd, Duration::from_secs(30)) else {
            return 0;
        };
        let status: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        status["layers"].as_array().map_or(0, |ls| {
            ls.iter().filter_map(|l| l["range_requests"].as_u64()).sum()
        })
    }

    /// lazysnapd's access log (`GET /accessed` on ROOT/status.sock).
    fn accessed(&self, root: &Path) -> anyhow::Result<String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--unix-socket"])
            .arg(root.join("status.sock"))
            .arg("http://lazysnapd/accessed");
        cold::run(cmd, Duration::from_secs(30))
    }

    /// The floor's bytes of a lazysnap run of `kind` in `form`: its access log mapped
    /// through the TOCs of the layout the bench pushed.
    fn floor_bytes(&self, kind: ImageKind, form: Form, root: &Path) -> anyhow::Result<FloorBytes> {
        let layout = images::image_dir(&self.args.cache, kind, &self.debian()).join(form.tag());
        let (tocs, meta) = floor::layout_tocs(&layout)?;
        let accessed = floor::parse_accessed(&self.accessed(root)?)?;
        let b = floor::floor_bytes(&tocs, meta, &accessed);
        say(&format!(
            "floor: the reads touched {} compressed ranges, {:.1} MB; TOCs {:.1} MB; \
             manifest and config {} bytes{}",
            b.chunk_count,
            b.chunks as f64 / 1e6,
            b.tocs as f64 / 1e6,
            b.meta,
            if b.unmatched_files > 0 {
                format!(
                    "; {} files of the access log not in the TOCs",
                    b.unmatched_files
                )
            } else {
                String::new()
            }
        ));
        Ok(b)
    }

    /// Measures the link with the biggest layer the registry has of the images and forms
    /// of the run.
    pub(crate) fn measure_link(&self) -> anyhow::Result<LinkRate> {
        let mut best: Option<(ImageKind, String, u64)> = None;
        for (&kind, &form) in self
            .args
            .images
            .iter()
            .flat_map(|k| self.args.forms.iter().map(move |f| (k, f)))
        {
            let dir = images::image_dir(&self.args.cache, kind, &self.debian());
            let layout = dir.join(if form == Form::Gzip {
                "plain"
            } else {
                form.tag()
            });
            let (manifest, _, _) = oci::read_manifest(&layout)?;
            for layer in manifest["layers"].as_array().into_iter().flatten() {
                let (Some(digest), Some(size)) = (layer["digest"].as_str(), layer["size"].as_u64())
                else {
                    continue;
                };
                if best.as_ref().is_none_or(|b| size > b.2) {
                    best = Some((kind, digest.to_string(), size));
                }
            }
        }
        let (kind, digest, size) = best.context("no layer to measure the link with")?;
        let base = format!("http://{}/v2/lsbench/{}", self.registry_host, kind.name());
        floor::measure_link(&base, &digest, size)
    }

    /// Saves lazysnapd's log and access log of a run under `dir/NAME.{log,accessed.json}`,
    /// or the peer's log under `dir/NAME.log`.
    fn keep_logs(&self, dir: &Path, own: &OwnNode, name: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        if let Some(peer) = &own.peer {
            std::fs::write(dir.join(format!("{name}.log")), peer.log())?;
            return Ok(());
        }
        let Some(lazysnapd) = &own.lazysnapd else {
            return Ok(());
        };
        std::fs::write(dir.join(format!("{name}.log")), lazysnapd.log())?;
        let accessed = self.accessed(&own.root)?;
        std::fs::write(dir.join(format!("{name}.accessed.json")), accessed)?;
        Ok(())
    }

    /// One cold start of `kind` in `form`: the full pull onto overlayfs for gzip, else a
    /// lazy pull by `mode`'s snapshotter, on a fresh node.
    pub(crate) fn measure(
        &self,
        kind: ImageKind,
        form: Form,
        mode: Option<Mode>,
        rep: usize,
    ) -> anyhow::Result<Run> {
        let node = self.start_node(mode)?;
        let ctr = self.ctr(&node);
        if matches!(node, Node::External) {
            ctr.clear()?;
        }
        cold::drop_caches()?;
        let log_offset = self
            .registry_log
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        let reference = self.reference(kind, form);
        let snapshotter = mode.map(|m| match m {
            Mode::Lazysnap => self.args.snapshotter.as_str(),
            Mode::StargzSnapshotter => PEER_SNAPSHOTTER,
        });
        let target = Target {
            ctr: &ctr,
            reference: &reference,
            lazy_snapshotter: snapshotter,
            lazysnap: &self.lazysnap,
            plain_http: self.plain_http,
            timeout: Duration::from_secs(self.args.timeout),
        };
        let timing = cold::measure(&target, &format!("lsbench-{}-{}", kind.name(), rep))?;
        let exited = Instant::now();
        let daemon_memory_now = || match &node {
            Node::Own(own) => own.daemon_pid().and_then(memory::of_tree),
            Node::External => None,
        };
        let daemon_memory = daemon_memory_now();
        // The registry logs a request when its response has been sent; give it a moment.
        std::thread::sleep(Duration::from_millis(300));
        let log = self
            .registry_log
            .as_ref()
            .map(|p| cold::log_since(p, log_offset));
        let bytes = log.as_deref().map_or(0, cold::bytes_served);
        let range_requests = match &node {
            Node::Own(own) if own.peer.is_some() => log.as_deref().map_or(0, cold::range_responses),
            Node::Own(own) if own.lazysnapd.is_some() => self.range_requests(&own.root),
            _ => 0,
        };
        if let Node::Own(own) = &node
            && let Some(peer) = &own.peer
        {
            // The image's layers stay mounted until the node goes: its FUSE mounts now.
            say(&format!(
                "stargz-snapshotter: {} FUSE mounts under its root",
                peer.fuse_mounts()
            ));
        }
        let floor = match &node {
            Node::Own(own) if own.lazysnapd.is_some() && form != Form::Gzip => {
                match self.floor_bytes(kind, form, &own.root) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        say(&format!("no floor for this run: {e:#}"));
                        None
                    }
                }
            }
            _ => None,
        };
        // What the daemon keeps once it has nothing to do (the container is gone).
        let daemon_settled_rss = daemon_memory.and_then(|_| {
            std::thread::sleep(SETTLE.saturating_sub(exited.elapsed()));
            daemon_memory_now().map(|m| m.rss)
        });
        let mode_name = mode.map_or(report::OVERLAYFS, Mode::name);
        if let (Some(dir), Node::Own(own), Some(_)) = (&self.args.keep_logs, &node, mode) {
            self.keep_logs(
                dir,
                own,
                &format!("{}-{}-{mode_name}-{rep}", kind.name(), form.tag()),
            )?;
        }
        if matches!(node, Node::External) {
            ctr.clear()?;
        }
        drop(node);
        Ok(Run {
            image: kind.name().to_string(),
            form: form.tag().to_string(),
            mode: mode_name.to_string(),
            rep,
            pull: timing.pull,
            create: timing.create,
            first_line: timing.first_line,
            run: timing.run,
            bytes_served: bytes,
            image_bytes: 0,
            range_requests,
            lazy_layers: timing.lazy_layers,
            last_line: timing.last_line,
            floor,
            daemon_memory,
            daemon_settled_rss,
        })
    }
}

/// How long after a container's exit the daemon's memory is read a second time.
const SETTLE: Duration = Duration::from_secs(3);
