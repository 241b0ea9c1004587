//! lazysnapd: containerd's lazy-pulling snapshotter, served as a proxy plugin.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use daemon::config::Config;
use daemon::server::Event;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

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

/// The signals lazysnapd handles (see [`run`]); until their handlers are in place they
/// are held back, so that one sent while the daemon starts is handled, not fatal.
fn daemon_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::Signal;
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [
        Signal::SIGHUP,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

extern "C" fn hold_signals_back() {
    let _ = daemon_signals().thread_block();
}

/// Holds the daemon's signals back from lazysnapd's first instruction after the dynamic
/// loader (an initializer runs before Rust's runtime and `main`): without it their
/// default action, termination, ran for the first milliseconds after exec. Threads
/// started later inherit the mask; [`let_signals_in`] opens it where handlers are set.
#[allow(unsafe_code)] // placing a function pointer in .init_array is an unsafe attribute
#[used]
#[unsafe(link_section = ".init_array")]
static HOLD_SIGNALS_BACK: extern "C" fn() = hold_signals_back;

/// Lets the held-back signals in on this thread (pending ones arrive now).
fn let_signals_in() {
    let _ = daemon_signals().thread_unblock();
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.hold_fds.is_some() || args.unmount_all {
        // Neither handles these signals: their default actions are meant.
        let_signals_in();
    }
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
    fusefs::heap::unmap_big_frees();
    let config = match load_config(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("lazysnapd: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let log = init_logging(&config.log_level);
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
    match runtime.block_on(run(args, config, log)) {
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

type LogFilter = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// A non-empty `RUST_LOG` wins over the configured level.
fn env_log_filter() -> Option<EnvFilter> {
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(v).ok(),
        _ => None,
    }
}

fn log_filter(level: &str) -> EnvFilter {
    env_log_filter()
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"))
}

fn init_logging(level: &str) -> LogFilter {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(log_filter(level));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .init();
    handle
}

/// Every signal a daemon is usually sent is handled on purpose: TERM, INT and QUIT stop
/// it (running containers keep their layers through the fd holder), HUP reloads the
/// configuration, USR1 logs the status, USR2 is logged and ignored, and PIPE is ignored
/// (Rust's runtime sets that before main), so a closed log pipe never kills it.
async fn run(args: Args, config: Config, log: LogFilter) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut quit = signal(SignalKind::quit()).context("installing the SIGQUIT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    // Every handler is in place (this runs on the main thread, which block_on lends to
    // it): a signal held back since exec is handled now. Worker threads keep them
    // blocked, so the kernel hands every one to this thread.
    let_signals_in();
    let (events, received) = tokio::sync::mpsc::channel(4);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut log_level = config.log_level.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
                _ = quit.recv() => { tracing::info!("SIGQUIT: shutting down"); break }
                _ = hup.recv() => match load_config(&args) {
                    Ok(fresh) => {
                        tracing::info!("SIGHUP: reloading the configuration");
                        if fresh.log_level != log_level {
                            match log.reload(log_filter(&fresh.log_level)) {
                                Ok(()) if env_log_filter().is_some() => tracing::info!(
                                    level = %fresh.log_level,
                                    "SIGHUP: log level changed in the config; RUST_LOG still wins"
                                ),
                                Ok(()) => tracing::info!(level = %fresh.log_level, "SIGHUP: log level changed"),
                                Err(e) => tracing::error!("SIGHUP: log level kept: {e}"),
                            }
                            log_level = fresh.log_level.clone();
                        }
                        let _ = events.send(Event::Reload(Box::new(fresh))).await;
                    }
                    Err(e) => tracing::error!("SIGHUP: the configuration is kept as it was: {e:#}"),
                },
                _ = usr1.recv() => { let _ = events.send(Event::LogStatus).await; }
                _ = usr2.recv() => tracing::info!("SIGUSR2: ignored (SIGHUP reloads the configuration, SIGUSR1 logs the status)"),
            }
        }
        let _ = stop.send(());
    });
    let shutdown = async move {
        let _ = stopped.await;
    };
    daemon::server::run(&config, shutdown, received).await
}
