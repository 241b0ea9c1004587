//! Measurement 2: the first read of the big file from a local registry, against curl.

use std::sync::Arc;

use anyhow::{Context, ensure};
use estargz::BlobReader;

use crate::curl::{curl_download, push_file};
use crate::layers::Prepared;
use crate::report::{Row, Summary};
use crate::tools::{process_cpu_secs, read_file};
use crate::{Bench, GIB, MIB};

impl Bench<'_> {
    /// 2. Cold read from a local registry against curl downloading the blob.
    pub(crate) fn cold_from_registry(&mut self, big: &Prepared) -> anyhow::Result<()> {
        let reg = testkit::registry::Registry::start(&self.work.join("registry"))?;
        let repo = "bench/big";
        let (digest, size) = push_file(&reg.host, repo, &big.estargz)?;
        let url = format!("http://{}/v2/{repo}/blobs/{digest}", reg.host);
        let want = big.sha256.clone().context("big layer without a digest")?;
        // Warm the registry's own page cache so that neither side pays for its disk.
        let _ = curl_download(&url)?;
        let registry_blob = || -> anyhow::Result<Arc<dyn BlobReader>> {
            let client = registry::Client::new(registry::RegistryConfig::default())?;
            Ok(Arc::new(registry::RemoteBlob::new(
                client,
                registry::Repository::new(reg.host.clone(), repo),
                digest.parse()?,
                size,
            )))
        };
        let mut ours = Vec::new();
        let mut curl = Vec::new();
        let mut fetched = 0;
        let mut cpu_per_gib = Vec::new();
        for i in 0..self.args.repeat + 1 {
            let cache_dir = self.work.join("cache-cold");
            let cache = self.cache(&cache_dir)?;
            let mut m = self.mount(registry_blob()?, &cache, "cold")?;
            // The first (untimed) run also checks the bytes; hashing would slow a
            // timed one.
            let check = i == 0;
            let cpu_before = process_cpu_secs()?;
            let (n, secs, sha) = read_file(&m.mountpoint().join("data/big.bin"), check)?;
            let cpu = process_cpu_secs()? - cpu_before;
            let stats = m.stats();
            m.unmount()?;
            drop(cache);
            std::fs::remove_dir_all(&cache_dir)?;
            if check {
                ensure!(
                    sha.as_deref() == Some(want.as_str()),
                    "cold read: the mounted file's sha256 differs from the generated one"
                );
                eprintln!("  cold read warm-up: bytes verified ({:.1} s)", secs);
                continue;
            }
            fetched = stats.bytes_fetched;
            let (bytes, curl_secs) = curl_download(&url)?;
            ensure!(bytes == size, "curl downloaded {bytes} of {size} bytes");
            ours.push(n as f64 / MIB / secs);
            curl.push(size as f64 / MIB / curl_secs);
            cpu_per_gib.push(cpu / (n as f64 / GIB));
            eprintln!(
                "  cold run {i}: ours {:.0} MiB/s of file ({} range requests), curl {:.0} MiB/s of blob",
                ours[i - 1],
                stats.range_requests,
                curl[i - 1]
            );
        }
        let (o, c) = (Summary::of(&ours), Summary::of(&curl));
        let ratio = o.median / c.median;
        self.rows.push(Row {
            what: format!(
                "cold read, {} MiB file from local docker-registry (eStargz, empty disk cache, no prefetch)",
                self.args.big_mib
            ),
            unit: "MiB/s",
            ours: o,
            baseline: Some((
                "`curl -o /dev/null` of the blob, same registry".into(),
                c,
            )),
            goal: format!("≥ 0.90x curl (ratio {ratio:.2}x)"),
            met: ratio >= 0.9,
        });
        self.notes.push(format!(
            "Cold read: the blob is {size} bytes for a {} MiB file; ours fetched {fetched} \
             bytes per run. Rates are file bytes/s for ours, blob bytes/s for curl. The \
             registry serves from the page cache in both cases (warmed before measuring). \
             This process (fetching, inflating, verifying, caching, serving FUSE, and the \
             reader) used {:.2} CPU-seconds per GiB read (median), on {} cores.",
            self.args.big_mib,
            Summary::of(&cpu_per_gib).median,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ));
        Ok(())
    }
}
