//! The part of the Kubernetes CRI v1 API (package `runtime.v1`) lazysnap speaks: the
//! messages the ImageService proxy reads (PullImage's image and credentials) and a small
//! client, enough to pull images through the proxy and run a host-network pod through
//! containerd's CRI plugin (the tests use it). Debian ships neither crictl nor the CRI
//! protos, so the messages are declared here by hand with prost; field numbers follow
//! k8s.io/cri-api `pkg/apis/runtime/v1/api.proto`. Fields nobody here sets or reads are
//! left out: protobuf skips unknown fields on decode and omitted fields are simply
//! absent on encode. (The proxy forwards the original bytes, so nothing is lost there.)

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use snapshotter::client::unix_connector;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
    #[prost(string, tag = "4")]
    pub runtime_api_version: String,
}

/// `NamespaceMode` (TARGET = 3 unused).
pub const NAMESPACE_MODE_POD: i32 = 0;
pub const NAMESPACE_MODE_CONTAINER: i32 = 1;
pub const NAMESPACE_MODE_NODE: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct NamespaceOption {
    #[prost(int32, tag = "1")]
    pub network: i32,
    #[prost(int32, tag = "2")]
    pub pid: i32,
    #[prost(int32, tag = "3")]
    pub ipc: i32,
    /// A user namespace (`NAMESPACE_MODE_POD` with mappings) or the node's.
    #[prost(message, optional, tag = "5")]
    pub userns_options: Option<UserNamespace>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UserNamespace {
    #[prost(int32, tag = "1")]
    pub mode: i32,
    #[prost(message, repeated, tag = "2")]
    pub uids: Vec<IdMapping>,
    #[prost(message, repeated, tag = "3")]
    pub gids: Vec<IdMapping>,
}

/// Container IDs `container_id..+length` are host IDs `host_id..+length`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IdMapping {
    #[prost(uint32, tag = "1")]
    pub host_id: u32,
    #[prost(uint32, tag = "2")]
    pub container_id: u32,
    #[prost(uint32, tag = "3")]
    pub length: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxSandboxSecurityContext {
    #[prost(message, optional, tag = "1")]
    pub namespace_options: Option<NamespaceOption>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxPodSandboxConfig {
    #[prost(string, tag = "1")]
    pub cgroup_parent: String,
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<LinuxSandboxSecurityContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "7")]
    pub annotations: HashMap<String, String>,
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PodSandboxConfig>,
    #[prost(string, tag = "2")]
    pub runtime_handler: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxResponse {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

/// The request of StopPodSandbox and of RemovePodSandbox: both carry only the ID.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxIdRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

/// The empty responses (StopPodSandbox, RemovePodSandbox, StartContainer, RemoveImage...).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
    #[prost(map = "string, string", tag = "2")]
    pub annotations: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxContainerSecurityContext {
    #[prost(message, optional, tag = "3")]
    pub namespace_options: Option<NamespaceOption>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxContainerConfig {
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<LinuxContainerSecurityContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<ContainerMetadata>,
    #[prost(message, optional, tag = "2")]
    pub image: Option<ImageSpec>,
    #[prost(string, repeated, tag = "3")]
    pub command: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub args: Vec<String>,
    #[prost(string, tag = "5")]
    pub working_dir: String,
    #[prost(message, repeated, tag = "6")]
    pub envs: Vec<KeyValue>,
    #[prost(string, tag = "11")]
    pub log_path: String,
    #[prost(message, optional, tag = "15")]
    pub linux: Option<LinuxContainerConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<ContainerConfig>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerResponse {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

/// The request of StartContainer and of RemoveContainer: both carry only the ID.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerIdRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StopContainerRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// Seconds to wait before SIGKILL; 0 kills at once.
    #[prost(int64, tag = "2")]
    pub timeout: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

/// `ContainerState`: CREATED = 0, RUNNING = 1, EXITED = 2, UNKNOWN = 3.
pub const CONTAINER_EXITED: i32 = 2;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(int64, tag = "6")]
    pub finished_at: i64,
    #[prost(int32, tag = "7")]
    pub exit_code: i32,
    #[prost(string, tag = "9")]
    pub image_ref: String,
    #[prost(string, tag = "10")]
    pub reason: String,
    #[prost(string, tag = "11")]
    pub message: String,
    #[prost(string, tag = "15")]
    pub log_path: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<ContainerStatus>,
}

/// Registry credentials the kubelet sends with PullImage (from the pod's image-pull
/// secrets or its own docker config). Debug output redacts every secret.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct AuthConfig {
    #[prost(string, tag = "1")]
    pub username: String,
    #[prost(string, tag = "2")]
    pub password: String,
    /// base64 of `username:password`.
    #[prost(string, tag = "3")]
    pub auth: String,
    /// The registry the credentials are for (`https://host`, `host`, or docker's
    /// `https://index.docker.io/v1/`); empty means the image's registry.
    #[prost(string, tag = "4")]
    pub server_address: String,
    /// An OAuth2 refresh token.
    #[prost(string, tag = "5")]
    pub identity_token: String,
    /// A bearer token for the registry itself.
    #[prost(string, tag = "6")]
    pub registry_token: String,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("AuthConfig")
            .field("username", &set(&self.username))
            .field("password", &set(&self.password))
            .field("auth", &set(&self.auth))
            .field("server_address", &self.server_address)
            .field("identity_token", &set(&self.identity_token))
            .field("registry_token", &set(&self.registry_token))
            .finish()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    #[prost(message, optional, tag = "2")]
    pub auth: Option<AuthConfig>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageResponse {
    #[prost(string, tag = "1")]
    pub image_ref: String,
}

/// The request of ImageStatus (verbose = 2 left out) and of RemoveImage: the image spec.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpecRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Image {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, repeated, tag = "2")]
    pub repo_tags: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    pub repo_digests: Vec<String>,
    #[prost(uint64, tag = "4")]
    pub size: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageStatusResponse {
    /// Absent when the runtime does not have the image.
    #[prost(message, optional, tag = "1")]
    pub image: Option<Image>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageFilter {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListImagesRequest {
    #[prost(message, optional, tag = "1")]
    pub filter: Option<ImageFilter>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListImagesResponse {
    #[prost(message, repeated, tag = "1")]
    pub images: Vec<Image>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageFsInfoRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FilesystemIdentifier {
    #[prost(string, tag = "1")]
    pub mountpoint: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UInt64Value {
    #[prost(uint64, tag = "1")]
    pub value: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FilesystemUsage {
    #[prost(int64, tag = "1")]
    pub timestamp: i64,
    #[prost(message, optional, tag = "2")]
    pub fs_id: Option<FilesystemIdentifier>,
    #[prost(message, optional, tag = "3")]
    pub used_bytes: Option<UInt64Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageFsInfoResponse {
    #[prost(message, repeated, tag = "1")]
    pub image_filesystems: Vec<FilesystemUsage>,
}

/// Longest a single call may take (PullImage and RunPodSandbox are the slow ones).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

const RUNTIME: &str = "runtime.v1.RuntimeService";
/// The gRPC service name of the CRI image API, which the keychain proxies.
pub const IMAGE_SERVICE: &str = "runtime.v1.ImageService";
const IMAGES: &str = IMAGE_SERVICE;

/// A gRPC channel over a unix socket. Lazy: the first call dials, and a peer that is not
/// up yet (containerd starts after lazysnapd) or restarts is dialled again later.
pub fn unix_channel(socket: &Path, timeout: Option<Duration>) -> Channel {
    // The URI is only a placeholder: the connector dials the unix socket.
    let mut endpoint = Endpoint::from_static("http://localhost");
    if let Some(timeout) = timeout {
        endpoint = endpoint.timeout(timeout);
    }
    endpoint.connect_with_connector_lazy(unix_connector(socket))
}

/// One gRPC connection to a CRI endpoint (containerd's socket serves CRI next to its own API).
#[derive(Clone)]
pub struct CriClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl CriClient {
    pub async fn connect(socket: &Path) -> Result<Self, tonic::transport::Error> {
        // The URI is only a placeholder: the connector dials the unix socket. The timeout
        // bounds every call, so a hung pull or start fails the test instead of hanging it.
        let channel = Endpoint::from_static("http://localhost")
            .timeout(CALL_TIMEOUT)
            .connect_with_connector(unix_connector(socket))
            .await?;
        Ok(Self {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    async fn call<Req, Resp>(
        &mut self,
        service: &str,
        method: &str,
        request: Req,
    ) -> Result<Resp, tonic::Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("CRI endpoint not ready: {e}")))?;
        let path = PathAndQuery::try_from(format!("/{service}/{method}"))
            .map_err(|e| tonic::Status::internal(format!("bad method path: {e}")))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let response = self
            .grpc
            .unary(tonic::Request::new(request), path, codec)
            .await?;
        Ok(response.into_inner())
    }

    pub async fn version(&mut self) -> Result<VersionResponse, tonic::Status> {
        let request = VersionRequest {
            version: "v1".into(),
        };
        self.call(RUNTIME, "Version", request).await
    }

    pub async fn pull_image(
        &mut self,
        image: &str,
        sandbox_config: Option<PodSandboxConfig>,
    ) -> Result<String, tonic::Status> {
        self.pull_image_with_auth(image, None, sandbox_config).await
    }

    /// PullImage with registry credentials, as the kubelet sends a pod's image-pull secrets.
    pub async fn pull_image_with_auth(
        &mut self,
        image: &str,
        auth: Option<AuthConfig>,
        sandbox_config: Option<PodSandboxConfig>,
    ) -> Result<String, tonic::Status> {
        let request = PullImageRequest {
            image: Some(image_spec(image)),
            auth,
            sandbox_config,
        };
        let response: PullImageResponse = self.call(IMAGES, "PullImage", request).await?;
        Ok(response.image_ref)
    }

    /// Every image the runtime has.
    pub async fn list_images(&mut self) -> Result<Vec<Image>, tonic::Status> {
        let response: ListImagesResponse = self
            .call(IMAGES, "ListImages", ListImagesRequest { filter: None })
            .await?;
        Ok(response.images)
    }

    pub async fn image_fs_info(&mut self) -> Result<Vec<FilesystemUsage>, tonic::Status> {
        let response: ImageFsInfoResponse = self
            .call(IMAGES, "ImageFsInfo", ImageFsInfoRequest {})
            .await?;
        Ok(response.image_filesystems)
    }

    pub async fn image_status(&mut self, image: &str) -> Result<Option<Image>, tonic::Status> {
        let request = ImageSpecRequest {
            image: Some(image_spec(image)),
        };
        let response: ImageStatusResponse = self.call(IMAGES, "ImageStatus", request).await?;
        Ok(response.image)
    }

    pub async fn remove_image(&mut self, image: &str) -> Result<(), tonic::Status> {
        let request = ImageSpecRequest {
            image: Some(image_spec(image)),
        };
        let _: Empty = self.call(IMAGES, "RemoveImage", request).await?;
        Ok(())
    }

    pub async fn run_pod_sandbox(
        &mut self,
        config: &PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let response: RunPodSandboxResponse = self.call(RUNTIME, "RunPodSandbox", request).await?;
        Ok(response.pod_sandbox_id)
    }

    pub async fn stop_pod_sandbox(&mut self, id: &str) -> Result<(), tonic::Status> {
        let request = PodSandboxIdRequest {
            pod_sandbox_id: id.into(),
        };
        let _: Empty = self.call(RUNTIME, "StopPodSandbox", request).await?;
        Ok(())
    }

    pub async fn remove_pod_sandbox(&mut self, id: &str) -> Result<(), tonic::Status> {
        let request = PodSandboxIdRequest {
            pod_sandbox_id: id.into(),
        };
        let _: Empty = self.call(RUNTIME, "RemovePodSandbox", request).await?;
        Ok(())
    }

    pub async fn create_container(
        &mut self,
        pod_sandbox_id: &str,
        config: ContainerConfig,
        sandbox_config: &PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod_sandbox_id.into(),
            config: Some(config),
            sandbox_config: Some(sandbox_config.clone()),
        };
        let response: CreateContainerResponse =
            self.call(RUNTIME, "CreateContainer", request).await?;
        Ok(response.container_id)
    }

    pub async fn start_container(&mut self, id: &str) -> Result<(), tonic::Status> {
        let request = ContainerIdRequest {
            container_id: id.into(),
        };
        let _: Empty = self.call(RUNTIME, "StartContainer", request).await?;
        Ok(())
    }

    pub async fn stop_container(&mut self, id: &str, timeout: i64) -> Result<(), tonic::Status> {
        let request = StopContainerRequest {
            container_id: id.into(),
            timeout,
        };
        let _: Empty = self.call(RUNTIME, "StopContainer", request).await?;
        Ok(())
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<(), tonic::Status> {
        let request = ContainerIdRequest {
            container_id: id.into(),
        };
        let _: Empty = self.call(RUNTIME, "RemoveContainer", request).await?;
        Ok(())
    }

    pub async fn container_status(&mut self, id: &str) -> Result<ContainerStatus, tonic::Status> {
        let request = ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let response: ContainerStatusResponse =
            self.call(RUNTIME, "ContainerStatus", request).await?;
        response
            .status
            .ok_or_else(|| tonic::Status::internal("ContainerStatus without a status"))
    }
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.into(),
        annotations: HashMap::new(),
    }
}
