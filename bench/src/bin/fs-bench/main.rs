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

mod cold_read;
mod curl;
mod layers;
mod mounts;
mod report;
mod rss;
mod sequential;
mod tools;
mod walk;
mod wide;

use std::path::PathBuf;

use anyhow::{Context, ensure};
use clap::Parser;

use mounts::UnmountAll;
use report::Row;
use rss::rss_child;

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
}
