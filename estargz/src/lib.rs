//! The eStargz and zstd:chunked layer formats: TOC model, footers, reader and writer.
//!
//! Free of I/O libraries: bytes come in through a [`BlobReader`] (reading) or std
//! `Read`/`Write` (converting).

mod annotation;
mod blob;
mod cancel;
mod chunk;
pub mod digest;
mod error;
mod footer;
mod index;
mod lock;
mod reader;
mod span_source;
mod tar;
mod tarsplit;
#[cfg(test)]
mod tests;
mod toc;
mod writer;

pub use annotation::{
    LEGACY_MANIFEST_CHECKSUM_ANNOTATION, LEGACY_MANIFEST_POSITION_ANNOTATION,
    MANIFEST_CHECKSUM_ANNOTATION, MANIFEST_POSITION_ANNOTATION, TARSPLIT_POSITION_ANNOTATION,
    TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION,
};
pub use blob::{BlobError, BlobErrorKind, BlobFuture, BlobReader, VecBlob};
pub use cancel::{Cancel, CancelOnDrop};
pub use chunk::{decompress_chunk, decompress_chunk_into, decompress_chunk_window};
pub use digest::{Digest, Sha256Sum};
pub use error::{Error, Result};
pub use footer::{
    ESTARGZ_FOOTER_SIZE, Footer, Format, LEGACY_FOOTER_SIZE, MAX_FOOTER_FETCH,
    STARGZ_ZSTD_FOOTER_SIZE, ZSTD_CHUNKED_FOOTER_SIZE, estargz_footer, legacy_stargz_footer,
    parse_footer, stargz_zstd_footer, zstd_chunked_footer,
};
pub use index::{
    BYTES_PER_IMPLIED_DIR, Chunk, EntryKind, EntryRef, Index, MAX_CHUNK_SIZE, MAX_PATH_LEN, NodeId,
    PARSE_MEMORY_FACTOR, normalize_path,
};
pub use lock::lock;
pub use reader::{
    FetchedToc, Layer, OpenOptions, ParsedToc, TocJson, fetch_toc, parse_toc, read_toc_json,
    toc_json_size,
};
pub use span_source::SpanSource;
pub use toc::{
    LANDMARK_CONTENTS, MAX_TOC_SIZE, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME,
    Timestamp, Toc, TocEntry,
};
pub use writer::{OutputFormat, WriteOutput, WriterOptions, convert};
