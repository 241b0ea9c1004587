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
    /// Convert an image to eStargz or zstd:chunked (registry or oci:DIR[:TAG], both ways).
    Convert(converter::cli::ConvertArgs),
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
            let converted = summary
                .layers
                .iter()
                .filter(|l| l.action == converter::LayerAction::Converted)
                .count();
            eprintln!(
                "converted {converted} of {} layers in {} manifest(s) in {:.1}s",
                summary.layers.len(),
                summary.manifests,
                start.elapsed().as_secs_f64()
            );
            // The digest on stdout, for scripts.
            println!("{}", summary.root.digest);
        }
    }
    Ok(())
}
