//! lazysnap-bench: cold starts of realistic images through a real containerd, the
//! ordinary overlayfs full pull against lazysnap and against stargz-snapshotter (the
//! peer, built from Debian's packaged Go library), in the same run, over an emulated link.
//!
//! Each run is cold: a fresh containerd and a fresh snapshotter daemon (lazysnapd or the
//! peer: empty content store, no images, no snapshots, empty cache) and an emptied page
//! cache. Images are built once from their recipes (cached as OCI layouts) and pushed in
//! seven forms: gzip; eStargz and zstd:chunked by `lazysnap convert`; eStargz optimized
//! by `lazysnap optimize`; eStargz converted and optimized, and zstd:chunked converted, by
//! stargz-snapshotter's `ctr-remote`. Each lazy form is run by lazysnap and by the peer, alternately within
//! each repetition.

mod cold_starts;
mod forms;
mod measure;
mod node;
mod preflight;
mod prepare;
mod warm;

use std::io::Write;
use std::path::PathBuf;

use bench::cold;
use bench::cold::images::{DebianSource, ImageKind};
use bench::cold::link::{self, Link};
use clap::Parser;
use testkit::registry::{Registry, RegistryOptions};

use forms::{Form, Mode};
use preflight::{peer_binary, preflight, sibling};

/// Measures cold starts (pull + create + run to exit) of realistic images through a real
/// containerd: overlayfs full pull, lazysnap's lazy pull and stargz-snapshotter's, side by
/// side. Needs root, /dev/fuse, containerd 1.6, runc, docker-registry, curl, iproute2,
/// ctr-remote (stargz-snapshotter), debootstrap for the python image, and for the peer
/// golang-go with golang-github-containerd-stargz-snapshotter-dev (or a built --peer).
#[derive(Parser, Debug)]
#[command(name = "lazysnap-bench")]
struct Args {
    /// Images to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "python,small-files,random-part,read-all"
    )]
    images: Vec<ImageKind>,
    /// Forms to run each image in.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "gzip,esgz,esgz-opt,zstd,esgz-ctr,esgz-ctr-opt,zstd-ctr"
    )]
    forms: Vec<Form>,
    /// Lazy snapshotters to run each lazy form with (alternately within a repetition).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lazysnap,stargz-snapshotter"
    )]
    modes: Vec<Mode>,
    /// soci's own code built as a test peer with an `index-build LAYOUT MANIFEST_DIGEST
    /// OUTDIR` command (see soci/tests/peer.rs), for the `gzip-soci-ref` form.
    #[arg(long, value_name = "PATH")]
    soci_ref: Option<PathBuf>,
    /// The peer daemon (bench/peer/build.sh builds it). Default: lazysnap-bench-stargz next
    /// to this program, built there with bench/peer/build.sh when missing.
    #[arg(long, value_name = "PATH")]
    peer: Option<PathBuf>,
    /// Repetitions of each image and form (alternated, so drift hits all alike).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Repetitions of the two 1 GiB images, whose full pulls take minutes each on a slow
    /// link (default: --reps).
    #[arg(long)]
    big_reps: Option<usize>,
    /// Link rate in Mbit/s, each direction; 0: unlimited.
    #[arg(long, default_value_t = 100.0)]
    rate_mbit: f64,
    /// One-way delay of the link in milliseconds.
    #[arg(long, default_value_t = 10.0)]
    delay_ms: f64,
    /// No emulated link: the registry on loopback at full speed.
    #[arg(long)]
    no_link: bool,
    /// Output prefix: writes PREFIX.md, PREFIX.csv and PREFIX.svg (PREFIX.md and
    /// PREFIX.csv with --warm). Default: bench/results/cold-start, with --warm
    /// bench/results/warm.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Warm mode instead of cold starts: each image made wholly local in each mode (the
    /// full pull, lazysnap, stargz-snapshotter), then a data pass, a metadata pass and a
    /// start-up pass, each in a new container, timed inside it. The registry is reached on
    /// loopback (no emulated link): the passes read nothing from it.
    #[arg(long)]
    warm: bool,
    /// The lazy form the warm mode pulls.
    #[arg(long, default_value = "esgz")]
    warm_form: Form,
    /// Where built images (OCI layouts) and the registry's storage are kept.
    #[arg(long, default_value = "/var/tmp/lazysnap-bench-cache")]
    cache: PathBuf,
    /// Debian mirror for the python image.
    #[arg(long, default_value = "http://deb.debian.org/debian")]
    mirror: String,
    /// Debian suite for the python image.
    #[arg(long, default_value = "bookworm")]
    suite: String,
    /// Turn lazysnapd's background fetch off (`[lazy] background_fetch = false`); by
    /// default lazysnapd runs on its default config, as stargz-snapshotter runs on its.
    #[arg(long)]
    no_background_fetch: bool,
    /// Seconds a pull or a container may take.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Use this containerd (its socket) instead of starting one per run. Its lazysnap
    /// snapshotter must be configured (see --snapshotter); the bench removes the images
    /// it pulled after each run but cannot empty that lazysnapd's chunk cache.
    #[arg(long, value_name = "SOCKET")]
    containerd: Option<PathBuf>,
    /// containerd namespace for the runs with --containerd.
    #[arg(long, default_value = "lazysnap-bench")]
    namespace: String,
    /// The lazysnap proxy snapshotter's name in containerd's config.
    #[arg(long, default_value = "lazysnap")]
    snapshotter: String,
    /// Root of the lazysnapd behind --containerd (for `lazysnap optimize`'s access log).
    #[arg(long, default_value = "/var/lib/lazysnap")]
    lazysnapd_root: PathBuf,
    /// Use this registry (HOST:PORT, plain HTTP) instead of starting one; no emulated link.
    #[arg(long)]
    registry: Option<String>,
    /// That registry's access log, for the bytes served (else they are not reported).
    #[arg(long)]
    registry_log: Option<PathBuf>,
    /// lazysnap and lazysnapd binaries (default: next to this program, else on PATH).
    #[arg(long)]
    lazysnap: Option<PathBuf>,
    #[arg(long)]
    lazysnapd: Option<PathBuf>,
    /// Extra `[lazy]` settings for the lazysnapd the bench starts, as KEY=VALUE (TOML
    /// values), e.g. `--lazy-option kernel_readahead_kb=128`.
    #[arg(long, value_name = "KEY=VALUE")]
    lazy_option: Vec<String>,
    /// Extra `[cache]` settings for that lazysnapd, as KEY=VALUE, e.g. `--cache-option
    /// memory_bytes=33554432`.
    #[arg(long, value_name = "KEY=VALUE")]
    cache_option: Vec<String>,
    /// Keep, per lazy run, lazysnapd's debug log (every range request with its purpose and
    /// time) and its access log (files opened, bytes read) in this directory.
    #[arg(long, value_name = "DIR")]
    keep_logs: Option<PathBuf>,
}

impl Args {
    fn out(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            PathBuf::from(if self.warm {
                "bench/results/warm"
            } else {
                "bench/results/cold-start"
            })
        })
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    cold::catch_signals();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazysnap-bench: {e:#}");
            std::process::ExitCode::from(
                if cold::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
                    130
                } else {
                    1
                },
            )
        }
    }
}

fn say(msg: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "lazysnap-bench: {msg}");
}

struct Bench {
    args: Args,
    lazysnap: PathBuf,
    lazysnapd: PathBuf,
    peer: Option<PathBuf>,
    registry_host: String,
    registry_log: Option<PathBuf>,
    plain_http: bool,
}

impl Bench {
    fn reference(&self, kind: ImageKind, form: Form) -> String {
        format!(
            "{}/lsbench/{}:{}",
            self.registry_host,
            kind.name(),
            form.tag()
        )
    }

    fn debian(&self) -> DebianSource {
        DebianSource {
            mirror: self.args.mirror.clone(),
            suite: self.args.suite.clone(),
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    preflight(&args)?;
    let lazysnap = sibling("lazysnap", &args.lazysnap)?;
    let lazysnapd = sibling("lazysnapd", &args.lazysnapd)?;
    let peer = if args.modes.contains(&Mode::StargzSnapshotter) {
        Some(peer_binary(&args.peer)?)
    } else {
        None
    };
    std::fs::create_dir_all(&args.cache)?;

    // The link and the registry live until the end; dropping them removes the namespace.
    let use_link = args.registry.is_none() && !args.no_link && !args.warm;
    let link = if use_link {
        Some(Link::create()?)
    } else {
        None
    };
    let mut own_registry = None;
    let (registry_host, registry_log) = match &args.registry {
        Some(host) => (host.clone(), args.registry_log.clone()),
        None => {
            let dir = args.cache.join("registry");
            std::fs::create_dir_all(&dir)?;
            let _ = std::fs::remove_file(dir.join("registry.log"));
            let options = RegistryOptions {
                netns: link.as_ref().map(|l| l.netns.clone()),
                listen: link.as_ref().map(|_| format!("{}:5000", link::REGISTRY_IP)),
                ..RegistryOptions::default()
            };
            let registry = Registry::start_with(&dir, &options)?;
            let host = registry.host.clone();
            own_registry = Some(registry);
            (host, Some(dir.join("registry.log")))
        }
    };
    let bench = Bench {
        plain_http: true,
        args,
        lazysnap,
        lazysnapd,
        peer,
        registry_host,
        registry_log,
    };
    let args = &bench.args;
    if args.warm {
        return warm::run(&bench);
    }
    cold_starts::run(&bench, link.as_ref())?;
    drop(own_registry);
    drop(link);
    Ok(())
}
