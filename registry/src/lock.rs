//! The crate's one way to take a std `Mutex`: the workspace's, kept in estargz.

pub(crate) use estargz::lock;
