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
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let config = match load_config(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("lazysnapd: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(&config.log_level);
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
