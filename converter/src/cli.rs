//! `lazysnap convert`: the arguments and what they mean. The binary only parses them,
//! builds a runtime and prints the outcome.

use std::path::PathBuf;

use clap::Args;
use estargz::{OutputFormat, WriterOptions};

use crate::error::{Error, Result};
use crate::image::{ConvertOptions, Location, Summary, convert_image};
use crate::oci::Platform;
pub use crate::prioritized::{PrioritizedList, read_prioritized};
use crate::progress::Progress;
use crate::soci_index::{SociOptions, SociVersion, index_image};

/// Converts an image to eStargz or zstd:chunked, or indexes its gzip layers for SOCI
/// (`--soci`, the layers untouched).
///
/// SRC and DST are registry references (`host/repo:tag`) or OCI image layouts
/// (`oci:DIR[:TAG]`).
#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// Source image: a registry reference or `oci:DIR[:TAG]`.
    pub src: String,
    /// Destination: a registry reference or `oci:DIR[:TAG]`.
    pub dst: String,
    /// Write eStargz layers (the default).
    #[arg(long, conflicts_with = "zstdchunked")]
    pub estargz: bool,
    /// Write zstd:chunked layers.
    #[arg(long)]
    pub zstdchunked: bool,
    /// Which zstd:chunked form: `cstorage` (containers/storage today: 64-byte footer,
    /// tar-split) or `stargz` (stargz-snapshotter's older form: 40-byte footer).
    #[arg(
        long,
        value_name = "FORM",
        default_value = "cstorage",
        requires = "zstdchunked"
    )]
    pub zstdchunked_format: ZstdForm,
    /// Platform to convert from a multi-platform image (os/arch[/variant]); repeat for
    /// several (an index is then written). Default: this machine's.
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Vec<String>,
    /// Convert every platform of a multi-platform image and write an index.
    #[arg(long, conflicts_with = "platform")]
    pub all_platforms: bool,
    /// Largest chunk of a file, in bytes (default 4 MiB).
    #[arg(long, value_name = "BYTES")]
    pub chunk_size: Option<u64>,
    /// gzip 0-9 (default 9) or zstd 1-22 (default 3).
    #[arg(long, value_name = "LEVEL")]
    pub compression_level: Option<i32>,
    /// File listing paths to put first in their layer (prefetched at start), one per
    /// line, in first-access order.
    #[arg(long, value_name = "FILE")]
    pub prioritize: Option<PathBuf>,
    /// Speak plain HTTP to the registries (loopback registries do by default).
    #[arg(long)]
    pub plain_http: bool,
    /// Compression threads (default: one per core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Print plain progress lines even on a terminal.
    #[arg(long)]
    pub no_progress_bars: bool,
    /// Keep the layers as they are and write a SOCI index for them instead (zTOCs of the
    /// gzip layers), so lazysnapd (and soci-snapshotter) pull them lazily.
    #[arg(long, conflicts_with_all = ["estargz", "zstdchunked", "prioritize", "all_platforms"])]
    pub soci: bool,
    /// SOCI index version: v2 annotates the image manifest (a new image digest) and
    /// writes an index of both, as `soci convert` does; v1 leaves the image as it is
    /// and is found through the registry's referrers.
    #[arg(long, value_name = "VERSION", default_value = "v2", requires = "soci")]
    pub soci_version: SociVersion,
    /// Bytes of uncompressed tar between two checkpoints of a zTOC (default 2 MiB; soci's
    /// is 4 MiB).
    #[arg(long, value_name = "BYTES", requires = "soci")]
    pub span_size: Option<u64>,
    /// Layers smaller than this get no zTOC and are pulled whole (default 10 MiB).
    #[arg(long, value_name = "BYTES", requires = "soci")]
    pub min_layer_size: Option<u64>,
    /// The build tool a zTOC names (default `lazysnap VERSION`; soci's CLI writes
    /// `AWS SOCI CLI v0.2`, and with it and the same span size the zTOCs are soci's, byte
    /// for byte).
    #[arg(long, value_name = "STRING", requires = "soci")]
    pub soci_build_tool: Option<String>,
    /// A `--prioritize` list (what `lazysnap optimize` records): the spans holding the
    /// ranges it names go into a prefetch artifact per layer, as soci writes them.
    #[arg(long, value_name = "FILE", requires = "soci")]
    pub soci_prefetch: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ZstdForm {
    Cstorage,
    Stargz,
}

impl ConvertArgs {
    pub fn options(&self) -> Result<ConvertOptions> {
        let format = match (self.zstdchunked, self.zstdchunked_format) {
            (false, _) => OutputFormat::Estargz,
            (true, ZstdForm::Cstorage) => OutputFormat::ZstdChunked,
            (true, ZstdForm::Stargz) => OutputFormat::StargzZstdChunked,
        };
        let mut writer = WriterOptions {
            format,
            compression_level: self.compression_level,
            threads: self.threads,
            ..WriterOptions::default()
        };
        if let Some(c) = self.chunk_size {
            writer.chunk_size = c;
        }
        if let Some(p) = &self.prioritize {
            let list = read_prioritized(p)?;
            writer.prioritized_files = list.files;
            writer.prefetch_ranges = list.ranges;
        }
        let platforms = self
            .platform
            .iter()
            .map(|p| Platform::parse(p).map_err(Error::BadOption))
            .collect::<Result<Vec<_>>>()?;
        Ok(ConvertOptions {
            writer,
            platforms,
            all_platforms: self.all_platforms,
            plain_http: self.plain_http,
        })
    }

    /// How to index (`--soci`).
    pub fn soci_options(&self) -> Result<SociOptions> {
        let defaults = SociOptions::default();
        let platform = match self.platform.as_slice() {
            [] => None,
            [one] => Some(Platform::parse(one).map_err(Error::BadOption)?),
            _ => return Err(Error::BadOption("--soci indexes one platform".into())),
        };
        Ok(SociOptions {
            version: self.soci_version,
            span_size: self.span_size.unwrap_or(defaults.span_size),
            min_layer_size: self.min_layer_size.unwrap_or(defaults.min_layer_size),
            plain_http: self.plain_http,
            platform,
            threads: self.threads,
            build_tool: self.soci_build_tool.clone().unwrap_or(defaults.build_tool),
            prefetch: match &self.soci_prefetch {
                Some(path) => Some(read_prioritized(path)?),
                None => None,
            },
        })
    }

    /// Runs the conversion, with progress on stderr.
    pub async fn run(&self) -> Result<Summary> {
        let src: Location = self.src.parse()?;
        let dst: Location = self.dst.parse()?;
        let progress = if self.no_progress_bars {
            Progress::lines()
        } else {
            Progress::auto()
        };
        if self.soci {
            return index_image(&src, &dst, &self.soci_options()?, &progress).await;
        }
        let opts = self.options()?;
        convert_image(&src, &dst, &opts, &progress).await
    }
}
