//! The eStargz and zstd:chunked layer formats: TOC model, footers, reader and writer.
//!
//! Free of I/O libraries: bytes come in through a [`BlobReader`].

mod blob;

pub use blob::{BlobError, BlobErrorKind, BlobFuture, BlobReader, VecBlob};
