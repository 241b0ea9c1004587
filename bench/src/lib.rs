//! lazysnap-bench: cold-start measurements of lazysnap against the ordinary full pull.
//!
//! [`cold`] is lazysnap-bench itself, [`warm`] its warm mode. Also the shared parts of the other benchmark binaries: [`layergen`] makes
//! deterministic, realistic layers from a seed; [`stats`] summarises repeated timings.

pub mod cold;
pub mod layergen;
pub mod stats;
pub mod warm;
