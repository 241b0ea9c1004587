//! registry-bench: N concurrent random range reads against a local registry, made by our
//! registry client (`RemoteBlob`), by a raw hyper client and by `curl`, with the same
//! requests in the same run, to show how much our client adds on top of a plain one.
//!
//! It starts Debian's `docker-registry` on loopback, pushes one blob of random bytes, draws a
//! fixed, seeded list of ranges, checks that every client returns the right bytes, then for
//! each repeat and each concurrency runs every mode once, in a rotating order so that all
//! modes see the same background noise. The table (medians over repeats) goes to stdout and
//! to `--output`.
//!
//! Modes:
//! - `ours`: N tokio tasks sharing one `registry::Client` and one `RemoteBlob`, each calling
//!   `RemoteBlob::read` on the next range of the list.
//! - `hyper`: the same tasks with a bare `hyper_util` pooled HTTP/1.1 client: no retries, no
//!   auth, no checks beyond status and length. The floor for any Rust client.
//! - `curl`: one `curl --parallel --parallel-max N` process fed every range through
//!   `--config`, so no process is spawned per request; latency is curl's own `%{time_total}`.
//!
//! Every mode starts each run with a fresh client (no warm connections), as curl does.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bench::layergen::Rng;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use registry::{Client, Digest, RegistryConfig, RemoteBlob, Repository};
use sha2::{Digest as _, Sha256};

#[derive(Parser, Debug)]
#[command(
    name = "registry-bench",
    about = "Concurrent random range reads against a local registry: our client vs curl and raw hyper"
)]
struct Args {
    /// Size of the random blob pushed to the registry, MiB.
    #[arg(long, default_value_t = 256)]
    blob_mib: u64,
    /// Requests per run (the same list in every run and mode).
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Bytes per range request.
    #[arg(long, default_value_t = 64 * 1024)]
    range_size: u64,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32])]
    concurrency: Vec<usize>,
    /// Runs of every (mode, concurrency); the table shows medians.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Ranges at any byte offset instead of multiples of --range-size.
    #[arg(long)]
    unaligned: bool,
    /// Seed of the blob contents and of the range list.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Modes to run, comma-separated, among ours, hyper, curl (ratios need curl).
    #[arg(long, value_delimiter = ',', default_values_t = [Mode::Ours, Mode::Hyper, Mode::Curl])]
    modes: Vec<Mode>,
    /// Where the Markdown report is written (besides stdout).
    #[arg(long, default_value = "bench/results/registry.md")]
    output: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Ours,
    Hyper,
    Curl,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The spelling clap accepts, for the defaults shown in --help.
        f.write_str(match self {
            Mode::Ours => "ours",
            Mode::Hyper => "hyper",
            Mode::Curl => "curl",
        })
    }
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ours => "ours (RemoteBlob)",
            Mode::Hyper => "raw hyper",
            Mode::Curl => "curl --parallel",
        }
    }
}

/// Everything a run needs to address the blob.
struct Target {
    host: String,
    repo: String,
    digest: String,
    size: u64,
    /// `http://HOST/v2/REPO/blobs/DIGEST`, for hyper and curl.
    url: String,
}

/// One run of one mode at one concurrency.
struct Run {
    wall: Duration,
    latencies: Vec<Duration>,
    /// CPU time (user + system) the client spent on the run: this process for ours and
    /// hyper, the curl child for curl. On 2 cores shared with the registry, client CPU is
    /// CPU the server does not get, so it shows up in throughput.
    cpu: Duration,
    /// CPU time the registry process spent on the run.
    server_cpu: Duration,
}

impl Run {
    fn requests_per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }
}

/// The `q` quantile (nearest rank) of sorted durations, in milliseconds.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Per-run figures: requests/s, median and p90 latency (ms).
#[derive(Clone, Copy)]
struct Figures {
    rps: f64,
    p50: f64,
    p90: f64,
    /// Client CPU per request, microseconds.
    cpu_us: f64,
    /// Registry CPU per request, microseconds.
    server_us: f64,
}

impl From<&Run> for Figures {
    fn from(run: &Run) -> Self {
        let mut sorted = run.latencies.clone();
        sorted.sort_unstable();
        Figures {
            rps: run.requests_per_sec(),
            p50: quantile_ms(&sorted, 0.5),
            p90: quantile_ms(&sorted, 0.9),
            cpu_us: run.cpu.as_secs_f64() * 1e6 / run.latencies.len() as f64,
            server_us: run.server_cpu.as_secs_f64() * 1e6 / run.latencies.len() as f64,
        }
    }
}

/// Seeded bytes: the benchmark must draw the same blob and ranges every time.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity(len);
    Rng::new(seed).fill(&mut data, len);
    data
}

fn random_ranges(args: &Args, size: u64) -> Vec<(u64, u64)> {
    // A different stream from the blob's, so ranges do not correlate with contents.
    let mut rng = Rng::new(args.seed ^ 0x9e37_5eed_0f2a_9e50);
    let len = args.range_size;
    (0..args.requests)
        .map(|_| {
            let offset = if args.unaligned {
                rng.next_u64() % (size - len + 1)
            } else {
                (rng.next_u64() % (size / len)) * len
            };
            (offset, len)
        })
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.range_size > 0, "--range-size must be positive");
    ensure!(args.requests > 0, "--requests must be positive");
    ensure!(args.repeats > 0, "--repeats must be positive");
    ensure!(
        args.concurrency.iter().all(|&n| (1..=300).contains(&n)),
        "--concurrency values must be in 1..=300 (curl's --parallel-max limit)"
    );
    let size = args.blob_mib << 20;
    ensure!(
        size >= args.range_size,
        "the blob ({} MiB) is smaller than one range ({} bytes)",
        args.blob_mib,
        args.range_size
    );
    let curl = testkit::require_program("curl", "curl")?;
    let load_before = load_average();

    eprintln!("generating {} MiB of random bytes", args.blob_mib);
    let data = random_bytes(usize::try_from(size)?, args.seed);
    let blob = testkit::image::Blob::new("application/octet-stream", data);
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let reg = testkit::registry::Registry::start(&scratch.path().join("registry"))
        .context("starting docker-registry")?;
    let repo = "bench/ranges";
    eprintln!("pushing the blob to {}", reg.host);
    testkit::registry::push_blob(&reg.host, repo, &blob).context("pushing the blob")?;
    let target = Target {
        url: format!("http://{}/v2/{repo}/blobs/{}", reg.host, blob.digest),
        host: reg.host.clone(),
        repo: repo.to_string(),
        digest: blob.digest.clone(),
        size,
    };
    let ranges = Arc::new(random_ranges(&args, size));

    let mut modes: Vec<Mode> = Vec::new();
    for &m in &args.modes {
        if !modes.contains(&m) {
            modes.push(m);
        }
    }
    ensure!(!modes.is_empty(), "--modes names no mode");

    // Two worker threads on this 2-core machine: tokio's default, what the daemon runs with.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;

    eprintln!("verifying the bytes each client returns");
    let verified = verify(
        &rt,
        &target,
        &blob.data,
        &ranges,
        &curl,
        &modes,
        scratch.path(),
    )?;

    let configs = scratch.path().join("curl");
    std::fs::create_dir_all(&configs)?;
    // results[mode][concurrency] = one Figures per repeat
    let mut results: Vec<Vec<Vec<Figures>>> =
        vec![vec![Vec::new(); args.concurrency.len()]; modes.len()];
    // A warm-up pass of every mode at the highest concurrency: the registry's page cache,
    // its goroutines and the allocators reach steady state before anything is timed.
    let env = Env {
        rt: &rt,
        server_pid: reg.pid(),
        target: &target,
        ranges: &ranges,
        curl: &curl,
        configs: &configs,
    };
    let warm_n = args.concurrency.iter().copied().max().unwrap_or(1);
    for &mode in &modes {
        run_mode(&env, mode, warm_n).with_context(|| format!("warm-up of {}", mode.name()))?;
    }
    for repeat in 0..args.repeats {
        for (ci, &n) in args.concurrency.iter().enumerate() {
            // Rotate the order each repeat and concurrency: no mode always goes first.
            let shift = (repeat + ci) % modes.len();
            for k in 0..modes.len() {
                let mi = (k + shift) % modes.len();
                let mode = modes[mi];
                let run =
                    run_mode(&env, mode, n).with_context(|| format!("{} at N={n}", mode.name()))?;
                let f = Figures::from(&run);
                eprintln!(
                    "repeat {} N={n:<3} {:<18} {:>8.0} req/s  p50 {:>7.3} ms  p90 {:>7.3} ms  cpu {:>5.0} us/req  registry cpu {:>5.0} us/req",
                    repeat + 1,
                    mode.name(),
                    f.rps,
                    f.p50,
                    f.p90,
                    f.cpu_us,
                    f.server_us
                );
                results[mi][ci].push(f);
            }
        }
    }
    let load_after = load_average();

    let report = render(
        &args,
        &modes,
        &results,
        &verified,
        &load_before,
        &load_after,
        &curl_version(&curl),
    );
    print!("{report}");
    if let Some(dir) = args.output.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.output, &report)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!("wrote {}", args.output.display());
    drop(reg);
    Ok(())
}

/// What every run shares.
struct Env<'a> {
    rt: &'a tokio::runtime::Runtime,
    /// The registry's PID, for its CPU time.
    server_pid: u32,
    target: &'a Target,
    ranges: &'a Arc<Vec<(u64, u64)>>,
    curl: &'a Path,
    /// Where curl's config files (one per concurrency) are kept.
    configs: &'a Path,
}

fn run_mode(env: &Env<'_>, mode: Mode, n: usize) -> anyhow::Result<Run> {
    let Env {
        rt,
        server_pid,
        target,
        ranges,
        curl,
        configs,
    } = *env;
    let server_before = CpuTicks::of(server_pid)?;
    let before = CpuTicks::of_self()?;
    let mut run = match mode {
        Mode::Ours => rt.block_on(run_ours(target, ranges, n)),
        Mode::Hyper => rt.block_on(run_hyper(target, ranges, n)),
        Mode::Curl => run_curl(curl, target, ranges, n, configs),
    }?;
    let after = CpuTicks::of_self()?;
    let server_after = CpuTicks::of(server_pid)?;
    run.server_cpu = server_after.own - server_before.own;
    // The registry is a child too, but still running: only curl, once waited for, is
    // counted in the children's times.
    run.cpu = match mode {
        Mode::Ours | Mode::Hyper => after.own - before.own,
        Mode::Curl => after.children - before.children,
    };
    Ok(run)
}

/// CPU time from `/proc/PID/stat` (utime+stime, cutime+cstime), in clock ticks turned
/// into durations: no unsafe `getrusage` needed, and 10 ms resolution is fine for runs
/// of a second or more.
struct CpuTicks {
    own: Duration,
    children: Duration,
}

impl CpuTicks {
    fn of_self() -> anyhow::Result<Self> {
        Self::read("/proc/self/stat")
    }

    fn of(pid: u32) -> anyhow::Result<Self> {
        Self::read(&format!("/proc/{pid}/stat"))
    }

    fn read(path: &str) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        // The command name may contain spaces; fields are counted after its closing ')'.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .with_context(|| format!("unexpected {path}"))?;
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(4)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("unexpected {path}"))?;
        let [utime, stime, cutime, cstime] = fields[..] else {
            bail!("unexpected {path}: {stat:?}");
        };
        let tick = |t: u64| Duration::from_secs_f64(t as f64 / clock_ticks_per_sec());
        Ok(Self {
            own: tick(utime + stime),
            children: tick(cutime + cstime),
        })
    }
}

fn clock_ticks_per_sec() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            // USER_HZ is 100 on every Linux architecture this runs on.
            .unwrap_or(100.0)
    })
}

fn our_blob(target: &Target) -> anyhow::Result<RemoteBlob> {
    // The defaults the daemon runs with; loopback registries default to plain HTTP.
    let client = Client::new(RegistryConfig::default())?;
    let digest: Digest = target.digest.parse()?;
    Ok(RemoteBlob::new(
        client,
        Repository::new(target.host.clone(), target.repo.clone()),
        digest,
        target.size,
    ))
}

/// Runs `n` tasks that take the next range from the shared list until it is exhausted,
/// each timing its own requests; the wall time covers them all.
async fn drive<F, Fut>(ranges: &Arc<Vec<(u64, u64)>>, n: usize, read: F) -> anyhow::Result<Run>
where
    F: Fn(u64, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Bytes>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let next = next.clone();
        let ranges = ranges.clone();
        let read = read.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(offset, len)) = ranges.get(i) else {
                    break;
                };
                let t = Instant::now();
                let data = read(offset, len).await?;
                latencies.push(t.elapsed());
                ensure!(
                    data.len() as u64 == len,
                    "range {offset}+{len}: got {} bytes",
                    data.len()
                );
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(ranges.len());
    for task in tasks {
        latencies.extend(task.await.context("benchmark task panicked")??);
    }
    Ok(Run {
        wall: start.elapsed(),
        latencies,
        cpu: Duration::ZERO,
        server_cpu: Duration::ZERO,
    })
}

async fn run_ours(target: &Target, ranges: &Arc<Vec<(u64, u64)>>, n: usize) -> anyhow::Result<Run> {
    let blob = Arc::new(our_blob(target)?);
    drive(ranges, n, move |offset, len| {
        let blob = blob.clone();
        async move { Ok(blob.read(offset, len).await?) }
    })
    .await
}

type HyperClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

fn hyper_client() -> HyperClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

async fn hyper_read(
    client: &HyperClient,
    url: &hyper::Uri,
    offset: u64,
    len: u64,
) -> anyhow::Result<Bytes> {
    let req = hyper::Request::get(url.clone())
        .header(
            hyper::header::RANGE,
            format!("bytes={offset}-{}", offset + len - 1),
        )
        .body(Empty::new())?;
    let resp = client.request(req).await?;
    ensure!(
        resp.status() == hyper::StatusCode::PARTIAL_CONTENT,
        "range {offset}+{len}: HTTP {}",
        resp.status()
    );
    Ok(resp.into_body().collect().await?.to_bytes())
}

async fn run_hyper(
    target: &Target,
    ranges: &Arc<Vec<(u64, u64)>>,
    n: usize,
) -> anyhow::Result<Run> {
    let client = hyper_client();
    let url: hyper::Uri = target.url.parse()?;
    drive(ranges, n, move |offset, len| {
        let client = client.clone();
        let url = url.clone();
        async move { hyper_read(&client, &url, offset, len).await }
    })
    .await
}

/// One `curl --parallel` process for the whole list: a config file with one
/// `url`/`range`/`output`/`write-out` group per request, separated by `next`.
fn run_curl(
    curl: &Path,
    target: &Target,
    ranges: &[(u64, u64)],
    n: usize,
    configs: &Path,
) -> anyhow::Result<Run> {
    let config = configs.join(format!("ranges-{n}.curlrc"));
    if !config.exists() {
        let mut text = format!("parallel\nparallel-max = {n}\nparallel-immediate\n");
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            if i > 0 {
                text.push_str("next\n");
            }
            let _ = write!(
                text,
                "url = \"{}\"\nrange = \"{offset}-{}\"\noutput = \"/dev/null\"\nsilent\nshow-error\n\
                 write-out = \"%{{http_code}} %{{size_download}} %{{time_total}}\\n\"\n",
                target.url,
                offset + len - 1
            );
        }
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
    }
    let start = Instant::now();
    let output = Command::new(curl)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .context("running curl")?;
    let wall = start.elapsed();
    if !output.status.success() {
        bail!(
            "curl failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8(output.stdout).context("curl's --write-out output")?;
    let mut latencies = Vec::with_capacity(ranges.len());
    for line in stdout.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [code, size, time] = fields[..] else {
            bail!("unexpected curl --write-out line {line:?}");
        };
        ensure!(code == "206", "curl got HTTP {code} for a range request");
        let size: u64 = size.parse()?;
        let time: f64 = time.parse()?;
        // Every range in the list has the same length.
        ensure!(
            Some(size) == ranges.first().map(|r| r.1),
            "curl downloaded {size} bytes for a range"
        );
        latencies.push(Duration::from_secs_f64(time));
    }
    ensure!(
        latencies.len() == ranges.len(),
        "curl reported {} transfers, expected {}",
        latencies.len(),
        ranges.len()
    );
    Ok(Run {
        wall,
        latencies,
        cpu: Duration::ZERO,
        server_cpu: Duration::ZERO,
    })
}

/// Reads the first few ranges of the list with every client and compares the sha256 of
/// what came back with that of the local bytes. Returns a line for the report.
fn verify(
    rt: &tokio::runtime::Runtime,
    target: &Target,
    data: &[u8],
    ranges: &[(u64, u64)],
    curl: &Path,
    modes: &[Mode],
    scratch: &Path,
) -> anyhow::Result<String> {
    const CHECKED: usize = 16;
    let checked = &ranges[..ranges.len().min(CHECKED)];
    let expected =
        |offset: u64, len: u64| sha256_hex(&data[offset as usize..(offset + len) as usize]);
    let blob = our_blob(target)?;
    let client = hyper_client();
    let url: hyper::Uri = target.url.parse()?;
    for &(offset, len) in checked {
        let want = expected(offset, len);
        let ours = rt.block_on(blob.read(offset, len))?;
        ensure!(
            sha256_hex(&ours) == want,
            "our client returned wrong bytes for {offset}+{len}"
        );
        if modes.contains(&Mode::Hyper) {
            let raw = rt.block_on(hyper_read(&client, &url, offset, len))?;
            ensure!(
                sha256_hex(&raw) == want,
                "hyper returned wrong bytes for {offset}+{len}"
            );
        }
        let file = scratch.join("curl-range");
        let status = Command::new(curl)
            .args(["--silent", "--show-error", "--fail", "--range"])
            .arg(format!("{offset}-{}", offset + len - 1))
            .arg("--output")
            .arg(&file)
            .arg(&target.url)
            .status()
            .context("running curl")?;
        ensure!(status.success(), "curl failed on {offset}+{len}: {status}");
        ensure!(
            sha256_hex(&std::fs::read(&file)?) == want,
            "curl returned wrong bytes for {offset}+{len}"
        );
    }
    Ok(format!(
        "sha256 of the first {} ranges matched the local blob for every client; every \
         timed response was checked for status and length",
        checked.len()
    ))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn curl_version(curl: &Path) -> String {
    Command::new(curl)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8(o.stdout)
                .ok()?
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "curl (version unknown)".into())
}

fn render(
    args: &Args,
    modes: &[Mode],
    results: &[Vec<Vec<Figures>>],
    verified: &str,
    load_before: &str,
    load_after: &str,
    curl_version: &str,
) -> String {
    let curl_i = modes.iter().position(|&m| m == Mode::Curl);
    let med = |runs: &[Figures], f: fn(&Figures) -> f64| {
        median(&mut runs.iter().map(f).collect::<Vec<_>>())
    };
    let command: Vec<String> = std::env::args().collect();
    let mut out = String::new();
    let _ = writeln!(out, "# Registry range reads: our client vs plain clients\n");
    let _ = writeln!(
        out,
        "{} requests of {} bytes at {} offsets (seed {}) into one {} MiB blob on a local \
         `docker-registry` (plain HTTP, loopback); medians of {} runs per cell, modes \
         alternated within each repeat. Ratios are against curl: throughput ours/curl \
         (above 1 is faster) and median latency ours/curl (below 1 is faster).\n",
        args.requests,
        args.range_size,
        if args.unaligned {
            "random byte"
        } else {
            "random range-aligned"
        },
        args.seed,
        args.blob_mib,
        args.repeats
    );
    let _ = writeln!(
        out,
        "| N | mode | req/s | median ms | p90 ms | client CPU µs/req | registry CPU µs/req | req/s vs curl | median vs curl |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for (ci, n) in args.concurrency.iter().enumerate() {
        let curl_figs = curl_i.map(|i| {
            (
                med(&results[i][ci], |f| f.rps),
                med(&results[i][ci], |f| f.p50),
            )
        });
        for (mi, mode) in modes.iter().enumerate() {
            let runs = &results[mi][ci];
            let rps = med(runs, |f| f.rps);
            let p50 = med(runs, |f| f.p50);
            let p90 = med(runs, |f| f.p90);
            let cpu = med(runs, |f| f.cpu_us);
            let server = med(runs, |f| f.server_us);
            let (r_rps, r_p50) = match (mode, curl_figs) {
                (Mode::Curl, _) | (_, None) => ("—".to_string(), "—".to_string()),
                (_, Some((c_rps, c_p50))) => (
                    format!("{:.2}x", rps / c_rps),
                    format!("{:.2}x", p50 / c_p50),
                ),
            };
            let _ = writeln!(
                out,
                "| {n} | {} | {rps:.0} | {p50:.3} | {p90:.3} | {cpu:.0} | {server:.0} | {r_rps} | {r_p50} |",
                mode.name()
            );
        }
    }
    let _ = writeln!(out, "\nRequests/s of each run (repeat 1, 2, …):\n");
    let _ = writeln!(out, "| N | mode | runs |");
    let _ = writeln!(out, "|---:|---|---|");
    for (ci, n) in args.concurrency.iter().enumerate() {
        for (mi, mode) in modes.iter().enumerate() {
            let runs: Vec<String> = results[mi][ci]
                .iter()
                .map(|f| format!("{:.0}", f.rps))
                .collect();
            let _ = writeln!(out, "| {n} | {} | {} |", mode.name(), runs.join(", "));
        }
    }
    let _ = writeln!(out, "\n- Command: `{}`", command.join(" "));
    let _ = writeln!(
        out,
        "- Machine: {} CPUs; load average (1, 5, 15 min) {load_before} before, {load_after} after",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(out, "- Client: {curl_version}");
    let _ = writeln!(out, "- Verification: {verified}");
    let _ = writeln!(
        out,
        "- Modes: *ours* = N tokio tasks (2 worker threads) sharing one `registry::Client` \
         (default config) and one `RemoteBlob`, each calling `read(offset, len)`; *raw hyper* \
         = the same tasks with a bare pooled `hyper_util` HTTP/1.1 client (no retries, auth \
         or header checks); *curl* = one `curl --parallel --parallel-max N --parallel-immediate \
         --config FILE` process with every range in FILE, latency from its `%{{time_total}}`, \
         requests/s from the process's wall time (spawn included, a few ms). Each run starts \
         with a fresh client, so every mode opens its connections inside the timed run."
    );
    let _ = writeln!(
        out,
        "- Latency: from issuing the request to the last body byte, per request; *ours* and \
         *raw hyper* measure it around the call inside the task, which includes waiting for \
         a tokio worker on this 2-core machine."
    );
    let _ = writeln!(
        out,
        "- Client CPU: user + system time per request from `/proc/self/stat` (this process \
         for *ours* and *raw hyper*, the waited-for curl child for *curl*), 10 ms ticks. \
         The registry runs on the same 2 cores, so client CPU is taken from the server; \
         registry CPU is the `docker-registry` process's own, from `/proc/PID/stat`."
    );
    out
}
