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

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bench::cold::floor::{self, FloorBytes, LinkRate};
use bench::cold::images::{self, DebianSource, ImageKind};
use bench::cold::link::{self, Link};
use bench::cold::memory;
use bench::cold::peer::{self, StargzPeer};
use bench::cold::report::{self, Run};
use bench::cold::{self, Ctr, Target, check_interrupted, oci};
use clap::Parser;
use testkit::containerd::{Containerd, ContainerdOptions};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::{Registry, RegistryOptions};

mod warm;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Form {
    /// The plain gzip image, pulled fully onto overlayfs (`ctr image pull`).
    Gzip,
    /// eStargz without prioritized files, pulled lazily (`lazysnap rpull`).
    Esgz,
    /// eStargz with the files the command read prioritized (`lazysnap optimize`).
    EsgzOpt,
    /// zstd:chunked (`lazysnap convert --zstdchunked`: containers/storage's footer, which
    /// stargz-snapshotter 0.12 cannot read, so it pulls this form fully), pulled lazily.
    Zstd,
    /// eStargz converted by stargz-snapshotter's `ctr-remote image convert --estargz
    /// --oci`, no prioritized files.
    EsgzCtr,
    /// eStargz optimized by `ctr-remote image optimize --oci`, the image's command run
    /// once (in a containerd the bench starts) to find the files to prioritize.
    EsgzCtrOpt,
    /// zstd:chunked converted by `ctr-remote image convert --zstdchunked --oci`
    /// (stargz-snapshotter's own footer, which both snapshotters mount lazily).
    ZstdCtr,
    /// The gzip image itself with a SOCI index by `lazysnap convert --soci` (v2), pulled
    /// lazily by lazysnap (stargz-snapshotter reads no SOCI index: not run with it).
    GzipSoci,
    /// The gzip image with a SOCI index made by soci's own code (`--soci-ref`).
    GzipSociRef,
}

impl Form {
    fn tag(self) -> &'static str {
        match self {
            Form::Gzip => "gzip",
            Form::Esgz => "esgz",
            Form::EsgzOpt => "esgz-opt",
            Form::Zstd => "zstd",
            Form::EsgzCtr => "esgz-ctr",
            Form::EsgzCtrOpt => "esgz-ctr-opt",
            Form::ZstdCtr => "zstd-ctr",
            Form::GzipSoci => "gzip-soci",
            Form::GzipSociRef => "gzip-soci-ref",
        }
    }

    /// Forms only lazysnap pulls lazily (the peer would pull them in full).
    fn lazysnap_only(self) -> bool {
        matches!(self, Form::GzipSoci | Form::GzipSociRef)
    }
}

/// The lazy snapshotters each lazy form is run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// lazysnapd, on its default config.
    Lazysnap,
    /// stargz-snapshotter (the peer daemon, `--peer`), on its default config.
    StargzSnapshotter,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Lazysnap => report::LAZYSNAP,
            Mode::StargzSnapshotter => report::STARGZ,
        }
    }
}

/// The peer's name as a proxy snapshotter in the containerd the bench starts.
const PEER_SNAPSHOTTER: &str = "stargz";

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

/// A sibling of this executable, else the name on PATH.
fn sibling(name: &str, given: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    if let Ok(me) = std::env::current_exe()
        && let Some(dir) = me.parent()
        && dir.join(name).is_file()
    {
        return Ok(dir.join(name));
    }
    testkit::require_program(name, "lazysnap (cargo build --release -p daemon)")
}

/// Refuses, with the reason, when the machine lacks what the runs need.
fn preflight(args: &Args) -> anyhow::Result<()> {
    if !testkit::is_root() {
        bail!(
            "needs root (it mounts, runs containerd and creates network namespaces); run it with sudo"
        );
    }
    if !Path::new("/dev/fuse").exists() {
        bail!(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) or give the container the device"
        );
    }
    if let Some(socket) = &args.containerd {
        if std::os::unix::net::UnixStream::connect(socket).is_err() {
            bail!("no containerd answers on {}", socket.display());
        }
    } else {
        testkit::require_program("containerd", "containerd")?;
        testkit::require_program("runc", "runc")?;
    }
    testkit::require_program("ctr", "containerd")?;
    testkit::require_program("curl", "curl")?;
    if args.registry.is_none() {
        testkit::require_program("docker-registry", "docker-registry")?;
        if !args.no_link {
            testkit::require_program("ip", "iproute2")?;
            testkit::require_program("tc", "iproute2")?;
            if !Path::new("/dev/net/tun").exists() {
                bail!(
                    "/dev/net/tun is missing (the emulated link needs TUN devices); use --no-link to run without it"
                );
            }
        }
    }
    if args.images.iter().any(|k| k.needs_debootstrap()) {
        testkit::require_program("debootstrap", "debootstrap")?;
    }
    if args
        .forms
        .iter()
        .any(|f| matches!(f, Form::EsgzCtr | Form::EsgzCtrOpt | Form::ZstdCtr))
    {
        testkit::require_program("ctr-remote", "stargz-snapshotter")?;
    }
    if args.modes.is_empty() {
        bail!("--modes is empty: give lazysnap, stargz-snapshotter or both");
    }
    if args.modes.contains(&Mode::StargzSnapshotter) && args.containerd.is_some() {
        bail!(
            "--containerd: the stargz-snapshotter peer needs a containerd the bench starts \
             (with the peer as a proxy snapshotter); add --modes lazysnap to run without it"
        );
    }
    Ok(())
}

/// The peer daemon: --peer, else next to this program, built there when missing.
fn peer_binary(given: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!(
                "--peer {}: no such file (build it with: {} {})",
                p.display(),
                peer::build_script().display(),
                p.display()
            );
        }
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let out = me
        .parent()
        .context("this program has no directory")?
        .join(peer::BINARY);
    if out.is_file() {
        return Ok(out);
    }
    say(&format!(
        "building the stargz-snapshotter peer: {} {}",
        peer::build_script().display(),
        out.display()
    ));
    peer::build(&out).context(
        "the stargz-snapshotter peer could not be built; give a built one with --peer, \
         or run without it with --modes lazysnap",
    )?;
    Ok(out)
}

/// The containerd and lazysnapd of one run: fresh ones, or the user's.
enum Node {
    Own(Box<OwnNode>),
    External,
}

/// Dropped in field order: containerd (and its tasks) before the snapshotter daemon,
/// then the dir.
struct OwnNode {
    containerd: Containerd,
    lazysnapd: Option<Lazysnapd>,
    peer: Option<StargzPeer>,
    /// The daemon's root (lazysnapd's, or the peer's), else the temp dir.
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl OwnNode {
    /// The lazy snapshotter daemon's pid, if this node has one.
    fn daemon_pid(&self) -> Option<u32> {
        let pid = match (&self.lazysnapd, &self.peer) {
            (Some(daemon), _) => daemon.pid(),
            (None, Some(peer)) => peer.pid(),
            (None, None) => 0,
        };
        (pid != 0).then_some(pid)
    }
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
    /// A fresh containerd with a fresh daemon of `mode` as a proxy snapshotter; with
    /// `None`, containerd alone (full pulls onto overlayfs, `ctr-remote`).
    fn start_node(&self, mode: Option<Mode>) -> anyhow::Result<Node> {
        if self.args.containerd.is_some() {
            return Ok(Node::External);
        }
        let dir = tempfile::Builder::new()
            .prefix("lsbench-")
            .tempdir_in("/var/tmp")?;
        let options = ContainerdOptions::default().namespace("lazysnap-bench");
        match mode {
            None => {
                let containerd = Containerd::start_with(&options)?;
                Ok(Node::Own(Box::new(OwnNode {
                    containerd,
                    lazysnapd: None,
                    peer: None,
                    root: dir.path().to_path_buf(),
                    _dir: dir,
                })))
            }
            Some(Mode::StargzSnapshotter) => {
                let binary = self
                    .peer
                    .as_ref()
                    .context("the stargz-snapshotter peer is not built")?;
                let peer =
                    StargzPeer::start(binary, &dir.path().join("peer"), &self.registry_host)?;
                let containerd = Containerd::start_with(
                    &options.proxy_snapshotter(PEER_SNAPSHOTTER, &peer.address),
                )?;
                let root = peer.root.clone();
                Ok(Node::Own(Box::new(OwnNode {
                    containerd,
                    lazysnapd: None,
                    peer: Some(peer),
                    root,
                    _dir: dir,
                })))
            }
            Some(Mode::Lazysnap) => self.start_lazysnap_node(dir, options),
        }
    }

    fn start_lazysnap_node(
        &self,
        dir: tempfile::TempDir,
        options: ContainerdOptions,
    ) -> anyhow::Result<Node> {
        let config = dir.path().join("lazysnapd.toml");
        std::fs::write(
            &config,
            format!(
                "log_level = \"{}\"\n[lazy]\n{}{}[cache]\n{}\
                 [resolver.host.\"{}\"]\nplain_http = true\n",
                if self.args.keep_logs.is_some() {
                    "debug"
                } else {
                    "info"
                },
                if self.args.no_background_fetch {
                    "background_fetch = false\n"
                } else {
                    ""
                },
                self.args
                    .lazy_option
                    .iter()
                    .map(|o| format!("{o}\n"))
                    .collect::<String>(),
                self.args
                    .cache_option
                    .iter()
                    .map(|o| format!("{o}\n"))
                    .collect::<String>(),
                self.registry_host
            ),
        )?;
        let config = config.to_str().context("non-UTF-8 temp path")?.to_string();
        let daemon = Lazysnapd::start_with_args(
            &self.lazysnapd,
            &dir.path().join("ls"),
            &["--config", &config],
        )?;
        let containerd = Containerd::start_with(
            &options.proxy_snapshotter(&self.args.snapshotter, &daemon.address),
        )?;
        let root = daemon.root.clone();
        Ok(Node::Own(Box::new(OwnNode {
            containerd,
            lazysnapd: Some(daemon),
            peer: None,
            root,
            _dir: dir,
        })))
    }

    fn ctr(&self, node: &Node) -> Ctr {
        match node {
            Node::Own(own) => Ctr {
                address: own.containerd.address().to_path_buf(),
                namespace: own.containerd.namespace().to_string(),
            },
            Node::External => Ctr {
                address: self.args.containerd.clone().unwrap_or_default(),
                namespace: self.args.namespace.clone(),
            },
        }
    }

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

    fn convert(&self, extra: &[&str], src: &str, dst: &str) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.lazysnap);
        cmd.args(["convert", "--no-progress-bars"])
            .args(extra)
            .args([src, dst]);
        cold::run(cmd, Duration::from_secs(3600)).map(|_| ())
    }

    /// Makes sure the registry holds `kind` in `form` (built, converted, optimized as
    /// needed, from the cache when it can); returns the form's compressed size.
    fn prepare(&self, kind: ImageKind, form: Form) -> anyhow::Result<u64> {
        let plain = images::build_plain(&self.args.cache, kind, &self.debian(), &say)?;
        let dir = plain
            .parent()
            .context("layout without parent")?
            .to_path_buf();
        let plain_oci = format!("oci:{}:latest", plain.display());
        let layout = dir.join(form.tag());
        let repo = format!("lsbench/{}", kind.name());
        if form == Form::Gzip {
            oci::push_layout(&plain, &self.registry_host, &repo, form.tag())?;
            return oci::compressed_size(&plain);
        }
        if !layout.join("index.json").is_file() {
            let dst = format!("oci:{}:latest", layout.display());
            match form {
                Form::Esgz => self.convert(&[], &plain_oci, &dst)?,
                Form::Zstd => self.convert(&["--zstdchunked"], &plain_oci, &dst)?,
                Form::EsgzOpt => {
                    let list = dir.join("optimize.list");
                    if !list.is_file() {
                        self.optimize(kind, &list)?;
                    }
                    let list = list.to_str().context("non-UTF-8 path")?;
                    self.convert(&["--prioritize", list], &plain_oci, &dst)?;
                }
                Form::EsgzCtr | Form::EsgzCtrOpt | Form::ZstdCtr => {
                    self.ctr_remote(kind, form, &layout)?
                }
                Form::GzipSoci => self.convert(&["--soci"], &plain_oci, &dst)?,
                Form::GzipSociRef => self.soci_ref(&plain, &layout)?,
                Form::Gzip => unreachable!("handled above"),
            }
        }
        oci::push_layout(&layout, &self.registry_host, &repo, form.tag())?;
        oci::compressed_size(&layout)
    }

    /// Indexes the plain image with soci's own code (`--soci-ref`): a layout of the plain
    /// image's blobs and what soci made, its index.json naming soci's OCI index.
    fn soci_ref(&self, plain: &Path, layout: &Path) -> anyhow::Result<()> {
        use sha2::Digest as _;
        let peer = self
            .args
            .soci_ref
            .clone()
            .or_else(|| std::env::var_os("LAZYSNAP_SOCI_REF").map(PathBuf::from))
            .context("the gzip-soci-ref form needs --soci-ref (or LAZYSNAP_SOCI_REF)")?;
        let (_, manifest, _) = oci::read_manifest(plain)?;
        let digest = format!("sha256:{:x}", sha2::Sha256::digest(&manifest));
        let partial = layout.with_extension("partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        let made = partial.join("made");
        std::fs::create_dir_all(&made)?;
        let mut cmd = Command::new(peer);
        cmd.arg("index-build").arg(plain).arg(&digest).arg(&made);
        let out = cold::run(cmd, Duration::from_secs(3600))?;
        let top = out
            .lines()
            .find_map(|l| l.strip_prefix("oci_index: "))
            .and_then(|l| l.split_whitespace().next())
            .context("soci printed no oci_index line")?
            .to_string();
        let blobs = partial.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs)?;
        for entry in std::fs::read_dir(plain.join("blobs").join("sha256"))? {
            let entry = entry?;
            std::fs::hard_link(entry.path(), blobs.join(entry.file_name()))?;
        }
        for entry in std::fs::read_dir(&made)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let hex = name
                .strip_prefix("sha256:")
                .context("soci wrote a blob not named by digest")?;
            std::fs::rename(entry.path(), blobs.join(hex))?;
        }
        std::fs::remove_dir(&made)?;
        let size = std::fs::metadata(blobs.join(top.trim_start_matches("sha256:")))?.len();
        std::fs::write(
            partial.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                           "digest": top, "size": size}],
        });
        std::fs::write(partial.join("index.json"), serde_json::to_vec(&index)?)?;
        std::fs::rename(&partial, layout)?;
        Ok(())
    }

    /// Runs `lazysnap optimize` on the gzip image once (on a fresh node) and keeps the list
    /// of the files the command read, in order.
    fn optimize(&self, kind: ImageKind, list: &Path) -> anyhow::Result<()> {
        say(&format!(
            "lazysnap optimize {}: running its command once",
            kind.name()
        ));
        self.prepare(kind, Form::Gzip)?;
        let node = self.start_node(Some(Mode::Lazysnap))?;
        let ctr = self.ctr(&node);
        let root = match &node {
            Node::Own(own) => own.root.clone(),
            Node::External => self.args.lazysnapd_root.clone(),
        };
        let partial = list.with_extension("partial");
        let mut cmd = Command::new(&self.lazysnap);
        cmd.arg("optimize")
            .arg("--address")
            .arg(&ctr.address)
            .args([
                "--namespace",
                &ctr.namespace,
                "--snapshotter",
                &self.args.snapshotter,
            ])
            .arg("--root")
            .arg(&root)
            .arg("--record")
            .arg(&partial)
            .arg("--no-progress-bars");
        if self.plain_http {
            cmd.arg("--plain-http");
        }
        cmd.arg(self.reference(kind, Form::Gzip))
            .arg(self.reference(kind, Form::EsgzOpt));
        let out = cold::run(cmd, Duration::from_secs(3600))?;
        say(out.trim());
        if matches!(node, Node::External) {
            ctr.clear()?;
        }
        drop(node);
        std::fs::rename(&partial, list)?;
        Ok(())
    }

    /// Converts (`esgz-ctr`, `zstd-ctr`) or optimizes (`esgz-ctr-opt`) the gzip image with
    /// stargz-snapshotter's `ctr-remote` in a containerd of its own (optimize runs the
    /// image's command there with runc), and exports the result into `layout`.
    fn ctr_remote(&self, kind: ImageKind, form: Form, layout: &Path) -> anyhow::Result<()> {
        self.prepare(kind, Form::Gzip)?;
        let node = self.start_node(None)?;
        let ctr = self.ctr(&node);
        if matches!(node, Node::External) {
            ctr.clear()?;
        }
        let long = Duration::from_secs(3600);
        let src = self.reference(kind, Form::Gzip);
        let dst = self.reference(kind, form);
        let mut pull = vec!["images", "pull"];
        if self.plain_http {
            pull.push("--plain-http");
        }
        pull.push(&src);
        ctr.run(&pull, long)?;
        let mut cmd = Command::new("ctr-remote");
        cmd.arg("--address")
            .arg(&ctr.address)
            .args(["--namespace", &ctr.namespace]);
        let cmdline = kind.cmd();
        match form {
            Form::EsgzCtr => {
                say(&format!(
                    "ctr-remote image convert --estargz --oci {}",
                    kind.name()
                ));
                cmd.args(["image", "convert", "--estargz", "--oci", &src, &dst]);
            }
            Form::ZstdCtr => {
                say(&format!(
                    "ctr-remote image convert --zstdchunked --oci {}",
                    kind.name()
                ));
                cmd.args(["image", "convert", "--zstdchunked", "--oci", &src, &dst]);
            }
            Form::EsgzCtrOpt => {
                say(&format!(
                    "ctr-remote image optimize --oci {}: running its command once",
                    kind.name()
                ));
                cmd.args(["image", "optimize", "--oci"])
                    .arg("--entrypoint")
                    .arg(serde_json::to_string(&cmdline[..1])?)
                    .arg("--args")
                    .arg(serde_json::to_string(&cmdline[1..])?)
                    .args([&src, &dst]);
            }
            _ => bail!("{} is not a ctr-remote form", form.tag()),
        }
        cold::run(cmd, long)?;
        let tar = layout.with_extension("tar");
        let partial = layout.with_extension("partial");
        let tar_str = tar.to_str().context("non-UTF-8 path")?;
        ctr.run(
            &["images", "export", "--skip-manifest-json", tar_str, &dst],
            long,
        )?;
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        std::fs::create_dir_all(&partial)?;
        let mut untar = Command::new("tar");
        untar.arg("-xf").arg(&tar).arg("-C").arg(&partial);
        cold::run(untar, long)?;
        std::fs::remove_file(&tar)?;
        if matches!(node, Node::External) {
            ctr.clear()?;
        }
        drop(node);
        std::fs::rename(&partial, layout)?;
        Ok(())
    }

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
    fn measure_link(&self) -> anyhow::Result<LinkRate> {
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
    fn measure(
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

    // Build, convert, optimize and push at full speed; only the runs see the link.
    let mut sizes = Vec::new();
    for &kind in &args.images {
        for &form in &args.forms {
            check_interrupted()?;
            say(&format!("preparing {} as {}", kind.name(), form.tag()));
            sizes.push(((kind, form), bench.prepare(kind, form)?));
        }
    }
    let mut conditions = match &link {
        Some(link) => {
            let rate = (args.rate_mbit > 0.0).then_some(args.rate_mbit);
            link.shape(rate, Duration::from_secs_f64(args.delay_ms / 1000.0))?;
            format!(
                "emulated link: {} each way, {} ms one-way delay (TUN delay line, tc tbf)",
                rate.map_or("unlimited".to_string(), |r| format!("{r} Mbit/s")),
                args.delay_ms
            )
        }
        None => "no emulated link (registry reached directly)".to_string(),
    };
    say(&conditions);
    // The floor's link: measured once, as the runs will see it.
    let link_rate = match bench.measure_link() {
        Ok(l) => {
            say(&format!(
                "the link measured: {:.2} MB/s, round trip {:.1} ms",
                l.bytes_per_s / 1e6,
                l.rtt.as_secs_f64() * 1e3
            ));
            let _ = write!(
                conditions,
                " (measured: {:.2} MB/s, {:.1} ms round trip)",
                l.bytes_per_s / 1e6,
                l.rtt.as_secs_f64() * 1e3
            );
            Some(l)
        }
        Err(e) => {
            say(&format!(
                "the link could not be measured, so no floor: {e:#}"
            ));
            None
        }
    };

    let reps_of = |kind: ImageKind| match kind {
        ImageKind::RandomPart | ImageKind::ReadAll => args.big_reps.unwrap_or(args.reps),
        _ => args.reps,
    };
    // Per repetition of an image: gzip once (the full pull), each lazy form once per mode.
    let lazysnap_runs = args.modes.iter().filter(|&&m| m == Mode::Lazysnap).count();
    let per_rep: usize = args
        .forms
        .iter()
        .map(|&f| match f {
            Form::Gzip => 1,
            f if f.lazysnap_only() => lazysnap_runs,
            _ => args.modes.len(),
        })
        .sum();
    let total: usize = args.images.iter().map(|&k| reps_of(k)).sum::<usize>() * per_rep;
    let mut runs: Vec<Run> = Vec::new();
    let began = Instant::now();
    let out = args.out();
    let out_csv = out.with_extension("csv");
    if let Some(parent) = out_csv.parent() {
        std::fs::create_dir_all(parent)?;
    }
    for rep in 1..=args.reps.max(args.big_reps.unwrap_or(0)) {
        for &kind in args.images.iter().filter(|&&k| rep <= reps_of(k)) {
            // The modes alternate within a repetition, first one then the other first, so
            // that drift (and whatever a run leaves behind) hits both alike.
            let mut modes: Vec<Option<Mode>> = args.modes.iter().copied().map(Some).collect();
            if rep % 2 == 0 {
                modes.reverse();
            }
            let runs_of = |form: Form| match form {
                Form::Gzip => vec![None],
                f if f.lazysnap_only() => vec![Some(Mode::Lazysnap)]
                    .into_iter()
                    .filter(|m| modes.contains(m))
                    .collect(),
                _ => modes.clone(),
            };
            for (form, mode) in args
                .forms
                .iter()
                .flat_map(|&f| runs_of(f).into_iter().map(move |m| (f, m)))
            {
                check_interrupted()?;
                let n = runs.len() + 1;
                let eta = if runs.is_empty() {
                    String::new()
                } else {
                    let per = began.elapsed() / runs.len() as u32;
                    format!(
                        ", about {:.0} s left",
                        (per * (total - runs.len()) as u32).as_secs_f64()
                    )
                };
                let mode_name = mode.map_or(report::OVERLAYFS, Mode::name);
                say(&format!(
                    "[{n}/{total}] {} {} {mode_name} rep {rep}{eta}",
                    kind.name(),
                    form.tag()
                ));
                let mut r = bench.measure(kind, form, mode, rep)?;
                r.image_bytes = sizes
                    .iter()
                    .find(|(k, _)| *k == (kind, form))
                    .map_or(0, |(_, s)| *s);
                say(&format!(
                    "[{n}/{total}] {} {} {}: pull {:.2} s, create {:.2} s, first line {:.2} s, exit {:.2} s, cold start {:.2} s, {:.1} MB served, {} range requests{}; last line: {}",
                    r.image,
                    r.form,
                    r.mode,
                    r.pull.as_secs_f64(),
                    r.create.as_secs_f64(),
                    r.first_line.as_secs_f64(),
                    r.run.as_secs_f64(),
                    r.total().as_secs_f64(),
                    r.bytes_served as f64 / 1e6,
                    r.range_requests,
                    r.lazy_layers.map_or(String::new(), |(l, n)| format!(
                        ", {l}/{n} layers lazy{}",
                        if l == 0 {
                            " (the snapshotter declined them: a full pull)"
                        } else {
                            ""
                        }
                    )),
                    r.last_line
                ));
                runs.push(r);
                // Written after every run, so an interrupted bench keeps what it measured.
                std::fs::write(&out_csv, report::csv(&runs, link_rate.as_ref()))?;
            }
        }
    }
    let command: Vec<String> = std::env::args().collect();
    let heading = format!(
        "# Cold starts: overlayfs full pull vs lazysnap vs stargz-snapshotter\n\n{conditions}; {} repetitions ({} of the 1 GiB images); \
         medians (min-max) in seconds. Cold start = pull + create + run to exit. Each run on a \
         fresh containerd and snapshotter daemon (empty caches), page cache dropped; lazysnap \
         and stargz-snapshotter alternate within each repetition, both on their default \
         config{}, both pulled by `lazysnap rpull`. Made by:\n\n```sh\n{}\n```",
        args.reps,
        args.big_reps.unwrap_or(args.reps),
        if args.no_background_fetch {
            " (but lazysnapd's background fetch off: --no-background-fetch)"
        } else {
            ""
        },
        command.join(" ")
    );
    std::fs::write(
        out.with_extension("md"),
        report::markdown(&runs, &heading, link_rate.as_ref()),
    )?;
    std::fs::write(
        out.with_extension("svg"),
        report::svg(
            &runs,
            &format!("Cold start per image and mode ({conditions})"),
        ),
    )?;
    say(&format!("wrote {}.{{md,csv,svg}}", out.display()));
    if let Some(link) = &link {
        let dropped = link.dropped.load(std::sync::atomic::Ordering::Relaxed);
        if dropped > 0 {
            say(&format!("the delay line dropped {dropped} packets"));
        }
    }
    drop(own_registry);
    drop(link);
    Ok(())
}
