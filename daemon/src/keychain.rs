//! The CRI keychain: lazysnapd serves the CRI image API (`runtime.v1.ImageService`) for
//! the kubelet (`--image-service-endpoint`), forwards every call to containerd's CRI
//! unchanged, and keeps the registry credentials each PullImage carries, in memory only,
//! so that lazily mounted layers of private images are fetched with the pod's image-pull
//! secrets. stargz-snapshotter's `[cri_keychain]` works the same way.
//!
//! The proxy forwards the request bytes as they came (it decodes a copy of PullImage to
//! read the credentials), so fields this crate does not declare, and CRI versions newer
//! than it, pass through intact.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes};
use estargz::lock;
use prost::Message as _;
use registry::{CredentialFuture, CredentialProvider, Credentials};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::{NamedService, UnaryService};
use tonic::transport::Channel;

use crate::cri::{AuthConfig, IMAGE_SERVICE, PullImageRequest};

/// The largest message passed either way: the kubelet's own limit for the image service.
const MAX_MESSAGE: usize = 16 << 20;

/// Metadata not forwarded upstream: compression is negotiated per hop, and the upstream
/// client here speaks none.
const PER_HOP: &[&str] = &["grpc-encoding", "grpc-accept-encoding"];

/// Registry credentials from CRI PullImage requests, per registry host: in memory, and
/// with [`CriKeychain::persistent`] also in a root-only file, so that the next lazysnapd
/// can keep fetching the layers it takes over.
#[derive(Default)]
pub struct CriKeychain {
    by_host: Mutex<HashMap<String, Credentials>>,
    file: Option<PathBuf>,
}

impl std::fmt::Debug for CriKeychain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<String> = self.hosts();
        f.debug_struct("CriKeychain")
            .field("hosts", &hosts)
            .finish()
    }
}

/// Docker Hub answers to several names; credentials for one are for all.
fn canonical_host(host: &str) -> &str {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => registry::DOCKER_HUB_API,
        other => other,
    }
}

/// `https://host/v1/` → `host`: kubelet passes the docker config key it matched.
fn server_host(server_address: &str) -> &str {
    let rest = server_address
        .strip_prefix("https://")
        .or_else(|| server_address.strip_prefix("http://"))
        .unwrap_or(server_address);
    rest.split('/').next().unwrap_or(rest)
}

/// What the registry client sends for `auth`, read the way containerd's CRI reads it
/// (user name and password, else identity token, else `auth`); None for anonymous.
/// Errors never include the secret.
pub fn credentials_of(auth: &AuthConfig) -> Result<Option<Credentials>, String> {
    if !auth.username.is_empty() {
        return Ok(Some(Credentials::new(&auth.username, &auth.password)));
    }
    if !auth.identity_token.is_empty() {
        return Ok(Some(Credentials::identity_token(&auth.identity_token)));
    }
    if !auth.auth.is_empty() {
        let bad = || "the `auth` field is not base64 of user:password".to_string();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .map_err(|_| bad())?;
        let text = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, password) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials::new(user, password.trim_matches('\0'))));
    }
    if !auth.registry_token.is_empty() {
        // containerd's CRI does not use it either; the pull then goes anonymous.
        return Err("registry_token is not supported (neither is it by containerd's CRI)".into());
    }
    Ok(None)
}

impl CriKeychain {
    /// A keychain kept in `file` (mode 0600; its directory should be root's only):
    /// loads what an earlier lazysnapd kept there, and rewrites it on every change.
    pub fn persistent(file: PathBuf) -> std::io::Result<CriKeychain> {
        let mut by_host = HashMap::new();
        match std::fs::read(&file) {
            Ok(bytes) => {
                let kept: HashMap<String, (String, String)> = serde_json::from_slice(&bytes)
                    .map_err(|e| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("{}: {e}", file.display()),
                        )
                    })?;
                for (host, (user, secret)) in kept {
                    by_host.insert(host, Credentials::new(user, secret));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(CriKeychain {
            by_host: Mutex::new(by_host),
            file: Some(file),
        })
    }

    /// Writes the whole keychain to its file, temp-then-rename, created 0600.
    fn save(&self, map: &HashMap<String, Credentials>) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let Some(file) = &self.file else {
            return Ok(());
        };
        let kept: HashMap<&String, (&str, &str)> = map
            .iter()
            .map(|(h, c)| (h, (c.username.as_str(), c.expose_secret())))
            .collect();
        let tmp = file.with_extension("tmp");
        let mut f = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // The mode applies only to a new file; a leftover one is narrowed too.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(&serde_json::to_vec(&kept).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Credentials>> {
        lock(&self.by_host)
    }

    /// The registry hosts credentials are kept for.
    pub fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.map().keys().cloned().collect();
        hosts.sort();
        hosts
    }

    /// Keeps the credentials of a PullImage of `image`. Returns the registry host they
    /// are kept for, or None when there are none, or they are for another registry
    /// (`server_address` names it; containerd ignores them then too). The newest pull's
    /// credentials for a host replace older ones, as a rotated secret must.
    pub fn record(&self, image: &str, auth: &AuthConfig) -> Result<Option<String>, String> {
        let reference: registry::Reference = image
            .parse()
            .map_err(|e: registry::ReferenceError| e.to_string())?;
        let host = canonical_host(reference.repository.api_host()).to_string();
        if !auth.server_address.is_empty()
            && canonical_host(server_host(&auth.server_address)) != host
        {
            return Ok(None);
        }
        let Some(credentials) = credentials_of(auth)? else {
            return Ok(None);
        };
        let mut map = self.map();
        map.insert(host.clone(), credentials);
        if let Err(e) = self.save(&map) {
            tracing::warn!(error = %e, "cannot keep CRI credentials for the next lazysnapd");
        }
        Ok(Some(host))
    }
}

impl CredentialProvider for CriKeychain {
    fn credentials<'a>(&'a self, host: &'a str) -> CredentialFuture<'a> {
        let found = self.map().get(canonical_host(host)).cloned();
        Box::pin(async move { Ok(found) })
    }
}

/// Asks each provider in turn; the first that has credentials for the host wins.
pub struct FirstOf(pub Vec<Arc<dyn CredentialProvider>>);

impl CredentialProvider for FirstOf {
    fn credentials<'a>(&'a self, host: &'a str) -> CredentialFuture<'a> {
        Box::pin(async move {
            for provider in &self.0 {
                if let Some(found) = provider.credentials(host).await? {
                    return Ok(Some(found));
                }
            }
            Ok(None)
        })
    }

    // Passed on as asked: a provider in the chain may answer per repository.
    fn credentials_for<'a>(&'a self, host: &'a str, repository: &'a str) -> CredentialFuture<'a> {
        Box::pin(async move {
            for provider in &self.0 {
                if let Some(found) = provider.credentials_for(host, repository).await? {
                    return Ok(Some(found));
                }
            }
            Ok(None)
        })
    }
}

/// Passes gRPC messages through as bytes.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// `runtime.v1.ImageService`, served next to the snapshots API on lazysnapd's socket.
#[derive(Clone)]
pub struct ImageServiceProxy {
    keychain: Arc<CriKeychain>,
    upstream: Channel,
    upstream_path: PathBuf,
}

impl ImageServiceProxy {
    /// Forwards to the CRI served on `upstream` (containerd's socket). Nothing is dialled
    /// until the first call, so containerd may start after lazysnapd.
    pub fn new(keychain: Arc<CriKeychain>, upstream: &Path) -> Self {
        ImageServiceProxy {
            keychain,
            upstream: crate::cri::unix_channel(upstream, None),
            upstream_path: upstream.to_path_buf(),
        }
    }

    /// Reads the credentials of a PullImage before forwarding it: containerd asks for the
    /// layers' snapshots while the pull is under way, and the mounts need them then.
    fn remember(&self, message: &[u8]) {
        let Ok(request) = PullImageRequest::decode(message) else {
            return; // containerd will say what is wrong with it
        };
        let (Some(image), Some(auth)) = (request.image, request.auth) else {
            return;
        };
        match self.keychain.record(&image.image, &auth) {
            Ok(Some(host)) => tracing::info!(
                image = %image.image,
                registry = %host,
                "keeping the credentials of a CRI PullImage for lazy mounts"
            ),
            Ok(None) => {}
            Err(why) => tracing::warn!(
                image = %image.image,
                "CRI PullImage credentials not usable for lazy mounts: {why}"
            ),
        }
    }

    async fn forward(
        &self,
        path: &str,
        request: tonic::Request<Bytes>,
    ) -> Result<tonic::Response<Bytes>, Status> {
        if path == format!("/{IMAGE_SERVICE}/PullImage") {
            self.remember(request.get_ref());
        }
        let path = PathAndQuery::try_from(path)
            .map_err(|e| Status::internal(format!("bad method path: {e}")))?;
        let (mut metadata, _, message) = request.into_parts();
        for key in PER_HOP {
            metadata.remove(*key);
        }
        let mut grpc = tonic::client::Grpc::new(self.upstream.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        grpc.ready().await.map_err(|e| {
            Status::unavailable(format!(
                "containerd's CRI at {} is not reachable: {e}",
                self.upstream_path.display()
            ))
        })?;
        let upstream = tonic::Request::from_parts(metadata, tonic::Extensions::default(), message);
        grpc.unary(upstream, path, RawCodec).await
    }
}

impl NamedService for ImageServiceProxy {
    const NAME: &'static str = IMAGE_SERVICE;
}

impl Service<http::Request<tonic::body::Body>> for ImageServiceProxy {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        // Every method, known here or not, goes upstream under its own path.
        let method = Forward {
            proxy: self.clone(),
            path: request.uri().path().to_string(),
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            Ok(grpc.unary(method, request).await)
        })
    }
}

struct Forward {
    proxy: ImageServiceProxy,
    path: String,
}

impl UnaryService<Bytes> for Forward {
    type Response = Bytes;
    type Future = BoxFuture<tonic::Response<Bytes>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let (proxy, path) = (self.proxy.clone(), self.path.clone());
        Box::pin(async move { proxy.forward(&path, request).await })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn auth(user: &str, password: &str) -> AuthConfig {
        AuthConfig {
            username: user.into(),
            password: password.into(),
            ..AuthConfig::default()
        }
    }

    async fn lookup(provider: &dyn CredentialProvider, host: &str) -> Option<Credentials> {
        provider.credentials(host).await.unwrap()
    }

    #[tokio::test]
    async fn credentials_are_kept_per_registry_and_replaced_by_newer_ones() {
        let keychain = CriKeychain::default();
        let host = keychain
            .record("127.0.0.1:5000/team/app:1", &auth("alice", "pw1"))
            .unwrap();
        assert_eq!(host.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(
            lookup(&keychain, "127.0.0.1:5000").await,
            Some(Credentials::new("alice", "pw1"))
        );
        assert_eq!(lookup(&keychain, "127.0.0.1:5001").await, None);
        keychain
            .record("127.0.0.1:5000/other:2", &auth("alice", "pw2"))
            .unwrap();
        assert_eq!(
            lookup(&keychain, "127.0.0.1:5000").await,
            Some(Credentials::new("alice", "pw2"))
        );
        // Docker Hub's names are one registry.
        keychain.record("nginx", &auth("bob", "hub-pw")).unwrap();
        assert_eq!(
            lookup(&keychain, "registry-1.docker.io").await,
            Some(Credentials::new("bob", "hub-pw"))
        );
        assert_eq!(keychain.hosts(), ["127.0.0.1:5000", "registry-1.docker.io"]);
    }

    /// What the next lazysnapd needs to keep fetching a taken-over layer survives, in
    /// a file only root can read; an in-memory keychain writes nothing.
    #[tokio::test]
    async fn a_persistent_keychain_is_read_back_from_a_root_only_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cri-credentials.json");
        let kept = CriKeychain::persistent(file.clone()).unwrap();
        assert!(lookup(&kept, "reg.example:5000").await.is_none());
        kept.record("reg.example:5000/app:1", &auth("alice", "s3cret"))
            .unwrap();
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let next = CriKeychain::persistent(file.clone()).unwrap();
        assert_eq!(
            lookup(&next, "reg.example:5000").await,
            Some(Credentials::new("alice", "s3cret"))
        );
        // A rotated secret replaces the kept one.
        next.record("reg.example:5000/app:1", &auth("alice", "n3w"))
            .unwrap();
        let third = CriKeychain::persistent(file).unwrap();
        assert_eq!(
            lookup(&third, "reg.example:5000").await,
            Some(Credentials::new("alice", "n3w"))
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[tokio::test]
    async fn credentials_for_another_registry_are_not_kept() {
        let keychain = CriKeychain::default();
        let mut other = auth("alice", "pw");
        other.server_address = "https://elsewhere.example".into();
        assert_eq!(keychain.record("ghcr.io/a/b:1", &other).unwrap(), None);
        assert_eq!(lookup(&keychain, "ghcr.io").await, None);
        other.server_address = "https://ghcr.io/v2/".into();
        assert!(keychain.record("ghcr.io/a/b:1", &other).unwrap().is_some());
        let mut hub = auth("bob", "pw");
        hub.server_address = "https://index.docker.io/v1/".into();
        assert!(
            keychain
                .record("docker.io/library/busybox", &hub)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn each_form_of_auth_config_is_read_as_containerd_reads_it() {
        let basic = base64::engine::general_purpose::STANDARD.encode("carol:pa:ss\0");
        let encoded = AuthConfig {
            auth: basic,
            ..AuthConfig::default()
        };
        assert_eq!(
            credentials_of(&encoded).unwrap(),
            Some(Credentials::new("carol", "pa:ss"))
        );
        let identity = AuthConfig {
            identity_token: "refresh-tok".into(),
            ..AuthConfig::default()
        };
        assert_eq!(
            credentials_of(&identity).unwrap(),
            Some(Credentials::identity_token("refresh-tok"))
        );
        assert_eq!(credentials_of(&AuthConfig::default()).unwrap(), None);
        let garbage = AuthConfig {
            auth: "not base64 secret!".into(),
            ..AuthConfig::default()
        };
        let err = credentials_of(&garbage).unwrap_err();
        assert!(!err.contains("secret"), "{err}");
        let token = AuthConfig {
            registry_token: "bearer-secret".into(),
            ..AuthConfig::default()
        };
        assert!(
            !credentials_of(&token)
                .unwrap_err()
                .contains("bearer-secret")
        );
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let mut config = auth("alice", "hunter2");
        config.identity_token = "tok-secret".into();
        let text = format!("{config:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("tok-secret") && !text.contains("alice"),
            "{text}"
        );
        let keychain = CriKeychain::default();
        keychain.record("127.0.0.1:5000/a:1", &config).unwrap();
        let text = format!("{keychain:?}");
        assert!(
            text.contains("127.0.0.1:5000") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn first_of_asks_in_order() {
        let keychain = Arc::new(CriKeychain::default());
        keychain
            .record("reg.example/a:1", &auth("cri", "1"))
            .unwrap();
        let file = Arc::new(registry::StaticCredentials(HashMap::from([
            ("reg.example".to_string(), Credentials::new("file", "2")),
            ("other.example".to_string(), Credentials::new("file", "3")),
        ])));
        let chain = FirstOf(vec![keychain, file]);
        assert_eq!(
            lookup(&chain, "reg.example").await,
            Some(Credentials::new("cri", "1"))
        );
        assert_eq!(
            lookup(&chain, "other.example").await,
            Some(Credentials::new("file", "3"))
        );
        assert_eq!(lookup(&chain, "none.example").await, None);
    }
}
