//! Everything lazysnap says to an OCI registry: references, manifests, auth, range reads, push.
