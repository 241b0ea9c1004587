//! Fuzz targets for lazysnap's parsers, for cargo-fuzz (libFuzzer, coverage-guided):
//! `footer`, `toc`, `layer` and `tar` (estargz's footer, TOC, blob and tar parsing),
//! `fuse` (FUSE request decoding and handling), `gzip_span` (SOCI's checkpoints into
//! gzip streams), `ztoc` (SOCI's zTOCs and the tar headers they record) and `pyc` (a
//! compiled Python module's imports). See README.md.

pub mod alloc_count;
pub mod seeds;
pub mod targets;
