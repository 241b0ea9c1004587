//! lazysnapd: containerd's lazy-pulling snapshotter, served as a proxy plugin.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use daemon::config::Config;
use tokio::signal::unix::{SignalKind, signal};

/// Flags share their names with containerd-stargz-grpc's, so service files carry over.
#[derive(Parser, Debug)]
#[command(
    name = "lazysnapd",
    version,
    about = "Lazy-pulling snapshotter for containerd"
)]
struct Args {
    /// TOML configuration file (optional; every setting has a default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// State directory (overrides the config file).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Unix socket to serve on (overrides the config file).
    #[arg(long)]
    address: Option<PathBuf>,
    /// Log level (overrides the config file; RUST_LOG overrides both).
    #[arg(long)]
    log_level: Option<String>,
    /// With lazysnapd stopped: stop the fd holder and unmount every lazily mounted layer
    /// it kept alive (running containers on them lose them), then exit.
    #[arg(long)]
    unmount_all: bool,
    /// Run as the fd holder on this socket (lazysnapd starts it itself).
    #[arg(long, hide = true)]
    hold_fds: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(socket) = &args.hold_fds {
        // Before anything else: the holder holds fds and nothing more.
        return match snapshotter::holder::serve(socket) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lazysnapd fd holder: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let config = match load_config(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("lazysnapd: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(&config.log_level);
    if args.unmount_all {
        return match daemon::server::unmount_all(&config) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lazysnapd: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("lazysnapd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(root) = &args.root {
        config.root = root.clone();
    }
    if let Some(address) = &args.address {
        config.address = address.clone();
    }
    if let Some(level) = &args.log_level {
        config.log_level = level.clone();
    }
    config.validate()?;
    Ok(config)
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    daemon::server::run(&config, shutdown).await
}
