//! SOCI indexes for ordinary gzip layers (issue 24). So far: the inflater checkpoints that
//! give random access into a gzip stream ([`gzip_checkpoints`]), on which zTOC spans rest,
//! and their serialized form in a zTOC ([`checkpoint_blob`]).

pub mod checkpoint_blob;
mod flatbuffer;
pub mod gzip_checkpoints;
pub mod ztoc;
mod raw_inflater;

pub use checkpoint_blob::{BlobError, Checkpoints};
pub use gzip_checkpoints::{Checkpoint, Error, WINDOW_SIZE, build_checkpoints, inflate_from};
