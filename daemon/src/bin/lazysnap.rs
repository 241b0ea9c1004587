//! `lazysnap`: the command-line tool. Its logic lives in the library crates; this file
//! parses arguments, builds the runtime and reports errors.

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lazysnap", version, about = "lazysnap command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Convert an image to eStargz or zstd:chunked (registry or `oci:DIR[:TAG]`, both ways).
    Convert(converter::cli::ConvertArgs),
    /// Pull an image through containerd so that lazysnapd mounts its layers lazily
    /// (what `ctr-remote image rpull` does).
    Rpull(RpullArgs),
    /// Run an image's command once on lazysnap (with a time limit), record which files it
    /// read from lazysnapd's access log, and convert SRC to DST with those files
    /// prioritized in read order. DST must be a registry reference.
    Optimize(daemon::optimize::OptimizeArgs),
    /// Show what lazysnapd serves: snapshots, cache, how much of each lazily mounted
    /// layer and image is local, and which images can run without their registry.
    Status(StatusArgs),
    /// Make images wholly local now (every chunk of their lazily mounted layers fetched,
    /// verified and cached at full speed), so they run without their registry.
    Fetch(daemon::fetch::FetchArgs),
}

#[derive(clap::Args)]
struct RpullArgs {
    /// Image reference, e.g. registry.example.com/app:1.
    reference: String,
    /// containerd's socket.
    #[arg(long, short = 'a', default_value = "/run/containerd/containerd.sock")]
    address: std::path::PathBuf,
    /// containerd namespace.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// The snapshotter's name in containerd's config (`[proxy_plugins.NAME]`).
    #[arg(long, default_value = "lazysnap")]
    snapshotter: String,
    /// Speak plain HTTP to the registry (loopback registries do by default).
    #[arg(long)]
    plain_http: bool,
    /// Platform to pull from a multi-platform image (os/arch[/variant]); default: this machine's.
    #[arg(long)]
    platform: Option<String>,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// lazysnapd's root directory.
    #[arg(long, default_value = daemon::config::DEFAULT_ROOT)]
    root: std::path::PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line; no backtrace, whatever RUST_BACKTRACE says.
            eprintln!("lazysnap: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Convert(args) => {
            let start = std::time::Instant::now();
            let summary = runtime
                .block_on(args.run())
                .with_context(|| format!("converting {} to {}", args.src, args.dst))?;
            let (verb, done) = match &summary.soci_index {
                Some(_) => ("indexed", converter::LayerAction::Indexed),
                None => ("converted", converter::LayerAction::Converted),
            };
            let count = summary.layers.iter().filter(|l| l.action == done).count();
            eprintln!(
                "{verb} {count} of {} layers in {} manifest(s) in {:.1}s",
                summary.layers.len(),
                summary.manifests,
                start.elapsed().as_secs_f64()
            );
            if let Some(index) = &summary.soci_index {
                eprintln!("SOCI index {}", index.digest);
            }
            // The digest on stdout, for scripts.
            println!("{}", summary.root.digest);
        }
        Command::Rpull(args) => {
            let options = daemon::rpull::RpullOptions {
                address: args.address,
                namespace: args.namespace,
                snapshotter: args.snapshotter,
                plain_http: args.plain_http,
                platform: args.platform,
                ..daemon::rpull::RpullOptions::default()
            };
            let start = std::time::Instant::now();
            let report = runtime
                .block_on(daemon::rpull::rpull(&args.reference, &options))
                .with_context(|| format!("pulling {}", args.reference))?;
            for layer in &report.layers {
                println!(
                    "{}  {:>10}  {}",
                    layer.digest,
                    layer.outcome,
                    human(layer.size)
                );
            }
            println!(
                "{}: {} layers into {} in {:.2}s",
                report.image,
                report.layers.len(),
                report.snapshotter,
                start.elapsed().as_secs_f64()
            );
        }
        Command::Optimize(args) => {
            let start = std::time::Instant::now();
            let done = daemon::optimize::optimize(&args, &runtime).with_context(|| {
                format!("optimizing {} into {}", args.convert.src, args.convert.dst)
            })?;
            eprintln!(
                "the command {}; it opened {} files, now prioritized in {} ({:.1}s)",
                done.ended,
                done.files.len(),
                args.convert.dst,
                start.elapsed().as_secs_f64()
            );
            println!("{}", done.digest);
        }
        Command::Fetch(args) => {
            let start = std::time::Instant::now();
            let done = runtime.block_on(daemon::fetch::fetch(&args))?;
            for image in &done {
                println!("{}", daemon::fetch::summary(image, start.elapsed()));
            }
        }
        Command::Status(args) => {
            let status = runtime.block_on(daemon::observe::fetch_status(&args.root))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
                return Ok(());
            }
            let kinds: Vec<String> = status
                .snapshots
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            println!(
                "lazy pulling {}; snapshots: {}; cache: {} in memory, {} on disk",
                if status.lazy_pulling { "on" } else { "off" },
                if kinds.is_empty() {
                    "none".to_string()
                } else {
                    kinds.join(", ")
                },
                human(status.cache_memory_bytes),
                human(status.cache_disk_bytes)
            );
            if status.cache_write_errors + status.cache_writes_skipped_full > 0 {
                println!(
                    "cache writes given up: {} failed ({} for want of space), {} skipped at the fill limit; {} entries evicted for space",
                    status.cache_write_errors,
                    status.cache_no_space_errors,
                    status.cache_writes_skipped_full,
                    status.cache_evicted_for_space
                );
            }
            if status.preopened_mounts > 0 {
                println!(
                    "{} layer mount(s) used a TOC pre-opened while a sibling layer mounted",
                    status.preopened_mounts
                );
            }
            if !status.layers.is_empty() {
                println!(
                    "{:<20} {:<12} {:>7} {:>10} {:>10} {:>10} {:>4} {:>6}  IMAGE",
                    "LAYER", "FORMAT", "LOCAL", "SIZE", "FETCHED", "REQUESTS", "META", "NATIVE"
                );
            }
            for l in &status.layers {
                println!(
                    "{:<20} {:<12} {:>6.1}% {:>10} {:>10} {:>10} {:>4} {:>6}  {}",
                    l.layer.chars().take(19).collect::<String>(),
                    l.format,
                    daemon::observe::percent(l.local_bytes, l.total_bytes),
                    human(l.total_bytes),
                    human(l.fetched_bytes),
                    l.range_requests,
                    if l.metadata_stored { "kept" } else { "no" },
                    if l.native_copy { "made" } else { "no" },
                    l.image
                );
            }
            if !status.images.is_empty() {
                println!();
                println!(
                    "{:>7} {:>10} {:>10} {:>6}  {:<7}  IMAGE",
                    "LOCAL", "LOCAL", "SIZE", "LAYERS", "OFFLINE"
                );
            }
            for i in &status.images {
                println!(
                    "{:>6.1}% {:>10} {:>10} {:>6}  {:<7}  {}",
                    i.percent_local(),
                    human(i.local_bytes),
                    human(i.total_bytes),
                    i.layers.len(),
                    if i.offline_ready { "ready" } else { "no" },
                    i.image
                );
            }
        }
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
