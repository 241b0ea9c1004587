//! lazysnapd's configuration: a TOML file turned into a validated struct, every field
//! with a documented default, so the daemon runs with no file at all.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_ROOT: &str = "/var/lib/lazysnap";
pub const DEFAULT_ADDRESS: &str = "/run/lazysnap/lazysnap.sock";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where snapshots, metadata and the chunk cache live.
    pub root: PathBuf,
    /// The unix socket containerd's proxy plugin connects to.
    pub address: PathBuf,
    /// Log filter (tracing's env-filter syntax, e.g. `info` or `snapshotter=debug`);
    /// `RUST_LOG` wins when set.
    pub log_level: String,
    /// `HOST:PORT` to serve Prometheus metrics (`/metrics`) and status (`/status`) on;
    /// off unless set. The same is always served on `ROOT/status.sock`.
    pub metrics_address: Option<String>,
    /// Lazy pulling of eStargz / zstd:chunked layers over FUSE.
    pub lazy: LazyConfig,
    /// The chunk cache shared by all lazily mounted layers (under `ROOT/cache`).
    pub cache: CacheSettings,
    /// Per-registry settings in stargz-snapshotter's form, so its configs carry over:
    /// `[[resolver.host."HOST".mirrors]]` with `host`, `insecure`, `request_timeout_sec`.
    pub resolver: registry::ResolverConfig,
    /// Timeouts, retries and connection limits of the registry client.
    pub http: registry::HttpConfig,
    /// Registry credentials from Kubernetes image-pull secrets, by proxying CRI.
    pub cri_keychain: CriKeychainConfig,
    /// Registry credentials from kubelet's credential provider plugins (ECR, GCR, ACR).
    pub credential_provider: CredentialProviderSettings,
}

/// kubelet's credential provider exec plugins, run from kubelet's own files: `config` is
/// what kubelet's `--image-credential-provider-config` names, `bin_dir` its
/// `--image-credential-provider-bin-dir`. Off unless `config` is set. Lazy mounts ask
/// the CRI keychain first, then these plugins, then docker's config.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialProviderSettings {
    /// kubelet's `CredentialProviderConfig` (YAML or JSON). Default: none (off).
    pub config: Option<PathBuf>,
    /// Where the plugins it names are. Required with `config`. Default: none.
    pub bin_dir: Option<PathBuf>,
    /// Seconds a plugin may take before it is killed and its lookup gives nothing.
    /// Default 10.
    pub timeout_sec: u64,
}

impl Default for CredentialProviderSettings {
    fn default() -> Self {
        CredentialProviderSettings {
            config: None,
            bin_dir: None,
            timeout_sec: 10,
        }
    }
}

/// stargz-snapshotter's `[cri_keychain]`: lazysnapd serves the CRI image API
/// (`runtime.v1.ImageService`) on its socket for the kubelet's `--image-service-endpoint`,
/// forwards every call to containerd and keeps, in memory only, the credentials each
/// PullImage carries; lazy mounts use them before the docker config.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CriKeychainConfig {
    /// Serve the proxy. Default false.
    pub enable_keychain: bool,
    /// containerd's socket, whose CRI the calls go on to.
    /// Default /run/containerd/containerd.sock.
    pub image_service_path: PathBuf,
}

impl Default for CriKeychainConfig {
    fn default() -> Self {
        CriKeychainConfig {
            enable_keychain: false,
            image_service_path: PathBuf::from("/run/containerd/containerd.sock"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LazyConfig {
    /// Off: lazysnapd is an ordinary overlayfs snapshotter and every layer is unpacked.
    /// Default true.
    pub enabled: bool,
    /// How long Prepare waits for a layer to mount before letting containerd download it
    /// instead. Default 30.
    pub mount_timeout_sec: u64,
    /// Mount layers whose TOC cannot be verified when the client asks for it with
    /// `containerd.io/snapshot/remote/stargz.skipverify`. Default false.
    pub allow_no_verification: bool,
    /// Fetch the prioritized files right after mounting. Default true.
    pub prefetch: bool,
    /// Of each prioritized file, prefetch the chunks in its first this many MiB; the
    /// rest is fetched when read and in the background (0: whole files). Default 32
    /// (see `fusefs::FsConfig::prefetch_file_bytes`).
    pub prefetch_file_mb: u64,
    /// Then fetch the rest of each layer in the background. Default true.
    pub background_fetch: bool,
    /// Background fetch budget per registry host in bytes per second, 0 for unlimited.
    /// Default 50000000.
    pub background_rate_limit: u64,
    /// The background fetch waits until no demand read or prefetch has used a registry
    /// host's link for this many milliseconds. Default 2000.
    pub background_quiet_ms: u64,
    /// FUSE threads per mounted layer. Default 16 (see `fusefs::FsConfig::fuse_threads`).
    pub fuse_threads: usize,
    /// Keep lazily mounted layers alive across restarts, crashes and upgrades: an fd
    /// holder process keeps their FUSE connections and the next lazysnapd takes them
    /// over. The holder also keeps the listening socket, so that containerd's calls made
    /// while no daemon runs wait for the next one instead of being refused. Off: layers
    /// are unmounted on SIGTERM and die with a crash. Default true.
    pub handover: bool,
    /// Serve files that were read whole from a local copy through FUSE passthrough
    /// (kernel 6.9+), at local-disk speed; every open then reaches the daemon. Default
    /// false: the kernel opens files without asking and keeps their page cache.
    pub passthrough: bool,
    /// The kernel's read-ahead on each lazily mounted layer, in KiB: also the window it
    /// reads around a page fault in a mapped library, so it bounds what one fault makes
    /// lazysnapd fetch. Default 128.
    pub kernel_readahead_kb: u32,
    /// On a miss, also fetch this many KiB of the files that follow in the layer (0:
    /// off). Default 1024.
    pub neighbour_fetch_kb: u64,
    /// When a container starts reading a dynamically linked program or library, fetch
    /// the libraries it needs (found in the image's layers) at once, each whole up to
    /// this many KiB compressed, else its first chunk; the same for the modules a
    /// compiled Python module imports (0: off). Default 2048.
    pub library_fetch_kb: u64,
    /// When a layer is mounted, fetch the TOCs of the image's other layers in the
    /// background, so their Prepares need not wait for the registry (each is still
    /// verified against its own TOC digest). Default true.
    pub preopen_siblings: bool,
    /// Once every byte of a lazily pulled layer is local, copy its tree into a plain
    /// directory beside its mount; containers created after that read the copy through
    /// overlayfs alone, as after a full pull (running containers keep the FUSE mount).
    /// Costs the layer's size again on disk. Default true.
    pub native_copies: bool,
    /// The longest one range request may take, in seconds: a read of a chunk that is
    /// not local waits at most this long when its registry is away, then fails (EIO).
    /// Default 15 (see `fusefs::FsConfig::fetch_timeout`).
    pub fetch_timeout_sec: u64,
    /// Memory, in MB, that parses of layers' metadata (TOCs) may take together; each
    /// reserves its bound (compressed TOC + 9 x the JSON) before it starts, waits while
    /// others hold the rest, and a layer whose bound exceeds the whole falls back.
    /// Default 1536 (one TOC at the 150 MiB cap).
    pub parse_memory_mb: u64,
}

impl Default for LazyConfig {
    fn default() -> Self {
        let fs = fusefs::FsConfig::default();
        LazyConfig {
            enabled: true,
            mount_timeout_sec: 30,
            allow_no_verification: false,
            prefetch: fs.prefetch,
            prefetch_file_mb: fs.prefetch_file_bytes >> 20,
            background_fetch: fs.background_fetch,
            background_rate_limit: fs.background_rate_limit.unwrap_or(0),
            background_quiet_ms: fs.background_quiet.as_millis() as u64,
            fuse_threads: fs.fuse_threads,
            handover: true,
            passthrough: fs.passthrough,
            kernel_readahead_kb: fs.kernel_readahead / 1024,
            neighbour_fetch_kb: fs.neighbour_fetch_bytes >> 10,
            library_fetch_kb: fs.library_fetch_bytes >> 10,
            preopen_siblings: true,
            native_copies: true,
            fetch_timeout_sec: fs.fetch_timeout.as_secs(),
            parse_memory_mb: snapshotter::parse_gate::DEFAULT_PARSE_MEMORY >> 20,
        }
    }
}

impl LazyConfig {
    pub fn fs_config(&self) -> fusefs::FsConfig {
        fusefs::FsConfig {
            prefetch: self.prefetch,
            prefetch_file_bytes: self.prefetch_file_mb.saturating_mul(1 << 20),
            background_fetch: self.background_fetch,
            background_rate_limit: (self.background_rate_limit > 0)
                .then_some(self.background_rate_limit),
            background_quiet: std::time::Duration::from_millis(self.background_quiet_ms),
            fuse_threads: self.fuse_threads,
            passthrough: self.passthrough,
            kernel_readahead: self.kernel_readahead_kb.saturating_mul(1024),
            neighbour_fetch_bytes: self.neighbour_fetch_kb << 10,
            library_fetch_bytes: self.library_fetch_kb << 10,
            fetch_timeout: std::time::Duration::from_secs(self.fetch_timeout_sec),
            ..fusefs::FsConfig::default()
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Decompressed chunks kept in memory. Default 33554432 (32 MiB).
    pub memory_bytes: u64,
    /// Decompressed chunks kept on disk; 0 disables the disk cache. Default 10 GiB.
    pub disk_bytes: u64,
    /// The cache never fills its filesystem past this percentage: it evicts its own
    /// oldest chunks first, and skips the write when that is not enough. 100: no
    /// limit but the disk's. Default 90.
    pub max_disk_fill_percent: u8,
}

impl Default for CacheSettings {
    fn default() -> Self {
        let c = fusefs::CacheConfig::new("");
        CacheSettings {
            memory_bytes: c.memory_bytes,
            disk_bytes: c.disk_bytes,
            max_disk_fill_percent: c.max_fill_percent,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
            log_level: "info".to_string(),
            metrics_address: None,
            lazy: LazyConfig::default(),
            cache: CacheSettings::default(),
            resolver: registry::ResolverConfig::default(),
            http: registry::HttpConfig::default(),
            cri_keychain: CriKeychainConfig::default(),
            credential_provider: CredentialProviderSettings::default(),
        }
    }
}

impl Config {
    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.root.is_absolute() {
            anyhow::bail!("root must be an absolute path, not {}", self.root.display());
        }
        if self.address.as_os_str().len() >= 108 {
            anyhow::bail!(
                "socket path {} is too long for a unix socket (limit 107 bytes)",
                self.address.display()
            );
        }
        let keychain = &self.cri_keychain;
        if keychain.enable_keychain
            && (!keychain.image_service_path.is_absolute()
                || keychain.image_service_path == self.address)
        {
            anyhow::bail!(
                "[cri_keychain] image_service_path must be containerd's socket, an absolute \
                 path other than lazysnapd's own address, not {}",
                keychain.image_service_path.display()
            );
        }
        let plugins = &self.credential_provider;
        if plugins.timeout_sec == 0 {
            anyhow::bail!("[credential_provider] timeout_sec must be at least 1");
        }
        match (&plugins.config, &plugins.bin_dir) {
            (None, None) => {}
            (Some(config), Some(bin_dir)) if config.is_absolute() && bin_dir.is_absolute() => {}
            _ => anyhow::bail!(
                "[credential_provider] needs both config and bin_dir, as absolute paths \
                 (kubelet's --image-credential-provider-config and \
                 --image-credential-provider-bin-dir)"
            ),
        }
        self.lazy
            .fs_config()
            .validate()
            .map_err(|e| anyhow::anyhow!("[lazy]: {e}"))?;
        if self.lazy.parse_memory_mb == 0 || self.lazy.parse_memory_mb > 1 << 30 {
            anyhow::bail!(
                "[lazy] parse_memory_mb must be 1 to {} MB, not {}",
                1u64 << 30,
                self.lazy.parse_memory_mb
            );
        }
        Ok(())
    }

    pub fn registry(&self) -> registry::RegistryConfig {
        registry::RegistryConfig {
            resolver: self.resolver.clone(),
            http: self.http.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn fields_override_defaults() {
        let c =
            Config::parse("root = \"/srv/ls\"\naddress = \"/tmp/x.sock\"\nlog_level = \"debug\"\n")
                .unwrap();
        assert_eq!(c.root, PathBuf::from("/srv/ls"));
        assert_eq!(c.address, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn stargz_snapshotter_resolver_sections_carry_over() {
        let c = Config::parse(
            r#"
[lazy]
mount_timeout_sec = 5
background_fetch = false

[cache]
memory_bytes = 1048576

[[resolver.host."docker.io".mirrors]]
host = "mirror.example.internal"
insecure = true
request_timeout_sec = 10

[[resolver.host."127.0.0.1:5000".mirrors]]
host = "127.0.0.1:5000"
insecure = true
"#,
        )
        .unwrap();
        assert_eq!(c.lazy.mount_timeout_sec, 5);
        assert_eq!(
            c.lazy.fs_config().fetch_timeout,
            fusefs::FsConfig::default().fetch_timeout
        );
        assert!(!c.lazy.fs_config().background_fetch);
        assert_eq!(c.cache.memory_bytes, 1 << 20);
        assert_eq!(
            c.resolver.host["docker.io"].mirrors[0].host,
            "mirror.example.internal"
        );
        assert_eq!(c.resolver.host.len(), 2);
    }

    #[test]
    fn cri_keychain_takes_stargz_snapshotter_keys() {
        assert!(!Config::default().cri_keychain.enable_keychain);
        let c = Config::parse(
            "[cri_keychain]\nenable_keychain = true\nimage_service_path = \"/run/k/containerd.sock\"\n",
        )
        .unwrap();
        assert!(c.cri_keychain.enable_keychain);
        assert_eq!(
            c.cri_keychain.image_service_path,
            PathBuf::from("/run/k/containerd.sock")
        );
        // Forwarding to itself would loop.
        let looping = format!(
            "[cri_keychain]\nenable_keychain = true\nimage_service_path = \"{DEFAULT_ADDRESS}\"\n"
        );
        assert!(Config::parse(&looping).is_err());
        assert!(
            Config::parse(
                "[cri_keychain]\nenable_keychain = true\nimage_service_path = \"x.sock\"\n"
            )
            .is_err()
        );
    }

    #[test]
    fn credential_provider_plugins_need_both_paths() {
        assert_eq!(Config::default().credential_provider.config, None);
        let c = Config::parse(
            "[credential_provider]\nconfig = \"/etc/kubernetes/credential-provider.yaml\"\n\
             bin_dir = \"/usr/libexec/kubernetes/credential-providers\"\ntimeout_sec = 3\n",
        )
        .unwrap();
        assert_eq!(
            c.credential_provider.config.as_deref(),
            Some(Path::new("/etc/kubernetes/credential-provider.yaml"))
        );
        assert_eq!(c.credential_provider.timeout_sec, 3);
        let c = Config::parse("[credential_provider]\nconfig = \"/c.yaml\"\nbin_dir = \"/b\"\n")
            .unwrap();
        assert_eq!(c.credential_provider.timeout_sec, 10);
        for bad in [
            "[credential_provider]\nconfig = \"/c.yaml\"\n",
            "[credential_provider]\nbin_dir = \"/b\"\n",
            "[credential_provider]\nconfig = \"c.yaml\"\nbin_dir = \"/b\"\n",
            "[credential_provider]\nconfig = \"/c.yaml\"\nbin_dir = \"/b\"\ntimeout_sec = 0\n",
            "[credential_provider]\nconfig = \"/c.yaml\"\nbin_dir = \"/b\"\nbindir = \"/b\"\n",
        ] {
            assert!(Config::parse(bad).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn the_fetch_timeout_is_set_in_seconds_and_never_zero() {
        let c = Config::parse("[lazy]\nfetch_timeout_sec = 3\n").unwrap();
        assert_eq!(
            c.lazy.fs_config().fetch_timeout,
            std::time::Duration::from_secs(3)
        );
        assert!(Config::parse("[lazy]\nfetch_timeout_sec = 0\n").is_err());
        assert!(Config::parse("[lazy]\nparse_memory_mb = 0\n").is_err());
        let c = Config::parse("[lazy]\nparse_memory_mb = 64\n").unwrap();
        assert_eq!(c.lazy.parse_memory_mb, 64);
    }

    #[test]
    fn mistakes_are_reported() {
        let err = Config::parse("roots = \"/x\"").unwrap_err().to_string();
        assert!(err.contains("roots"), "{err}");
        assert!(Config::parse("root = \"relative\"").is_err());
        assert!(Config::parse("root = 5").is_err());
    }
}
