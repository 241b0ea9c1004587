//! Measurement 1: sequential reads of the big file with every chunk in the disk cache.

use std::sync::Arc;

use anyhow::{Context, ensure};

use crate::layers::Prepared;
use crate::mounts::FileBlob;
use crate::report::{Row, Summary};
use crate::tools::{drop_caches, read_file};
use crate::{Bench, MIB};

impl Bench<'_> {
    /// 1. Sequential read with every chunk in the disk cache, page cache dropped.
    pub(crate) fn sequential_warm(&mut self, big: &Prepared) -> anyhow::Result<()> {
        let cache_dir = self.work.join("cache-warm");
        let local = big.extracted.join("data/big.bin");
        let want = big.sha256.clone().context("big layer without a digest")?;
        let mut blobs = vec![("eStargz", big.estargz.clone())];
        if let Some(z) = &big.zstd {
            blobs.push(("zstd:chunked", z.clone()));
        }
        // Fill the disk cache once per format (the decompressed chunks are keyed by
        // their digest, so both formats share them) and check the bytes. Closing the
        // fully read file stores the whole copy that passthrough serves.
        for (name, blob) in &blobs {
            let cache = self.cache(&cache_dir)?;
            let mut m = self.mount_with(FileBlob::open(blob)?, &cache, "fill", true)?;
            let (_, secs, sha) = read_file(&m.mountpoint().join("data/big.bin"), true)?;
            ensure!(
                sha.as_deref() == Some(want.as_str()),
                "{name}: the mounted file's sha256 differs from the generated one"
            );
            eprintln!("  filled the disk cache from {name} in {secs:.1} s; bytes verified");
            let fs = Arc::clone(m.fs());
            m.unmount()?;
            self.rt.block_on(fs.writes_settled());
        }
        let mut disk = Vec::new();
        let mut ours: Vec<Vec<f64>> = vec![Vec::new(); blobs.len()];
        let mut passthrough = Vec::new();
        for i in 0..self.args.repeat {
            // Passthrough right after local disk: both read a file of the same disk, and
            // this disk's speed drifts between seconds, so pairs are compared.
            let cache = self.cache(&cache_dir)?;
            let mut m = self.mount_with(FileBlob::open(&big.estargz)?, &cache, "seq", true)?;
            let path = m.mountpoint().join("data/big.bin");
            if i == 0 {
                // Untimed: hashing would slow the timed read.
                let (_, _, sha) = read_file(&path, true)?;
                ensure!(
                    sha.as_deref() == Some(want.as_str()),
                    "passthrough: the mounted file's sha256 differs from the generated one"
                );
            }
            // Both read once, untimed: this virtual disk is backed by the host's page
            // cache, which makes recently read files several times faster, so the timed
            // pair must start from the same state.
            read_file(&local, false)?;
            read_file(&path, false)?;
            drop_caches()?;
            let (n, secs, _) = read_file(&local, false)?;
            disk.push(n as f64 / MIB / secs);
            drop_caches()?;
            let (n, secs, _) = read_file(&path, false)?;
            let stats = m.stats();
            m.unmount()?;
            ensure!(
                stats.cache_hits + stats.cache_misses == 0,
                "passthrough was not used: the daemon served {} chunk reads",
                stats.cache_hits + stats.cache_misses
            );
            passthrough.push(n as f64 / MIB / secs);
            eprintln!(
                "  seq run {i}: passthrough {:.0} MiB/s{}",
                passthrough[i],
                if i == 0 { " (bytes verified)" } else { "" }
            );
            for (k, (name, blob)) in blobs.iter().enumerate() {
                // A fresh cache index and mount: nothing in our memory cache.
                let cache = self.cache(&cache_dir)?;
                let mut m = self.mount(FileBlob::open(blob)?, &cache, "seq")?;
                drop_caches()?;
                let (n, secs, _) = read_file(&m.mountpoint().join("data/big.bin"), false)?;
                let stats = m.stats();
                m.unmount()?;
                ensure!(
                    stats.range_requests == 0,
                    "{name}: {} range requests although every chunk was cached",
                    stats.range_requests
                );
                ours[k].push(n as f64 / MIB / secs);
                eprintln!(
                    "  seq run {i}: local disk {:.0} MiB/s, {name} {:.0} MiB/s",
                    disk[i], ours[k][i]
                );
            }
        }
        let base = Summary::of(&disk);
        for (k, (name, _)) in blobs.iter().enumerate() {
            let s = Summary::of(&ours[k]);
            let ratio = s.median / base.median;
            self.rows.push(Row {
                what: format!(
                    "sequential read, {} MiB file, {name}, chunks in disk cache, read through the daemon (no passthrough), page cache dropped",
                    self.args.big_mib
                ),
                unit: "MiB/s",
                ours: s,
                baseline: Some(("local disk (ext4), caches dropped".into(), base)),
                goal: format!("≥ 1.00x local disk (ratio {ratio:.2}x)"),
                met: ratio >= 1.0,
            });
        }
        let s = Summary::of(&passthrough);
        let ratio = s.median / base.median;
        let pairs: Vec<f64> = passthrough.iter().zip(&disk).map(|(p, d)| p / d).collect();
        let pair_ratio = Summary::of(&pairs);
        self.rows.push(Row {
            what: format!(
                "sequential read, {} MiB file, whole copy in disk cache (FUSE passthrough), page cache dropped",
                self.args.big_mib
            ),
            unit: "MiB/s",
            ours: s,
            baseline: Some(("local disk (ext4), caches dropped".into(), base)),
            goal: format!(
                "≥ 1.00x local disk (ratio of medians {ratio:.2}x; each read against the local \
                 read just before it: median {:.2}x, {:.2}–{:.2}x)",
                pair_ratio.median, pair_ratio.min, pair_ratio.max
            ),
            met: ratio >= 1.0,
        });
        std::fs::remove_dir_all(&cache_dir)?;
        Ok(())
    }
}
