//! Fuzz targets for lazysnap's parsers, for cargo-fuzz (libFuzzer, coverage-guided):
//! `footer`, `toc`, `layer` and `tar` (estargz's footer, TOC, blob and tar parsing) and
//! `fuse` (FUSE request decoding and handling). See README.md.

pub mod alloc_count;
pub mod seeds;
pub mod targets;
