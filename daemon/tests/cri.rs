//! Kubernetes' path to lazysnap: containerd's CRI plugin with `snapshotter = "lazysnap"` and
//! `disable_snapshot_annotations = false`, driven over the CRI v1 API as a kubelet would.
//! PullImage of an eStargz image mounts every layer lazily (the CRI plugin's
//! `containerd.io/snapshot/cri.*` labels are all lazysnapd gets) and leaves the big file
//! in the registry; a host-network pod whose sandbox image comes from the test registry
//! then runs a container from that image, whose output lands in its CRI log file.
//! Everything is removed through CRI, and nothing stays mounted afterwards.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::cri::{
    CONTAINER_EXITED, ContainerConfig, ContainerMetadata, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NAMESPACE_MODE_CONTAINER, NAMESPACE_MODE_NODE, NAMESPACE_MODE_POD, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata,
};
use testkit::containerd::{Containerd, mounts_under};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::Registry;
use testkit::registry::bytes_served;

use common::{
    LAZYSNAPD, containerd_with_cri, cri_client, layers_of, push_busybox_app, push_pause_image,
};

/// Size of the file the container never reads; it must stay in the registry.
const BIG: usize = 24 << 20;

/// Host paths CRI would use by default; the test configures them all into temp dirs.
const HOST_PATHS: &[&str] = &[
    "/etc/cni",
    "/etc/containerd",
    "/opt/cni",
    "/var/lib/containerd",
    "/var/log/pods",
];

/// Fields drop in this order: containerd (its drop kills what CRI left), then lazysnapd
/// (nothing uses its mounts any more), the registry, and last the temp dir.
struct Setup {
    containerd: Containerd,
    daemon: Lazysnapd,
    registry: Registry,
    dir: tempfile::TempDir,
    /// `HOST/cri/pause:1`: busybox sleeping, the pod's sandbox image.
    pause: String,
}

fn setup(name: &str) -> Option<(Setup, String)> {
    if testkit::skip_unless_root(name) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let pause = push_pause_image(&registry);
    let (_, app) = push_busybox_app(&registry, "cri/app", BIG, 7);
    // No background fetch: what the registry serves is what the pull and container read.
    let config = dir.path().join("lazysnapd.toml");
    std::fs::write(&config, "[lazy]\nbackground_fetch = false\n").unwrap();
    let daemon = Lazysnapd::start_with_args(
        Path::new(LAZYSNAPD),
        &dir.path().join("ls"),
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    let containerd = containerd_with_cri(dir.path(), &daemon, &registry, &pause, &[]);
    Some((
        Setup {
            containerd,
            daemon,
            registry,
            dir,
            pause,
        },
        app,
    ))
}

fn pod_config(log_directory: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "lazy-cri".into(),
            uid: format!("lazy-cri-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: log_directory.to_str().unwrap().into(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            security_context: Some(LinuxSandboxSecurityContext {
                // Host network: no CNI plugin is needed (none is installed).
                namespace_options: Some(NamespaceOption {
                    network: NAMESPACE_MODE_NODE,
                    pid: NAMESPACE_MODE_CONTAINER,
                    ipc: NAMESPACE_MODE_POD,
                    userns_options: None,
                }),
            }),
        }),
        ..PodSandboxConfig::default()
    }
}

fn container_config(image_id: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "app".into(),
            attempt: 0,
        }),
        // No command: CRI takes `cat /app/motd` from the image config it pulled.
        image: Some(ImageSpec {
            image: image_id.into(),
            ..ImageSpec::default()
        }),
        log_path: "app/0.log".into(),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                // As the kubelet does: the pod's network, the container's own PID space.
                namespace_options: Some(NamespaceOption {
                    network: NAMESPACE_MODE_NODE,
                    pid: NAMESPACE_MODE_CONTAINER,
                    ipc: NAMESPACE_MODE_POD,
                    userns_options: None,
                }),
            }),
        }),
        ..ContainerConfig::default()
    }
}

/// Per layer of `reference`: (digest, bytes served so far, compressed size).
async fn served_per_layer(s: &Setup, reference: &str) -> Vec<(String, u64, u64)> {
    let log = s.registry.log();
    layers_of(reference)
        .await
        .into_iter()
        .map(|(digest, size)| {
            let served = bytes_served(&log, &digest);
            (digest, served, size)
        })
        .collect()
}

fn report(when: &str, layers: &[(String, u64, u64)]) {
    for (digest, served, size) in layers {
        eprintln!(
            "{when}: layer {digest}: {served} of {size} compressed bytes served ({:.1}%)",
            *served as f64 * 100.0 / *size as f64
        );
    }
}

/// The layer holding the big file: the largest one.
fn big_layer(layers: &[(String, u64, u64)]) -> &(String, u64, u64) {
    layers.iter().max_by_key(|(_, _, size)| *size).unwrap()
}

/// Mount points under any of `dirs` (the temp dirs are gone by then; their paths remain).
fn mounts_under_any(dirs: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter().flat_map(|d| mounts_under(d)).collect()
}

/// Cgroup dirs runc made for container `id` that still exist. Without a cgroup_parent, CRI
/// on containerd 1.6 (cgroupfs driver) uses `/k8s.io/<id>` in every hierarchy.
fn cgroups_of(id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut candidates = vec![root.join("k8s.io").join(id)];
    if let Ok(hierarchies) = std::fs::read_dir(root) {
        candidates.extend(
            hierarchies
                .flatten()
                .map(|h| h.path().join("k8s.io").join(id)),
        );
    }
    candidates.into_iter().filter(|p| p.exists()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn cri_pulls_estargz_lazily_and_runs_a_pod() {
    let host_paths_before: Vec<bool> = HOST_PATHS.iter().map(|p| Path::new(p).exists()).collect();
    let Some((s, app)) = setup("cri_pulls_estargz_lazily_and_runs_a_pod") else {
        return;
    };
    let mut cri = cri_client(&s.containerd).await;
    let logs = s.dir.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let pod = pod_config(&logs);

    // PullImage: every eStargz layer is mounted lazily from the CRI plugin's labels.
    let image_id = cri
        .pull_image(&app, Some(pod.clone()))
        .await
        .unwrap_or_else(|e| panic!("PullImage {app}: {e}\nlazysnapd log:\n{}", s.daemon.log()));
    let status = cri.image_status(&app).await.unwrap();
    let image = status.unwrap_or_else(|| panic!("CRI does not list {app} after PullImage"));
    assert_eq!(image.id, image_id);
    assert!(image.repo_tags.contains(&app), "{image:?}");

    let log = s.daemon.log();
    let after_pull = served_per_layer(&s, &app).await;
    assert_eq!(after_pull.len(), 2, "busybox and app layers expected");
    for (digest, _, _) in &after_pull {
        assert!(
            log.lines()
                .any(|l| l.contains("layer mounted lazily") && l.contains(digest.as_str())),
            "layer {digest} was not mounted lazily through CRI; lazysnapd log:\n{log}"
        );
    }
    report("after PullImage", &after_pull);
    let (big_digest, big_served, big_size) = big_layer(&after_pull);
    assert!(
        big_served * 10 < *big_size,
        "PullImage fetched {big_served} of {big_size} bytes of layer {big_digest}"
    );

    // A host-network pod (sandbox image pulled by CRI from the test registry) runs a
    // container from the lazily pulled image; its output goes to the CRI log file.
    let sandbox = cri.run_pod_sandbox(&pod).await.unwrap_or_else(|e| {
        panic!(
            "RunPodSandbox: {e}\ncontainerd log:\n{}",
            s.containerd.log()
        )
    });
    // Where runc put the sandbox; checked again after removal, when it must be gone.
    assert!(
        !cgroups_of(&sandbox).is_empty(),
        "no cgroup for sandbox {sandbox} under /sys/fs/cgroup/*/k8s.io"
    );
    let container = cri
        .create_container(&sandbox, container_config(&image_id), &pod)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "CreateContainer: {e}\ncontainerd log:\n{}",
                s.containerd.log()
            )
        });
    cri.start_container(&container).await.unwrap_or_else(|e| {
        panic!(
            "StartContainer: {e}\ncontainerd log:\n{}",
            s.containerd.log()
        )
    });
    let exited = testkit::wait_for(Duration::from_secs(60), async || {
        let status = cri.container_status(&container).await.ok()?;
        (status.state == CONTAINER_EXITED).then_some(status)
    })
    .await
    .unwrap_or_else(|| panic!("container {container} did not exit within 60 s"));
    assert_eq!(
        exited.exit_code, 0,
        "container exited with {} ({} {})",
        exited.exit_code, exited.reason, exited.message
    );
    let container_log = logs.join("app/0.log");
    assert_eq!(Path::new(&exited.log_path), container_log);
    // CRI log lines: `<RFC 3339 time> stdout F <line>`; the file may trail the exit a bit.
    let printed = testkit::wait_for(Duration::from_secs(10), async || {
        let text = std::fs::read_to_string(&container_log).ok()?;
        text.lines()
            .any(|l| l.ends_with(" stdout F served-lazily"))
            .then_some(text)
    })
    .await;
    assert!(
        printed.is_some(),
        "no `served-lazily` in {}: {:?}",
        container_log.display(),
        std::fs::read_to_string(&container_log)
    );

    // The container read busybox and a tiny file: the big file stayed in the registry.
    let after_run = served_per_layer(&s, &app).await;
    report("after the container ran", &after_run);
    let (big_digest, big_served, big_size) = big_layer(&after_run);
    assert!(
        big_served * 4 < *big_size,
        "{big_served} of {big_size} bytes of layer {big_digest} served by the time the container exited"
    );

    // Teardown through CRI, as the kubelet would; CRI itself must leave nothing mounted.
    cri.stop_container(&container, 0).await.unwrap();
    cri.remove_container(&container).await.unwrap();
    cri.stop_pod_sandbox(&sandbox).await.unwrap();
    cri.remove_pod_sandbox(&sandbox).await.unwrap();
    let containerd_socket = s.containerd.address().to_path_buf();
    let stopped = testkit::wait_until(Duration::from_secs(30), || {
        s.containerd.mounts().is_empty()
            && testkit::containerd::shims_of(&containerd_socket).is_empty()
    });
    assert!(
        stopped,
        "after RemovePodSandbox: mounts {:?}, shims {:?}",
        s.containerd.mounts(),
        testkit::containerd::shims_of(&containerd_socket)
    );
    let cgroups: Vec<PathBuf> = [&sandbox, &container]
        .iter()
        .flat_map(|id| cgroups_of(id))
        .collect();
    assert!(cgroups.is_empty(), "CRI left cgroups {cgroups:?}");
    cri.remove_image(&app).await.unwrap();
    cri.remove_image(&s.pause).await.unwrap();
    assert!(cri.image_status(&app).await.unwrap().is_none());
    // Removing the images garbage-collects their snapshots: lazysnapd unmounts the layers.
    let clean = testkit::wait_until(Duration::from_secs(30), || {
        mounts_under(&s.daemon.root).is_empty()
            && std::fs::read_dir(s.daemon.root.join("snapshots")).map_or(0, |d| d.count()) == 0
    });
    assert!(
        clean,
        "lazysnapd still has mounts {:?} or snapshots after RemoveImage",
        mounts_under(&s.daemon.root)
    );

    let dirs = vec![s.containerd.dir().to_path_buf(), s.dir.path().to_path_buf()];
    drop(cri);
    drop(s);
    assert_eq!(mounts_under_any(&dirs), Vec::<PathBuf>::new());
    let host_paths_after: Vec<bool> = HOST_PATHS.iter().map(|p| Path::new(p).exists()).collect();
    assert_eq!(
        host_paths_before, host_paths_after,
        "host paths {HOST_PATHS:?} changed"
    );
}
