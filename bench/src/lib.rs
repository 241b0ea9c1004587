//! lazysnap-bench: cold-start measurements of lazysnap against the ordinary full pull.
//!
//! Also the shared parts of the other benchmark binaries: [`layergen`] makes
//! deterministic, realistic layers from a seed; [`stats`] summarises repeated timings.

pub mod layergen;
pub mod stats;
