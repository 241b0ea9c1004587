//! Measurement 4: memory per mounted layer, read in a fresh child process (the probe).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use estargz::Layer;
use fusefs::{CacheConfig, FsConfig, SharedCache};

use crate::layers::Prepared;
use crate::mounts::{FileBlob, UnmountAll};
use crate::report::{Row, Summary};
use crate::tools::{find_walk, vm_rss_kib};
use crate::{Args, Bench, MIB};

impl Bench<'_> {
    /// 4. RSS per mounted 100,000-entry layer, measured by a child process.
    pub(crate) fn rss(&mut self, small: &Prepared) -> anyhow::Result<()> {
        // Not `current_exe()`: if the binary is rebuilt during a run, only this path still
        // names the running one.
        let exe = Path::new("/proc/self/exe");
        let mut per_layer = Vec::new();
        let mut last = String::new();
        for i in 0..self.args.repeat {
            let mut probe = Command::new(exe);
            probe
                .arg("--rss-child")
                .arg(&small.estargz)
                .arg("--rss-mounts")
                .arg(self.args.rss_mounts.to_string())
                .arg("--work-dir")
                .arg(self.work.join(format!("rss{i}")));
            if let Some(n) = self.args.fuse_threads {
                probe.arg("--fuse-threads").arg(n.to_string());
            }
            let out = probe
                .stderr(Stdio::inherit())
                .output()
                .context("running the RSS probe")?;
            ensure!(
                out.status.success(),
                "the RSS probe failed ({})",
                out.status
            );
            let text = String::from_utf8(out.stdout)?;
            let nums: Vec<u64> = text
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("RSS probe output {text:?}"))?;
            let [before, mounted, walked, entries] = nums[..] else {
                bail!("RSS probe output {text:?}");
            };
            let n = self.args.rss_mounts as f64;
            let per = walked.saturating_sub(before) as f64 / 1024.0 / n;
            per_layer.push(per);
            last = format!(
                "RSS probe: VmRSS {before} KiB before mounting, {mounted} KiB after mounting \
                 {} copies of the small layer, {walked} KiB after walking all {entries} \
                 entries of each (last run).",
                self.args.rss_mounts
            );
            eprintln!("  rss run {i}: {per:.1} MiB per layer ({text})");
        }
        self.notes.push(last);
        let s = Summary::of(&per_layer);
        self.rows.push(Row {
            what: format!(
                "daemon RSS per mounted {}-entry layer, after a full walk ({} mounts)",
                self.args.entries, self.args.rss_mounts
            ),
            unit: "MiB",
            ours: s,
            baseline: None,
            goal: "< 30 MB (28.6 MiB)".into(),
            met: s.median * MIB < 30e6,
        });
        Ok(())
    }
}

/// The RSS probe: a fresh process that mounts `--rss-mounts` copies of the blob,
/// walks each with `find` (a separate process, so the walker's memory is not ours) and
/// prints `VmRSS before, after mounting, after walking (KiB)` and the entries walked.
pub(crate) fn rss_child(blob: &Path, args: &Args) -> anyhow::Result<()> {
    let work = &args.work_dir;
    std::fs::create_dir_all(work)?;
    let _unmount_all = UnmountAll(work.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cache = SharedCache::open(CacheConfig::new(work.join("cache")))?;
    let before = vm_rss_kib()?;
    let mut mounts = Vec::new();
    for i in 0..args.rss_mounts {
        let layer = rt
            .block_on(Layer::open(FileBlob::open(blob)?, &Default::default()))
            .context("opening the layer")?;
        let mp = work.join(format!("m{i}"));
        std::fs::create_dir_all(&mp)?;
        let mut config = FsConfig {
            prefetch: false,
            background_fetch: false,
            ..FsConfig::default()
        };
        if let Some(n) = args.fuse_threads {
            config.fuse_threads = n;
        }
        mounts.push(fusefs::mount(
            Arc::new(layer),
            &mp,
            None,
            &fusefs::Backing::new(cache.clone(), rt.handle().clone(), &config),
            config,
        )?);
    }
    let mounted = vm_rss_kib()?;
    let mut entries = 0;
    for m in &mounts {
        entries = find_walk(m.mountpoint())?.0;
    }
    let walked = vm_rss_kib()?;
    println!("{before} {mounted} {walked} {entries}");
    for mut m in mounts {
        m.unmount()?;
    }
    std::fs::remove_dir_all(work)?;
    Ok(())
}
