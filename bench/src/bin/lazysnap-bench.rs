//! lazysnap-bench: cold starts of realistic images through a real containerd, the
//! ordinary overlayfs full pull against lazysnap, over an emulated link.
//!
//! Each run is cold: a fresh containerd and lazysnapd (empty content store, no images,
//! no snapshots, empty chunk cache) and an emptied page cache. Images are built once from
//! their recipes (cached as OCI layouts) and pushed in four forms: gzip, eStargz, eStargz
//! optimized by `lazysnap optimize`, and zstd:chunked.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bench::cold::images::{self, DebianSource, ImageKind};
use bench::cold::link::{self, Link};
use bench::cold::report::{self, Run};
use bench::cold::{self, Ctr, Target, check_interrupted, oci};
use clap::Parser;
use testkit::containerd::{Containerd, ContainerdOptions};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::{Registry, RegistryOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Form {
    /// The plain gzip image, pulled fully onto overlayfs (`ctr image pull`).
    Gzip,
    /// eStargz without prioritized files, pulled lazily (`lazysnap rpull`).
    Esgz,
    /// eStargz with the files the command read prioritized (`lazysnap optimize`).
    EsgzOpt,
    /// zstd:chunked, pulled lazily.
    Zstd,
}

impl Form {
    fn tag(self) -> &'static str {
        match self {
            Form::Gzip => "gzip",
            Form::Esgz => "esgz",
            Form::EsgzOpt => "esgz-opt",
            Form::Zstd => "zstd",
        }
    }
}

/// Measures cold starts (pull + create + run to exit) of realistic images through a real
/// containerd: overlayfs full pull against lazysnap's lazy pull. Needs root, /dev/fuse,
/// containerd 1.6, runc, docker-registry, curl, iproute2 (and debootstrap for the python
/// image).
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
    #[arg(long, value_delimiter = ',', default_value = "gzip,esgz,esgz-opt,zstd")]
    forms: Vec<Form>,
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
    /// Output prefix: writes PREFIX.md, PREFIX.csv and PREFIX.svg.
    #[arg(long, default_value = "bench/results/cold-start")]
    out: PathBuf,
    /// Where built images (OCI layouts) and the registry's storage are kept.
    #[arg(long, default_value = "/var/tmp/lazysnap-bench-cache")]
    cache: PathBuf,
    /// Debian mirror for the python image.
    #[arg(long, default_value = "http://deb.debian.org/debian")]
    mirror: String,
    /// Debian suite for the python image.
    #[arg(long, default_value = "bookworm")]
    suite: String,
    /// Let lazysnapd fetch whole layers in the background after mounting (off by default,
    /// so that the bytes served are what the container needed).
    #[arg(long)]
    background_fetch: bool,
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
    /// Keep, per lazy run, lazysnapd's debug log (every range request with its purpose and
    /// time) and its access log (files opened, bytes read) in this directory.
    #[arg(long, value_name = "DIR")]
    keep_logs: Option<PathBuf>,
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
    if args.images.contains(&ImageKind::Python) {
        testkit::require_program("debootstrap", "debootstrap")?;
    }
    Ok(())
}

/// The containerd and lazysnapd of one run: fresh ones, or the user's.
enum Node {
    Own(Box<OwnNode>),
    External,
}

/// Dropped in field order: containerd (and its tasks) before lazysnapd, then the dir.
struct OwnNode {
    containerd: Containerd,
    lazysnapd: Lazysnapd,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

struct Bench {
    args: Args,
    lazysnap: PathBuf,
    lazysnapd: PathBuf,
    registry_host: String,
    registry_log: Option<PathBuf>,
    plain_http: bool,
}

impl Bench {
    fn start_node(&self) -> anyhow::Result<Node> {
        if self.args.containerd.is_some() {
            return Ok(Node::External);
        }
        let dir = tempfile::Builder::new()
            .prefix("lsbench-")
            .tempdir_in("/var/tmp")?;
        let config = dir.path().join("lazysnapd.toml");
        std::fs::write(
            &config,
            format!(
                "log_level = \"{}\"\n[lazy]\nbackground_fetch = {}\n{}\
                 [resolver.host.\"{}\"]\nplain_http = true\n",
                if self.args.keep_logs.is_some() {
                    "debug"
                } else {
                    "info"
                },
                self.args.background_fetch,
                self.args
                    .lazy_option
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
            &ContainerdOptions::default()
                .proxy_snapshotter(&self.args.snapshotter, &daemon.address)
                .namespace("lazysnap-bench"),
        )?;
        let root = daemon.root.clone();
        Ok(Node::Own(Box::new(OwnNode {
            containerd,
            lazysnapd: daemon,
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
                Form::Gzip => unreachable!("handled above"),
            }
        }
        oci::push_layout(&layout, &self.registry_host, &repo, form.tag())?;
        oci::compressed_size(&layout)
    }

    /// Runs `lazysnap optimize` on the gzip image once (on a fresh node) and keeps the list
    /// of the files the command read, in order.
    fn optimize(&self, kind: ImageKind, list: &Path) -> anyhow::Result<()> {
        say(&format!(
            "lazysnap optimize {}: running its command once",
            kind.name()
        ));
        self.prepare(kind, Form::Gzip)?;
        let node = self.start_node()?;
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

    /// Saves lazysnapd's log and access log of a run under `dir/NAME.{log,accessed.json}`.
    fn keep_logs(&self, dir: &Path, own: &OwnNode, name: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("{name}.log")), own.lazysnapd.log())?;
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--unix-socket"])
            .arg(own.root.join("status.sock"))
            .arg("http://lazysnapd/accessed");
        let accessed = cold::run(cmd, Duration::from_secs(30))?;
        std::fs::write(dir.join(format!("{name}.accessed.json")), accessed)?;
        Ok(())
    }

    fn measure(&self, kind: ImageKind, form: Form, rep: usize) -> anyhow::Result<Run> {
        let node = self.start_node()?;
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
        let target = Target {
            ctr: &ctr,
            reference: &reference,
            lazy_snapshotter: (form != Form::Gzip).then_some(self.args.snapshotter.as_str()),
            lazysnap: &self.lazysnap,
            plain_http: self.plain_http,
            timeout: Duration::from_secs(self.args.timeout),
        };
        let timing = cold::measure(&target, &format!("lsbench-{}-{}", kind.name(), rep))?;
        // The registry logs a request when its response has been sent; give it a moment.
        std::thread::sleep(Duration::from_millis(300));
        let bytes = self
            .registry_log
            .as_ref()
            .map_or(0, |p| cold::bytes_served(&cold::log_since(p, log_offset)));
        let range_requests = match &node {
            Node::Own(own) => self.range_requests(&own.root),
            Node::External => 0,
        };
        if let (Some(dir), Node::Own(own), true) = (&self.args.keep_logs, &node, form != Form::Gzip)
        {
            self.keep_logs(dir, own, &format!("{}-{}-{rep}", kind.name(), form.tag()))?;
        }
        if matches!(node, Node::External) {
            ctr.clear()?;
        }
        drop(node);
        Ok(Run {
            image: kind.name().to_string(),
            form: form.tag().to_string(),
            mode: if form == Form::Gzip {
                "overlayfs"
            } else {
                "lazysnap"
            }
            .to_string(),
            rep,
            pull: timing.pull,
            create: timing.create,
            first_line: timing.first_line,
            run: timing.run,
            bytes_served: bytes,
            image_bytes: 0,
            range_requests,
            last_line: timing.last_line,
        })
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    preflight(&args)?;
    let lazysnap = sibling("lazysnap", &args.lazysnap)?;
    let lazysnapd = sibling("lazysnapd", &args.lazysnapd)?;
    std::fs::create_dir_all(&args.cache)?;

    // The link and the registry live until the end; dropping them removes the namespace.
    let use_link = args.registry.is_none() && !args.no_link;
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
        registry_host,
        registry_log,
    };
    let args = &bench.args;

    // Build, convert, optimize and push at full speed; only the runs see the link.
    let mut sizes = Vec::new();
    for &kind in &args.images {
        for &form in &args.forms {
            check_interrupted()?;
            say(&format!("preparing {} as {}", kind.name(), form.tag()));
            sizes.push(((kind, form), bench.prepare(kind, form)?));
        }
    }
    let conditions = match &link {
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

    let reps_of = |kind: ImageKind| match kind {
        ImageKind::RandomPart | ImageKind::ReadAll => args.big_reps.unwrap_or(args.reps),
        _ => args.reps,
    };
    let total: usize = args.images.iter().map(|&k| reps_of(k)).sum::<usize>() * args.forms.len();
    let mut runs: Vec<Run> = Vec::new();
    let began = Instant::now();
    let mut csv = report::CSV_HEADER.to_string() + "\n";
    let out_csv = args.out.with_extension("csv");
    if let Some(parent) = out_csv.parent() {
        std::fs::create_dir_all(parent)?;
    }
    for rep in 1..=args.reps.max(args.big_reps.unwrap_or(0)) {
        for &kind in args.images.iter().filter(|&&k| rep <= reps_of(k)) {
            for &form in &args.forms {
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
                say(&format!(
                    "[{n}/{total}] {} {} rep {rep}{eta}",
                    kind.name(),
                    form.tag()
                ));
                let mut r = bench.measure(kind, form, rep)?;
                r.image_bytes = sizes
                    .iter()
                    .find(|(k, _)| *k == (kind, form))
                    .map_or(0, |(_, s)| *s);
                say(&format!(
                    "[{n}/{total}] {} {}: pull {:.2} s, create {:.2} s, first line {:.2} s, exit {:.2} s, cold start {:.2} s, {:.1} MB served, {} range requests; last line: {}",
                    r.image,
                    r.form,
                    r.pull.as_secs_f64(),
                    r.create.as_secs_f64(),
                    r.first_line.as_secs_f64(),
                    r.run.as_secs_f64(),
                    r.total().as_secs_f64(),
                    r.bytes_served as f64 / 1e6,
                    r.range_requests,
                    r.last_line
                ));
                csv.push_str(&report::csv_line(&r));
                csv.push('\n');
                // Written after every run, so an interrupted bench keeps what it measured.
                std::fs::write(&out_csv, &csv)?;
                runs.push(r);
            }
        }
    }
    let command: Vec<String> = std::env::args().collect();
    let heading = format!(
        "# Cold starts: overlayfs full pull vs lazysnap\n\n{conditions}; {} repetitions ({} of the 1 GiB images); \
         medians (min-max) in seconds. Cold start = pull + create + run to exit. \
         Made by:\n\n```sh\n{}\n```",
        args.reps,
        args.big_reps.unwrap_or(args.reps),
        command.join(" ")
    );
    std::fs::write(
        args.out.with_extension("md"),
        report::markdown(&runs, &heading),
    )?;
    std::fs::write(
        args.out.with_extension("svg"),
        report::svg(
            &runs,
            &format!("Cold start per image and mode ({conditions})"),
        ),
    )?;
    say(&format!("wrote {}.{{md,csv,svg}}", args.out.display()));
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
