//! fs-bench: the lazy filesystem (`fusefs`) through the kernel against local baselines
//! measured in the same run (issue 5, item 8).
//!
//! Layers, all generated from one seed:
//! - `big`: one file of random bytes (1 GiB by default), so compression cannot flatter
//!   us, converted to eStargz and zstd:chunked;
//! - `small`: 100,000 small entries (files of varied sizes and kinds, directories,
//!   symlinks) converted to eStargz.
//!
//! Measurements, each repeated, ours and the baseline alternating so that both see the
//! same noise (the machine is shared with compilers):
//! 1. sequential read of the big file through a mount whose chunks are all in the disk
//!    cache, page cache dropped, against reading the same bytes extracted by GNU tar to
//!    a file on the same filesystem, caches dropped;
//! 2. first (cold) read of the big file from a local docker-registry through
//!    `registry::RemoteBlob` (empty disk cache, no prefetch or background fetch), against
//!    `curl -o /dev/null` of the same blob from the same registry;
//! 3. `find` printing stat fields of all entries of the small layer, first walk (fresh
//!    mount, caches dropped) and second walk, against the extracted tree under overlayfs;
//! 4. VmRSS per mounted 100,000-entry layer, in a child process of this binary that
//!    mounts several copies and walks them (a fresh process, so that memory freed by
//!    earlier phases cannot hide the mounts' cost).
//! 5. `ls -l` against `ls -f` of one directory of 1,000,000 empty files (a layer whose
//!    TOC is written directly: converting a tar of a million files would take longer
//!    than the measurement), each on a fresh mount with caches dropped.
//!
//! Needs root (FUSE and overlay mounts, drop_caches), `tar`, `find`, `curl` and
//! `docker-registry`. Prints a Markdown table and writes it to `--out`.

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use estargz::{BlobError, BlobErrorKind, BlobFuture, BlobReader, Layer, OutputFormat};
use fusefs::{CacheConfig, FsConfig, MountedLayer, SharedCache};
use sha2::{Digest as _, Sha256};

#[derive(Parser, Debug)]
#[command(about = "lazysnap's FUSE filesystem against local disk, curl and overlayfs")]
struct Args {
    /// Seed of all generated data: the same seed gives the same bytes.
    #[arg(long, default_value_t = 5)]
    seed: u64,
    /// Repetitions of each measurement (ours and baseline alternate).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Size of the big file in MiB.
    #[arg(long, default_value_t = 1024)]
    big_mib: u64,
    /// Entries of the small-files layer (files, directories and symlinks together).
    #[arg(long, default_value_t = 100_000)]
    entries: usize,
    /// Copies of the small layer mounted at once for the RSS measurement.
    #[arg(long, default_value_t = 3)]
    rss_mounts: usize,
    /// Where the data, caches, registry and mounts live: must be on the same disk
    /// filesystem as the baselines (not tmpfs). A fresh directory is made inside it and
    /// removed at the end.
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// The Markdown report.
    #[arg(long, default_value = "bench/results/fs.md")]
    out: PathBuf,
    /// The kernel's read-ahead on the mounts, in KiB (default: lazysnapd's).
    #[arg(long)]
    kernel_readahead_kb: Option<u32>,
    /// Entries of the one directory of the wide layer (measurement 5).
    #[arg(long, default_value_t = 1_000_000)]
    wide_entries: usize,
    /// FUSE threads per mount (default: lazysnapd's).
    #[arg(long)]
    fuse_threads: Option<usize>,
    /// Skip measurements: any of seq, cold, walk, rss, wide.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Internal: run as the RSS probe over this blob (see `rss_child`).
    #[arg(long, hide = true)]
    rss_child: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(blob) = &args.rss_child {
        return rss_child(blob, &args);
    }
    ensure!(
        testkit::is_root(),
        "fs-bench needs root: FUSE and overlay mounts and /proc/sys/vm/drop_caches"
    );
    for (program, package) in [
        ("tar", "tar"),
        ("find", "findutils"),
        ("curl", "curl"),
        ("docker-registry", "docker-registry"),
    ] {
        testkit::require_program(program, package)?;
    }
    ensure!(args.repeat > 0 && args.rss_mounts > 0 && args.big_mib > 0);
    let scratch = tempfile::Builder::new()
        .prefix("lazysnap-fs-bench.")
        .tempdir_in(&args.work_dir)
        .with_context(|| format!("creating a work directory in {}", args.work_dir.display()))?;
    // Declared after `scratch`, so it runs first: whatever a failure left mounted under
    // the work directory is detached before the directory is removed.
    let _unmount_all = UnmountAll(scratch.path().to_path_buf());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut bench = Bench {
        args: &args,
        work: scratch.path().to_path_buf(),
        rt,
        rows: Vec::new(),
        notes: Vec::new(),
    };
    bench.run()?;
    let report = bench.report();
    println!("{report}");
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &report)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    // Explicitly, so that a work directory left behind is an error, not silence.
    drop(bench);
    drop(_unmount_all);
    let path = scratch.path().to_path_buf();
    scratch
        .close()
        .with_context(|| format!("removing the work directory {}", path.display()))
}

struct Bench<'a> {
    args: &'a Args,
    work: PathBuf,
    rt: tokio::runtime::Runtime,
    rows: Vec<Row>,
    notes: Vec<String>,
}

/// One line of the report.
struct Row {
    what: String,
    unit: &'static str,
    ours: Summary,
    baseline: Option<(String, Summary)>,
    /// Human-readable goal and whether it was met.
    goal: String,
    met: bool,
}

/// Median and range of repeated measurements.
#[derive(Clone, Copy, Debug)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

impl Summary {
    fn of(values: &[f64]) -> Summary {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Summary {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }

    fn show(&self) -> String {
        format!(
            "{} ({}–{})",
            fmt_num(self.median),
            fmt_num(self.min),
            fmt_num(self.max)
        )
    }
}

fn fmt_num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

impl Bench<'_> {
    fn skipped(&self, what: &str) -> bool {
        self.args.skip.iter().any(|s| s == what)
    }

    fn run(&mut self) -> anyhow::Result<()> {
        let need_big = !self.skipped("seq") || !self.skipped("cold");
        let need_small = !self.skipped("walk") || !self.skipped("rss");
        if need_big {
            let big = self.prepare_big()?;
            if !self.skipped("seq") {
                self.sequential_warm(&big)?;
            }
            if !self.skipped("cold") {
                self.cold_from_registry(&big)?;
            }
        }
        if need_small {
            let small = self.prepare_small()?;
            if !self.skipped("walk") {
                self.walks(&small)?;
            }
            if !self.skipped("rss") {
                self.rss(&small)?;
            }
        }
        if !self.skipped("wide") {
            self.wide_listing()?;
        }
        Ok(())
    }

    fn cache(&self, dir: &Path) -> anyhow::Result<SharedCache> {
        Ok(SharedCache::open(CacheConfig::new(dir))?)
    }

    /// Opens `blob` and mounts it at a fresh directory `name` under the work dir, with
    /// neither prefetch nor background fetch: we measure what a reader causes.
    fn mount(
        &self,
        blob: Arc<dyn BlobReader>,
        cache: &SharedCache,
        name: &str,
    ) -> anyhow::Result<MountedLayer> {
        self.mount_with(blob, cache, name, false)
    }

    /// A mount with FUSE passthrough on or off (off: every read goes through us).
    fn mount_with(
        &self,
        blob: Arc<dyn BlobReader>,
        cache: &SharedCache,
        name: &str,
        passthrough: bool,
    ) -> anyhow::Result<MountedLayer> {
        let layer = self
            .rt
            .block_on(Layer::open(blob, &Default::default()))
            .context("opening the layer")?;
        let mp = self.work.join("mnt").join(name);
        std::fs::create_dir_all(&mp)?;
        let mut config = FsConfig {
            prefetch: false,
            background_fetch: false,
            passthrough,
            ..FsConfig::default()
        };
        if let Some(n) = self.args.fuse_threads {
            config.fuse_threads = n;
        }
        if let Some(kb) = self.args.kernel_readahead_kb {
            config.kernel_readahead = kb * 1024;
        }
        let mounted = fusefs::mount(
            Arc::new(layer),
            &mp,
            None,
            &fusefs::Backing::new(cache.clone(), self.rt.handle().clone(), &config),
            config,
        )
        .with_context(|| format!("mounting at {}", mp.display()))?;
        Ok(mounted)
    }
}

// ---------------------------------------------------------------------------------
// Data

/// SplitMix64: tiny and fully specified, so a seed names the same bytes forever.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for piece in buf.chunks_mut(8) {
            let b = self.next_u64().to_le_bytes();
            piece.copy_from_slice(&b[..piece.len()]);
        }
    }
}

/// A converted layer and the tree GNU tar extracts from the same tar.
struct Prepared {
    /// eStargz blob, and zstd:chunked blob when made.
    estargz: PathBuf,
    zstd: Option<PathBuf>,
    /// The tree `tar -x` produced (the baseline's bytes).
    extracted: PathBuf,
    /// sha256 of the big file (big layer only).
    sha256: Option<String>,
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Tars `src` (GNU tar, posix format as image builders write), extracts it to
/// `extracted` (the baseline), converts it, and removes the source tree and the tar.
fn tar_convert_extract(
    src: &Path,
    dir: &Path,
    formats: &[OutputFormat],
) -> anyhow::Result<(Vec<PathBuf>, PathBuf)> {
    let tar = dir.join("layer.tar");
    run_ok(
        Command::new("tar")
            // Fixed mtimes, so that the seed alone names the blobs.
            .args([
                "--format=posix",
                "--numeric-owner",
                "--sort=name",
                "--mtime=@1577836800",
                "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
                "-C",
            ])
            .arg(src)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    )?;
    std::fs::remove_dir_all(src)?;
    let extracted = dir.join("extracted");
    std::fs::create_dir_all(&extracted)?;
    run_ok(
        Command::new("tar")
            .args(["--numeric-owner", "-xpf"])
            .arg(&tar)
            .arg("-C")
            .arg(&extracted),
    )?;
    let mut blobs = Vec::new();
    for format in formats {
        let name = match format {
            OutputFormat::Estargz => "layer.estargz",
            _ => "layer.zstd-chunked",
        };
        let path = dir.join(name);
        let t = Instant::now();
        let input = std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(&tar).with_context(|| format!("opening {}", tar.display()))?,
        );
        let output = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
        let opts = estargz::WriterOptions {
            format: *format,
            ..Default::default()
        };
        let out = estargz::convert(input, output, &opts)
            .with_context(|| format!("converting {} to {format:?}", tar.display()))?;
        eprintln!(
            "  {format:?}: {} bytes in {:.1} s",
            out.blob_size,
            t.elapsed().as_secs_f64()
        );
        blobs.push(path);
    }
    std::fs::remove_file(&tar)?;
    Ok((blobs, extracted))
}

impl Bench<'_> {
    fn prepare_big(&self) -> anyhow::Result<Prepared> {
        let size = self.args.big_mib << 20;
        eprintln!("generating the big layer ({} MiB)", self.args.big_mib);
        let dir = self.work.join("big");
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("data"))?;
        let mut rng = Rng(self.args.seed);
        let mut f = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(src.join("data/big.bin"))?,
        );
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            hasher.update(&buf[..n]);
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let (blobs, extracted) = tar_convert_extract(
            &src,
            &dir,
            &[OutputFormat::Estargz, OutputFormat::ZstdChunked],
        )?;
        Ok(Prepared {
            estargz: blobs[0].clone(),
            zstd: Some(blobs[1].clone()),
            extracted,
            sha256: Some(format!("{:x}", hasher.finalize())),
        })
    }

    /// A Debian-like tree of `entries` entries: directories of 50-200 entries, files
    /// from empty to 64 KiB (log-uniform, so most are a few KiB as in /usr), text-like
    /// and random contents, and some symlinks.
    fn prepare_small(&self) -> anyhow::Result<Prepared> {
        let total = self.args.entries;
        eprintln!("generating the small-files layer ({total} entries)");
        let dir = self.work.join("small");
        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        let mut rng = Rng(self.args.seed ^ 0x5111_a11f_11e5);
        const WORDS: &[&str] = &[
            "import",
            "def",
            "return",
            "self",
            "static",
            "const",
            "int",
            "if",
            "else",
            "struct",
            "usr",
            "lib",
            "python3",
            "debian",
            "copyright",
            "license",
            "the",
        ];
        let mut made = 1; // the root
        let mut dirs: Vec<PathBuf> = vec![src.clone()];
        let mut d = 0usize;
        let mut content = Vec::new();
        while made < total {
            // A new directory under a random existing one, then its entries.
            let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
            let here = parent.join(format!("d{d}"));
            d += 1;
            std::fs::create_dir(&here)?;
            dirs.push(here.clone());
            made += 1;
            let n = (50 + rng.below(150) as usize).min(total - made);
            for i in 0..n {
                let roll = rng.below(100);
                let path = here.join(format!("f{i}.{}", ["py", "so", "h", "txt"][i % 4]));
                if roll < 5 && i > 0 {
                    std::os::unix::fs::symlink(format!("f{}.py", (i - 1) & !3), &path)?;
                } else {
                    let size = log_uniform(&mut rng, 64 << 10);
                    content.clear();
                    if roll < 60 {
                        while content.len() < size {
                            let w = WORDS[rng.below(WORDS.len() as u64) as usize];
                            content.extend_from_slice(w.as_bytes());
                            content.push(if rng.below(8) == 0 { b'\n' } else { b' ' });
                        }
                        content.truncate(size);
                    } else {
                        content.resize(size, 0);
                        rng.fill(&mut content);
                    }
                    std::fs::write(&path, &content)?;
                }
                made += 1;
            }
        }
        let (blobs, extracted) = tar_convert_extract(&src, &dir, &[OutputFormat::Estargz])?;
        Ok(Prepared {
            estargz: blobs[0].clone(),
            zstd: None,
            extracted,
            sha256: None,
        })
    }
}

/// Log-uniform in `0..=hi`, with a tenth of the files empty.
fn log_uniform(rng: &mut Rng, hi: u64) -> usize {
    if rng.below(10) == 0 {
        return 0;
    }
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ((hi as f64).ln() * u).exp() as usize
}

/// A local file as a blob (positioned reads), so the layer is not held in memory.
struct FileBlob {
    file: std::fs::File,
    size: u64,
}

impl FileBlob {
    fn open(path: &Path) -> anyhow::Result<Arc<dyn BlobReader>> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata()?.len();
        Ok(Arc::new(FileBlob { file, size }))
    }
}

impl BlobReader for FileBlob {
    fn size(&self) -> BlobFuture<'_, u64> {
        let size = self.size;
        Box::pin(async move { Ok(size) })
    }

    fn read_at(&self, offset: u64, len: u64) -> BlobFuture<'_, Bytes> {
        let end = offset.saturating_add(len).min(self.size);
        let result = if offset > self.size {
            Err(BlobError::new(
                BlobErrorKind::OutOfRange,
                "read past the end",
            ))
        } else {
            let mut buf = vec![0u8; (end - offset) as usize];
            self.file
                .read_exact_at(&mut buf, offset)
                .map(|()| Bytes::from(buf))
                .map_err(|e| BlobError::new(BlobErrorKind::Transient, e.to_string()))
        };
        Box::pin(async move { result })
    }
}

// ---------------------------------------------------------------------------------
// Helpers for measuring

fn drop_caches() -> anyhow::Result<()> {
    // Dirty pages cannot be dropped: write them out first.
    run_ok(&mut Command::new("sync"))?;
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("writing /proc/sys/vm/drop_caches")
}

/// Reads `path` front to back with 1 MiB reads; returns (bytes, seconds, sha256 when
/// asked).
fn read_file(path: &Path, hash: bool) -> anyhow::Result<(u64, f64, Option<String>)> {
    let t = Instant::now();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let mut hasher = hash.then(Sha256::new);
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {} at {total}", path.display()))?;
        if n == 0 {
            break;
        }
        if let Some(h) = hasher.as_mut() {
            h.update(&buf[..n]);
        }
        total += n as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok((total, secs, hasher.map(|h| format!("{:x}", h.finalize()))))
}

/// `find ROOT -printf` with fields that need an lstat of every entry; returns (entries,
/// seconds).
fn find_walk(root: &Path) -> anyhow::Result<(usize, f64)> {
    let t = Instant::now();
    let mut child = Command::new("find")
        .arg(root)
        .args(["-printf", "%i %s %m %U %T@\\n"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running find")?;
    let stdout = child.stdout.take().context("find's stdout")?;
    let mut lines = 0;
    for line in std::io::BufReader::new(stdout).split(b'\n') {
        line?;
        lines += 1;
    }
    let out = child.wait_with_output()?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "find {} failed: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((lines, secs))
}

/// `ls FLAG DIR` in the C locale, output counted and dropped; returns (lines, seconds).
fn ls(dir: &Path, flag: &str) -> anyhow::Result<(usize, f64)> {
    let t = Instant::now();
    let out = Command::new("ls")
        .arg(flag)
        .arg(dir)
        .env("LC_ALL", "C")
        .stderr(Stdio::piped())
        .output()
        .context("running ls")?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "ls {flag} {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((out.stdout.split(|&b| b == b'\n').count() - 1, secs))
}

/// User plus system CPU time of this process so far, all threads.
fn process_cpu_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').context("odd /proc/self/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on every Linux architecture we run on.
    Ok(ticks / 100.0)
}

fn vm_rss_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/self/status")
}

/// An overlayfs mount (the snapshotter's fallback path), unmounted on drop.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(lower: &Path, dir: &Path) -> anyhow::Result<Overlay> {
        let (upper, workdir, mp) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
        for d in [&upper, &workdir, &mp] {
            std::fs::create_dir_all(d)?;
        }
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.display(),
                    upper.display(),
                    workdir.display()
                ))
                .arg(&mp),
        )?;
        Ok(Overlay(mp))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(e) = run_ok(Command::new("umount").arg(&self.0)) {
            eprintln!("warning: {e}; detaching");
            testkit::containerd::unmount_detach(&self.0);
        }
    }
}

/// Detaches everything still mounted under the work directory (after an error).
struct UnmountAll(PathBuf);

impl Drop for UnmountAll {
    fn drop(&mut self) {
        for m in testkit::containerd::mounts_under(&self.0).into_iter().rev() {
            eprintln!("detaching leftover mount {}", m.display());
            testkit::containerd::unmount_detach(&m);
        }
    }
}

// ---------------------------------------------------------------------------------
// The measurements

impl Bench<'_> {
    /// 1. Sequential read with every chunk in the disk cache, page cache dropped.
    fn sequential_warm(&mut self, big: &Prepared) -> anyhow::Result<()> {
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

    /// 2. Cold read from a local registry against curl downloading the blob.
    fn cold_from_registry(&mut self, big: &Prepared) -> anyhow::Result<()> {
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

    /// 3. find + stat, first and second walk, against overlayfs over the extracted tree.
    fn walks(&mut self, small: &Prepared) -> anyhow::Result<()> {
        let cache_dir = self.work.join("cache-walk");
        let mut first = (Vec::new(), Vec::new());
        let mut second = (Vec::new(), Vec::new());
        let mut entries = 0;
        for i in 0..self.args.repeat {
            let ov = Overlay::mount(&small.extracted, &self.work.join(format!("overlay{i}")))?;
            drop_caches()?;
            let (n1, s1) = find_walk(&ov.0)?;
            let (n2, s2) = find_walk(&ov.0)?;
            drop(ov);
            ensure!(n1 == n2, "overlay walks saw {n1} then {n2} entries");
            entries = n1;
            first.1.push(s1);
            second.1.push(s2);

            let cache = self.cache(&cache_dir)?;
            let mut m = self.mount(FileBlob::open(&small.estargz)?, &cache, "walk")?;
            drop_caches()?;
            let (m1, t1) = find_walk(m.mountpoint())?;
            let (m2, t2) = find_walk(m.mountpoint())?;
            m.unmount()?;
            ensure!(
                m1 == n1 && m2 == n1,
                "the mount showed {m1} then {m2} entries, the extracted tree {n1}"
            );
            first.0.push(t1);
            second.0.push(t2);
            eprintln!(
                "  walk run {i}: {n1} entries; overlay {s1:.3} s / {s2:.3} s, ours {t1:.3} s / {t2:.3} s"
            );
        }
        for (label, (ours, base), limit) in [("first", first, 3.0), ("second", second, 1.5)] {
            let (o, b) = (Summary::of(&ours), Summary::of(&base));
            let ratio = o.median / b.median;
            self.rows.push(Row {
                what: format!(
                    "`find -printf` (lstat) of all {entries} entries, {label} walk{}",
                    if label == "first" {
                        " (fresh mount, caches dropped)"
                    } else {
                        ""
                    }
                ),
                unit: "s",
                ours: o,
                baseline: Some(("same tree on overlayfs (ext4 lower)".into(), b)),
                goal: format!("≤ {limit}x overlayfs (ratio {ratio:.2}x)"),
                met: ratio <= limit,
            });
        }
        Ok(())
    }

    /// 5. `ls -l` of one directory with a million entries, against `ls -l` of the same
    ///    names on overlayfs (what the full pull gives) and against `ls -f` on our mount.
    fn wide_listing(&mut self) -> anyhow::Result<()> {
        let n = self.args.wide_entries;
        let mut toc = String::with_capacity(n * 64);
        toc.push_str(r#"{"version":1,"entries":[{"name":"wide/","type":"dir","mode":493}"#);
        for i in 0..n {
            toc.push_str(&format!(
                r#",{{"name":"wide/f{i:07}","type":"reg","size":0,"mode":420}}"#
            ));
        }
        toc.push_str("]}");
        let (blob, _, _) = testkit::image::estargz_of_toc(toc.as_bytes())?;
        drop(toc);
        let path = self.work.join("wide.esgz");
        std::fs::write(&path, blob)?;
        let lower = self.work.join("wide-extracted");
        std::fs::create_dir_all(lower.join("wide"))?;
        for i in 0..n {
            std::fs::File::create(lower.join(format!("wide/f{i:07}")))?;
        }
        let cache_dir = self.work.join("cache-wide");
        let (mut short, mut long) = (Vec::new(), Vec::new());
        let (mut overlay, mut overlay_short) = (Vec::new(), Vec::new());
        let mut served = String::new();
        for i in 0..self.args.repeat {
            let ov = Overlay::mount(&lower, &self.work.join(format!("overlay-wide{i}")))?;
            drop_caches()?;
            let (lines, base) = ls(&ov.0.join("wide"), "-l")?;
            drop(ov);
            ensure!(lines == n + 1, "ls -l on overlayfs listed {lines} lines");
            let ov = Overlay::mount(&lower, &self.work.join(format!("overlay-wide-f{i}")))?;
            drop_caches()?;
            overlay_short.push(ls(&ov.0.join("wide"), "-f")?.1);
            drop(ov);
            let mut times = [0.0; 2];
            for (slot, flag) in [(0, "-f"), (1, "-l")] {
                let cache = self.cache(&cache_dir)?;
                let mut m = self.mount(FileBlob::open(&path)?, &cache, "wide")?;
                drop_caches()?;
                let (lines, secs) = ls(&m.mountpoint().join("wide"), flag)?;
                // `ls -f` adds . and ..; `ls -l` a total line.
                ensure!(
                    lines == n + 1 + (flag == "-f") as usize,
                    "ls {flag} listed {lines} lines"
                );
                if flag == "-l" {
                    served = m
                        .stats()
                        .op_latency
                        .iter()
                        .filter(|h| h.count > 0)
                        .map(|h| format!("{} {}", h.op, h.count))
                        .collect::<Vec<_>>()
                        .join(", ");
                }
                m.unmount()?;
                times[slot] = secs;
            }
            eprintln!(
                "  wide run {i}: ours ls -f {:.3} s, ls -l {:.3} s; overlayfs ls -l {base:.3} s; \
                 requests during ls -l: {served}",
                times[0], times[1]
            );
            short.push(times[0]);
            long.push(times[1]);
            overlay.push(base);
        }
        let (o, b, f) = (
            Summary::of(&long),
            Summary::of(&overlay),
            Summary::of(&short),
        );
        let ratio = o.median / b.median;
        let what = format!("`ls -l` of one directory of {n} entries (fresh mount, caches dropped)");
        self.rows.push(Row {
            what: what.clone(),
            unit: "s",
            ours: o,
            baseline: Some((
                "`ls -l` of the same names on overlayfs (ext4 lower), caches dropped".into(),
                b,
            )),
            goal: format!("≤ 3x overlayfs (ratio {ratio:.2}x)"),
            met: ratio <= 3.0,
        });
        let ratio = o.median / f.median;
        self.rows.push(Row {
            what,
            unit: "s",
            ours: o,
            baseline: Some(("`ls -f` of it, fresh mount, caches dropped".into(), f)),
            goal: format!("≤ 3x `ls -f` (ratio {ratio:.2}x)"),
            met: ratio <= 3.0,
        });
        let own = b.median / Summary::of(&overlay_short).median;
        self.notes.push(format!(
            "Wide directory: on overlayfs, `ls -l` took {own:.1}x as long as `ls -f` (medians): \
             beyond the names, `ls -l` makes a statx and two xattr reads (security.selinux, \
             system.posix_acl_access) per name. Through FUSE the attributes come with the \
             listing (READDIRPLUS), but the kernel keeps no xattrs, so each xattr read is a \
             request. Requests our mount served during the last `ls -l`: {served}."
        ));
        Ok(())
    }

    /// 4. RSS per mounted 100,000-entry layer, measured by a child process.
    fn rss(&mut self, small: &Prepared) -> anyhow::Result<()> {
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

    fn report(&self) -> String {
        let mut r = String::new();
        let cmd: Vec<String> = std::env::args().collect();
        r.push_str("# fusefs benchmarks (issue 5, item 8)\n\n");
        r.push_str(&format!(
            "Command: `{}` (as root, release build: `CARGO_TARGET_DIR=target-bench cargo build --release -p bench --bin fs-bench`).\n\n",
            cmd.join(" ")
        ));
        r.push_str(&format!(
            "Machine: {} cores, `uptime` at the end: {}. Seed {}, {} repetitions, ours and \
             baseline alternating; figures are median (min–max).\n\n",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            uptime(),
            self.args.seed,
            self.args.repeat
        ));
        r.push_str("| benchmark | unit | lazysnap | baseline | baseline figure | goal | met |\n");
        r.push_str("|---|---|---|---|---|---|---|\n");
        for row in &self.rows {
            let (bname, bfig) = match &row.baseline {
                Some((n, s)) => (n.clone(), s.show()),
                None => ("—".into(), "—".into()),
            };
            r.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                row.what,
                row.unit,
                row.ours.show(),
                bname,
                bfig,
                row.goal,
                if row.met { "yes" } else { "**no**" }
            ));
        }
        r.push('\n');
        for n in &self.notes {
            r.push_str(&format!("- {n}\n"));
        }
        r
    }
}

fn uptime() -> String {
    Command::new("uptime")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unavailable".into())
}

/// Uploads a blob from a file with a streaming `curl --upload-file` (testkit's
/// `push_blob` passes the body with `--data-binary`, which curl holds in memory and
/// refuses at 1 GiB). Returns its digest and size.
fn push_file(host: &str, repo: &str, path: &Path) -> anyhow::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(path)?;
    let size = std::io::copy(&mut f, &mut hasher)?;
    let digest = format!("sha256:{:x}", hasher.finalize());
    let out = Command::new("curl")
        .args(["-sS", "-f", "-X", "POST", "-D", "-", "-o", "/dev/null"])
        .arg(format!("http://{host}/v2/{repo}/blobs/uploads/"))
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "starting an upload to {host}/{repo}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let headers = String::from_utf8_lossy(&out.stdout);
    let location = headers
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("location")
                .then(|| v.trim().to_string())
        })
        .context("the registry answered the upload POST without a Location")?;
    let mut url = if location.starts_with('/') {
        format!("http://{host}{location}")
    } else {
        location
    };
    url.push(if url.contains('?') { '&' } else { '?' });
    url.push_str(&format!("digest={}", digest.replace(':', "%3A")));
    let out = Command::new("curl")
        .args([
            "-sS",
            "-f",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
        ])
        .arg("--upload-file")
        .arg(path)
        .arg(&url)
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "uploading {} to {host}/{repo}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok((digest, size))
}

/// `curl -o /dev/null URL`: (bytes, seconds) as curl reports them.
fn curl_download(url: &str) -> anyhow::Result<(u64, f64)> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-f",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
        ])
        .arg(url)
        .output()
        .context("running curl")?;
    ensure!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8(out.stdout)?;
    let mut it = text.split_whitespace();
    let bytes = it.next().and_then(|b| b.parse().ok());
    let secs = it.next().and_then(|s| s.parse().ok());
    match (bytes, secs) {
        (Some(b), Some(s)) => Ok((b, s)),
        _ => bail!("unexpected curl -w output {text:?}"),
    }
}

/// The RSS probe: a fresh process that mounts `--rss-mounts` copies of the blob,
/// walks each with `find` (a separate process, so the walker's memory is not ours) and
/// prints `VmRSS before, after mounting, after walking (KiB)` and the entries walked.
fn rss_child(blob: &Path, args: &Args) -> anyhow::Result<()> {
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
