//! Conversion of images and layers into eStargz and zstd:chunked.
//!
//! [`convert_image`] converts a whole image between registries and OCI image layouts
//! (`oci:DIR[:TAG]`): every layer goes through a temp file and [`estargz::convert`], the
//! config's diff_ids and the manifest are rewritten, and the destination reference is
//! written last, so a failed conversion never looks like a finished one. [`cli`] holds
//! the `lazysnap convert` command line.

pub mod cli;
mod endpoint;
mod error;
mod image;
pub mod layer;
mod layout;
pub mod oci;
mod prioritized;
mod progress;
mod remote;
pub mod soci_index;

pub use error::{Error, Result};
pub use estargz::{OutputFormat, WriterOptions};
pub use image::{
    ConvertOptions, LayerAction, LayerSummary, Location, Summary, convert_image, format_name,
};
pub use layout::Layout;
pub use progress::{Progress, Task, human};
