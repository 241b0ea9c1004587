//! containerd snapshot semantics.
