//! lazysnapd's lifecycle: take the root's lock, open the snapshotter, serve the snapshots
//! API on the unix socket until shutdown. The socket outlives the daemon when the fd
//! holder or systemd keeps it (see `listener`).

use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use snapshotter::Snapshotter;
use snapshotter::fuse_mounter::FuseMounter;
use snapshotter::holder::HolderClient;
use snapshotter::lazy_snapshotter::LazySnapshotter;
use snapshotter::remote::RemoteMounter;
use snapshotter::service::SnapshotService;
use std::time::Duration;

use crate::config::Config;
use crate::credential_plugins::CredentialPlugins;
use crate::keychain::{CriKeychain, FirstOf, ImageServiceProxy};
use crate::reload::ReloadableDockerConfig;
use registry::CredentialProvider;

/// An exclusive lock on a root directory, held for the daemon's lifetime, so that two
/// daemons never share (and corrupt) one root.
pub struct RootLock {
    _file: File,
}

impl RootLock {
    pub fn acquire(root: &Path) -> anyhow::Result<RootLock> {
        let path = root.join("lock");
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                anyhow::bail!(
                    "another lazysnapd (pid {}) is already using root {}; stop it or choose another --root",
                    holder.trim(),
                    root.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(RootLock { _file: file })
    }
}

/// What the daemon's signals ask of a running server.
pub enum Event {
    /// SIGHUP: the configuration file read again.
    Reload(Box<Config>),
    /// SIGUSR1: write the status (snapshots, mounts, cache) to the log.
    LogStatus,
}

/// Runs the daemon until `shutdown` resolves, taking `events` as they come.
pub async fn run(
    config: &Config,
    shutdown: impl Future<Output = ()>,
    mut events: tokio::sync::mpsc::Receiver<Event>,
) -> anyhow::Result<()> {
    // Registry settings stay out of the log: their headers may carry credentials.
    tracing::debug!(root = %config.root.display(), address = %config.address.display(),
        lazy = ?config.lazy, cache = ?config.cache, metrics = ?config.metrics_address, "configuration");
    std::fs::create_dir_all(&config.root)
        .with_context(|| format!("creating root {}", config.root.display()))?;
    std::fs::set_permissions(&config.root, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", config.root.display()))?;
    let _lock = RootLock::acquire(&config.root)?;
    let keychain = match config.cri_keychain.enable_keychain {
        // Kept on disk only for handover: a layer taken over by the next daemon must be
        // fetched with the same credentials before the kubelet pulls again.
        true if config.lazy.enabled && config.lazy.handover => Some(Arc::new(
            CriKeychain::persistent(config.root.join(CRI_CREDENTIALS))
                .context("reading the kept CRI credentials")?,
        )),
        true => Some(Arc::new(CriKeychain::default())),
        false => None,
    };
    let (mounter, cache, registry, credential_plugins) =
        match lazy_mounter(config, keychain.clone())? {
            Some(lazy) => (
                Some(lazy.mounter),
                Some(lazy.cache),
                Some(lazy.registry),
                lazy.credential_plugins,
            ),
            None => (None, None, None, None),
        };
    let snapshotter = Arc::new(
        Snapshotter::open(&config.root)
            .with_context(|| format!("opening snapshotter state in {}", config.root.display()))?,
    );
    let observer = Arc::new(crate::observe::Observer {
        snapshotter: snapshotter.clone(),
        mounter: mounter.clone(),
        cache,
    });
    let status_listener = crate::observe::bind_status(&config.root)
        .with_context(|| format!("binding the status socket in {}", config.root.display()))?;
    let status_server = tokio::spawn(crate::observe::serve_unix(
        status_listener,
        observer.clone(),
    ));
    let mut reloader = crate::reload::Reloader {
        config: config.clone(),
        registry,
        credential_plugins,
    };
    let signalled = observer.clone();
    let event_loop = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                Event::Reload(fresh) => {
                    reloader.apply(*fresh);
                }
                Event::LogStatus => match serde_json::to_string(&signalled.status()) {
                    Ok(status) => tracing::info!(%status, "SIGUSR1: status"),
                    Err(e) => tracing::error!("SIGUSR1: status: {e}"),
                },
            }
        }
    });
    let metrics_server = match &config.metrics_address {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("binding the metrics address {address}"))?;
            tracing::info!(%address, "serving /metrics and /status");
            Some(tokio::spawn(crate::observe::serve_tcp(
                listener,
                observer.clone(),
            )))
        }
        None => None,
    };
    let lazy = match &mounter {
        Some(mounter) => LazySnapshotter::with_lazy_pulling(
            snapshotter,
            mounter.clone() as Arc<dyn RemoteMounter>,
            Duration::from_secs(config.lazy.mount_timeout_sec),
        ),
        None => LazySnapshotter::without_lazy_pulling(snapshotter),
    };
    if let Some(mounter) = &mounter {
        // Remount lazily pulled layers in the background: a registry that is down must
        // not keep the daemon from serving (those layers are restored on first use).
        let restoring = lazy.clone();
        let waiting = mounter.clone();
        tokio::spawn(async move {
            if let Some(snapshots) = restoring.restore_all().await {
                waiting.release_unclaimed(&snapshots);
            }
            // Connections kept from the previous daemon hold running containers' reads
            // until they are served: retry those layers until their registry answers.
            while waiting.held_waiting() > 0 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                restoring.restore_all().await;
            }
        });
    }
    let service = SnapshotService::new(lazy);
    // Kept open across restarts by the fd holder (with handover) or by systemd.
    let listening = crate::listener::listen(
        &config.address,
        config.lazy.handover.then(|| holder(&config.root)).as_ref(),
    )?;
    let listener = listening.listener;
    tracing::info!(
        root = %config.root.display(),
        address = %config.address.display(),
        origin = ?listening.origin,
        "lazysnapd serving containerd.services.snapshots.v1"
    );
    if config.lazy.enabled && !snapshotter::idmap::kernel_idmaps_fuse() {
        // Said once at start: the Prepare that fails later says it again.
        tracing::warn!(
            "this kernel cannot idmap FUSE mounts (Linux 6.12+ can): user-namespaced \
             containers on lazily pulled images fail here; leave \"remap-ids\" out of \
             containerd's proxy plugin capabilities so that containerd copies them with chown"
        );
    }
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        |conn| conn.map(crate::authority::relay),
    );
    let mut router = tonic::transport::Server::builder().add_service(service.into_server());
    if let Some(keychain) = keychain {
        // On the snapshots socket, as stargz-snapshotter does: the kubelet's
        // --image-service-endpoint names the same socket as containerd's proxy plugin.
        let upstream = &config.cri_keychain.image_service_path;
        router = router.add_service(ImageServiceProxy::new(keychain, upstream));
        tracing::info!(
            upstream = %upstream.display(),
            "serving runtime.v1.ImageService (CRI keychain), forwarding to containerd"
        );
    }
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving gRPC")?;
    status_server.abort();
    event_loop.abort();
    if let Some(server) = metrics_server {
        server.abort();
    }
    let _ = std::fs::remove_file(config.root.join(crate::observe::STATUS_SOCKET));
    if let Some(mounter) = mounter {
        if config.lazy.handover {
            // Running containers keep their layers: the fd holder keeps the connections
            // and the next lazysnapd serves them (`lazysnapd --unmount-all` removes
            // everything instead).
            tokio::task::spawn_blocking(move || mounter.leave_all()).await?;
        } else {
            // Nothing stays mounted after exit; a restart remounts from the metadata.
            tokio::task::spawn_blocking(move || mounter.unmount_all()).await?;
        }
    }
    // Only now may a socket file nothing keeps open go.
    drop(listening.socket_file);
    tracing::info!("lazysnapd stopped");
    Ok(())
}

/// What lazy pulling runs on.
struct Lazy {
    mounter: Arc<FuseMounter>,
    cache: fusefs::SharedCache,
    /// What a reload reaches: the client's registry hosts and docker's credentials.
    registry: (registry::Client, Arc<ReloadableDockerConfig>),
    /// kubelet's credential provider plugins, whose config a reload reads again.
    credential_plugins: Option<Arc<CredentialPlugins>>,
}

/// The FUSE mounter for lazy pulling, or None when it is off or cannot work here (then
/// every layer is unpacked, as with a plain overlayfs snapshotter).
fn lazy_mounter(
    config: &Config,
    keychain: Option<Arc<CriKeychain>>,
) -> anyhow::Result<Option<Lazy>> {
    if !config.lazy.enabled {
        tracing::info!("lazy pulling is off ([lazy] enabled = false)");
        return Ok(None);
    }
    if !Path::new("/dev/fuse").exists() {
        tracing::warn!("/dev/fuse is missing: lazy pulling is off, every layer is unpacked");
        return Ok(None);
    }
    let docker =
        Arc::new(ReloadableDockerConfig::load_default().context("reading docker credentials")?);
    let credential_plugins = credential_plugins(&config.credential_provider)?;
    // kubelet's order: a pod's image-pull secrets (from CRI) first, then the credential
    // provider plugins, then the node's docker config. kubelet tries every credential it
    // has until one pulls; lazy mounts get one, so the most specific source wins.
    let mut chain: Vec<Arc<dyn CredentialProvider>> = Vec::new();
    if let Some(keychain) = keychain {
        chain.push(keychain);
    }
    if let Some(plugins) = &credential_plugins {
        chain.push(plugins.clone());
    }
    chain.push(docker.clone());
    let credentials: Arc<dyn CredentialProvider> = Arc::new(FirstOf(chain));
    let client = registry::Client::new(config.registry())
        .context("setting up the registry client")?
        .with_credentials(credentials);
    let mut cache_config = fusefs::CacheConfig::new(config.root.join("cache"));
    cache_config.memory_bytes = config.cache.memory_bytes;
    cache_config.disk_bytes = config.cache.disk_bytes;
    cache_config.max_fill_percent = config.cache.max_disk_fill_percent;
    let cache = fusefs::SharedCache::open(cache_config).context("opening the chunk cache")?;
    tokio::spawn(cache.clone().release_unused_memory_forever());
    let mut mounter = FuseMounter::new(
        client.clone(),
        cache.clone(),
        config.lazy.fs_config(),
        tokio::runtime::Handle::current(),
        config.lazy.allow_no_verification,
    )
    .with_parse_gate(snapshotter::parse_gate::ParseGate::new(
        config.lazy.parse_memory_mb << 20,
        Duration::from_secs(config.lazy.mount_timeout_sec),
    ));
    if config.lazy.preopen_siblings {
        mounter = mounter.with_sibling_preopen();
    }
    if config.lazy.native_copies {
        mounter = mounter.with_native_copies();
    }
    let tocs = config.root.join(TOC_STORE);
    let store = snapshotter::tocstore::TocStore::open(&tocs)
        .with_context(|| format!("opening the kept layer metadata in {}", tocs.display()))?;
    mounter = mounter
        .with_toc_store(store)
        .with_local_layers(config.root.join(LOCAL_LAYERS));
    if config.lazy.handover {
        mounter = mounter
            .with_holder(holder(&config.root))
            .context("asking the fd holder for connections kept from an earlier lazysnapd")?;
    }
    Ok(Some(Lazy {
        mounter: Arc::new(mounter),
        cache,
        registry: (client, docker),
        credential_plugins,
    }))
}

/// kubelet's credential provider plugins when `[credential_provider]` names their config;
/// a config kubelet would refuse stops lazysnapd here.
fn credential_plugins(
    settings: &crate::config::CredentialProviderSettings,
) -> anyhow::Result<Option<Arc<CredentialPlugins>>> {
    let (Some(config), Some(bin_dir)) = (&settings.config, &settings.bin_dir) else {
        return Ok(None);
    };
    let plugins =
        CredentialPlugins::load(config, bin_dir, Duration::from_secs(settings.timeout_sec))?;
    tracing::info!(
        config = %config.display(),
        plugins = ?plugins.names(),
        "kubelet credential provider plugins give credentials after the CRI keychain, before docker's config"
    );
    Ok(Some(Arc::new(plugins)))
}

/// The fd holder's socket, under the root (mode 0700) so only root reaches it.
pub const HOLDER_SOCKET: &str = "fdholder.sock";
/// Verified footers and TOCs of lazily pulled layers, by layer digest, next to the
/// chunk cache: restores need no registry.
pub const TOC_STORE: &str = "tocs";
/// Whole copies of the layers SOCI indexes have no zTOC for, while they are mounted.
pub const LOCAL_LAYERS: &str = "local-layers";
/// CRI keychain credentials kept for handover (mode 0600, in the 0700 root).
pub const CRI_CREDENTIALS: &str = "cri-credentials.json";

/// The client of the root's fd holder; the holder is this same program, started with
/// `--hold-fds` when first needed.
pub fn holder(root: &Path) -> HolderClient {
    let exe = std::env::current_exe()
        .ok()
        .filter(|p| p.exists())
        // Replaced on disk by an upgrade: the running image is still there.
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
    HolderClient::new(root.join(HOLDER_SOCKET), exe)
}

/// `lazysnapd --unmount-all`: what an operator runs, with lazysnapd stopped, to remove
/// every lazily mounted layer the fd holder kept alive. Running containers on those
/// layers lose them.
pub fn unmount_all(config: &Config) -> anyhow::Result<()> {
    let _lock = RootLock::acquire(&config.root)?;
    if holder(&config.root).exit()? {
        tracing::info!("stopped the fd holder");
    }
    // With the holder gone nothing listens: a socket file left for the next daemon is stale.
    if config.address.exists() && std::os::unix::net::UnixStream::connect(&config.address).is_err()
    {
        let _ = std::fs::remove_file(&config.address);
    }
    let snapshots = config.root.join("snapshots");
    let mounts = snapshotter::fsutil::mounts_under(&snapshots);
    for mount in &mounts {
        snapshotter::fsutil::unmount_detach(mount)
            .with_context(|| format!("unmounting {}", mount.display()))?;
    }
    tracing::info!(layers = mounts.len(), "unmounted");
    Ok(())
}
