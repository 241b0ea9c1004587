//! SOCI indexes for ordinary gzip layers (issue 24): the inflater checkpoints that give
//! random access into a gzip stream ([`gzip_checkpoints`]) and their serialized form
//! ([`checkpoint_blob`]); the tar entries as soci records them ([`tar_toc`]); the zTOC
//! that holds both ([`ztoc`]) and builds it from a layer ([`ztoc_builder`]); a zTOC
//! checked and laid out as spans and file pieces ([`layout`]), and a layer opened through
//! it as an estargz layer whose chunks are span pieces ([`layer`]).

pub mod checkpoint_blob;
mod flatbuffer;
pub mod gzip_checkpoints;
pub mod index_names;
pub mod layer;
pub mod layout;
pub mod prefetch_artifact;
mod raw_inflater;
pub mod tar_toc;
pub mod ztoc;
pub mod ztoc_builder;

pub use checkpoint_blob::{BlobError, Checkpoints};
pub use gzip_checkpoints::{
    Checkpoint, Error, WINDOW_SIZE, build_checkpoints, inflate_from, inflate_staged,
};
