//! Everything lazysnap says to an OCI registry: references, manifests, auth, range reads, push.
//!
//! One [`Client`] per daemon: it holds the hosts configuration, connection pools,
//! per-host connection limits, learnt auth schemes and tokens. A [`RemoteBlob`] reads one
//! blob with range requests and implements [`estargz::BlobReader`].

mod auth;
mod blob;
mod body;
mod client;
mod config;
mod endpoints;
mod error;
pub mod go_duration;
pub mod hosts_dir;
mod manifest;
pub mod media_types;
pub mod platform;
mod push;
mod reference;
mod referrers;
mod request;
mod retry;

pub use auth::{
    Anonymous, Challenge, CredentialFuture, CredentialProvider, Credentials, DockerConfig,
    StaticCredentials, parse_challenges,
};
pub use blob::{RANGELESS_PREFIX_LIMIT, RemoteBlob};
pub use body::{ContentRange, parse_content_range};
pub use client::Client;
pub use config::{
    HostConfig, HttpConfig, MirrorConfig, RegistryConfig, ResolverConfig, is_loopback,
};
pub use error::{Error, Result, Target};
pub use estargz::digest::{Algorithm, Digest, DigestParseError, Hasher};
pub use manifest::{
    Descriptor, Extra, FetchedManifest, ImageIndex, ImageManifest, MAX_MANIFEST_SIZE, Manifest,
    ResolvedImage, choose_platform,
};
pub use media_types::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
pub use platform::Platform;
pub use push::PushOutcome;
pub use reference::{DOCKER_HUB, DOCKER_HUB_API, Reference, ReferenceError, Repository, api_host};
