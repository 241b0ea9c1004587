//! Converting a tar stream (plain, gzip or zstd) into eStargz or zstd:chunked.
//!
//! The main thread parses the tar and cuts it into members (one per chunk, plus runs of
//! headers); worker threads compress members in parallel; the main thread writes them in
//! order. Memory stays bounded by the number of members in flight.

mod converter;
mod pipeline;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::ops::Range;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use crate::digest::Sha256Sum;
use crate::error::{Error, Result};
use converter::Converter;
use pipeline::{HashingWriter, Job, Pipeline, decompressed, worker};

/// The layer format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// eStargz (gzip members, TOC tar entry, 51-byte footer).
    Estargz,
    /// zstd:chunked as containers/storage writes it today (64-byte `GNUlInUx` footer,
    /// tar-split); the uncompressed tar is the input tar, byte for byte, unless files
    /// are prioritized.
    ZstdChunked,
    /// zstd:chunked as stargz-snapshotter writes it (40-byte `GnUlInUx` footer,
    /// eStargz TOC and landmarks).
    StargzZstdChunked,
}

/// Conversion options.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub format: OutputFormat,
    /// Largest chunk of a regular file; each chunk is its own member. Default 4 MiB.
    pub chunk_size: u64,
    /// gzip 0..=9 (default 9, as stargz-snapshotter) or zstd 1..=22 (default 3).
    pub compression_level: Option<i32>,
    /// Files to put first, in first-access order, followed by `.prefetch.landmark`.
    pub prioritized_files: Vec<String>,
    /// Byte ranges of prioritized files that were read at start-up (`lazysnap
    /// optimize`), by path. When any are given, such a file is cut into chunks at the
    /// ranges' edges and the chunks holding them are marked `lazysnapPrefetch`; the
    /// chunks of prioritized files without ranges are all marked.
    pub prefetch_ranges: HashMap<String, Vec<Range<u64>>>,
    /// Compression threads; 0 means one per core.
    pub threads: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            format: OutputFormat::Estargz,
            chunk_size: 4 << 20,
            compression_level: None,
            prioritized_files: Vec::new(),
            prefetch_ranges: HashMap::new(),
            threads: 0,
        }
    }
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct WriteOutput {
    /// sha256 of the blob written.
    pub blob_digest: Sha256Sum,
    pub blob_size: u64,
    /// sha256 of the uncompressed tar stream (the layer's DiffID).
    pub diff_id: Sha256Sum,
    /// sha256 of the uncompressed TOC JSON.
    pub toc_digest: Sha256Sum,
    /// sha256 of the compressed TOC bytes (zstd:chunked's manifest checksum).
    pub manifest_checksum: Sha256Sum,
    pub uncompressed_size: u64,
    /// Annotations to set on the layer descriptor.
    pub annotations: BTreeMap<String, String>,
}

/// Converts the tar stream `input` (plain, gzip or zstd, detected) into a layer written
/// to `output`.
pub fn convert<R: Read, W: Write>(
    input: R,
    output: W,
    opts: &WriterOptions,
) -> Result<WriteOutput> {
    if opts.chunk_size == 0 || opts.chunk_size > crate::MAX_CHUNK_SIZE {
        return Err(Error::BadOption(format!(
            "chunk size {} (must be 1 byte..{} bytes: bigger chunks are not mounted lazily)",
            opts.chunk_size,
            crate::MAX_CHUNK_SIZE
        )));
    }
    let level = match (opts.format, opts.compression_level) {
        (OutputFormat::Estargz, None) => 9,
        (OutputFormat::Estargz, Some(l)) if (0..=9).contains(&l) => l,
        (_, None) => 3,
        (_, Some(l)) if (1..=22).contains(&l) => l,
        (_, Some(l)) => return Err(Error::BadOption(format!("compression level {l}"))),
    };
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let tar = decompressed(input)?;
    std::thread::scope(|scope| {
        let (job_tx, job_rx) = sync_channel::<Job>(threads);
        let (res_tx, res_rx) = sync_channel::<(u64, Result<Vec<u8>>)>(threads * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let gzip = opts.format == OutputFormat::Estargz;
        for _ in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let res_tx = res_tx.clone();
            scope.spawn(move || worker(job_rx, res_tx, gzip, level));
        }
        drop(res_tx);
        let pipeline = Pipeline {
            jobs: Some(job_tx),
            results: res_rx,
            max_in_flight: threads * 2,
            in_flight: 0,
            next_write: 0,
            ready: BTreeMap::new(),
            out: HashingWriter {
                inner: output,
                hasher: Sha256::new(),
                count: 0,
            },
            spans: Vec::new(),
        };
        let mut conv = Converter::new(opts, level, pipeline)?;
        let result = conv.run(tar);
        // Closing the job channel lets the workers exit even after an error.
        conv.pipeline.jobs = None;
        result
    })
}
