//! User-namespaced containers on lazily pulled images, with real parts: containerd 2.x
//! told that lazysnapd can `remap-ids`, an eStargz image in docker-registry mounted
//! lazily over FUSE, runc in a user namespace. containerd passes the mapping as snapshot
//! labels; lazysnapd stacks the container's overlay on idmapped clones of the layers, so
//! the image's files are the container root's without a copy or a chown, what the
//! container writes lands with the host's mapped IDs, and the layers stay lazy. Through
//! `ctr run --remap-labels` and through a CRI pod sandbox with a user namespace.
//!
//! containerd 1.6 knows no `remap-ids`: these tests run in the containerd 2.x pass
//! (`LAZYSNAP_CONTAINERD=2`) and say so when skipped.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    containerd_with_cri, convert, cri_client, layers_of, push_busybox_app, push_pause_image,
    rpull_lazily, start_lazysnapd,
};
use daemon::cri::{
    IdMapping, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NAMESPACE_MODE_CONTAINER,
    NAMESPACE_MODE_POD, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, UserNamespace,
};
use testkit::containerd::{Containerd, ContainerdOptions, Release, install_pod_cni, mounts_under};
use testkit::lazysnapd::Lazysnapd;
use testkit::registry::{Registry, bytes_served};

/// The file nobody reads; it must stay in the registry.
const BIG: usize = 16 << 20;
/// Container IDs 0..65536 are these host IDs.
const HOST_UID: u32 = 231_072;
const HOST_GID: u32 = 296_608;

struct Setup {
    containerd: Containerd,
    daemon: Lazysnapd,
    registry: Registry,
    _dir: tempfile::TempDir,
}

fn setup(name: &str) -> Option<Setup> {
    if testkit::skip_unless_root(name) {
        return None;
    }
    if Release::from_env().unwrap() != Release::Sid {
        eprintln!("{name}: skipped: remap-ids needs containerd 2.x (LAZYSNAP_CONTAINERD=2)");
        return None;
    }
    if !snapshotter::idmap::kernel_idmaps_fuse() {
        eprintln!("{name}: skipped: this kernel cannot idmap FUSE mounts (6.12+)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    // No background fetch: what the registry serves is what the pull and container read.
    let daemon = start_lazysnapd(dir.path(), "[lazy]\nbackground_fetch = false\n");
    let containerd = Containerd::start_with(
        &ContainerdOptions::default()
            .proxy_snapshotter("lazysnap", &daemon.address)
            .proxy_capabilities("lazysnap", &["remap-ids"]),
    )
    .unwrap();
    Some(Setup {
        containerd,
        daemon,
        registry,
        _dir: dir,
    })
}

/// Regular files and symlinks under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// `ctr run --remap-labels` of `image` with container IDs 0..65536 mapped to HOST_UID
/// and HOST_GID; what `script` printed.
fn run_mapped(s: &Setup, image: &str, id: &str, script: &str, remove: bool) -> String {
    let uidmap = format!("0:{HOST_UID}:65536");
    let gidmap = format!("0:{HOST_GID}:65536");
    let mut args = vec!["run"];
    if remove {
        args.push("--rm");
    }
    args.extend([
        "--snapshotter",
        "lazysnap",
        "--uidmap",
        &uidmap,
        "--gidmap",
        &gidmap,
        "--remap-labels",
        image,
        id,
        "/bin/sh",
        "-c",
        script,
    ]);
    s.containerd.ctr(args).unwrap_or_else(|e| {
        panic!(
            "ctr run: {e}\ncontainerd log:\n{}\nlazysnapd log:\n{}",
            s.containerd.log(),
            s.daemon.log()
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn ctr_run_with_remap_labels_maps_a_lazy_image_without_copying_it() {
    let Some(s) = setup("ctr_run_with_remap_labels_maps_a_lazy_image_without_copying_it") else {
        return;
    };
    let (plain, image) = push_busybox_app(&s.registry, "userns/app", BIG, 41);
    rpull_lazily(&image, &s.containerd).await;
    let script = "id -u; id -g; stat -c '%u:%g' /app/motd /app/big.bin /bin/busybox; \
                  cat /app/motd; echo written-inside > /app/new.txt; stat -c '%u:%g' /app/new.txt";
    // Kept after it exits, so that its upper dir can be looked at.
    let out = run_mapped(&s, &image, "userns-1", script, false);
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        ["0", "0", "0:0", "0:0", "0:0", "served-lazily", "0:0"],
        "inside the container:\n{out}"
    );

    // The container's upper dir: what it wrote, owned by the mapped root as the host sees
    // it, and nothing else copied up.
    let uppers: Vec<PathBuf> = std::fs::read_dir(s.daemon.root.join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("fs"))
        .filter(|fs| fs.join("app/new.txt").exists())
        .collect();
    assert_eq!(uppers.len(), 1, "{uppers:?}");
    let upper = &uppers[0];
    let written = std::fs::metadata(upper.join("app/new.txt")).unwrap();
    assert_eq!((written.uid(), written.gid()), (HOST_UID, HOST_GID));
    let root = std::fs::metadata(upper).unwrap();
    assert_eq!((root.uid(), root.gid()), (HOST_UID, HOST_GID));
    let copied: Vec<PathBuf> = files_under(upper)
        .into_iter()
        .filter(|p| p != Path::new("app/new.txt"))
        .collect();
    assert_eq!(copied, Vec::<PathBuf>::new(), "copied up without a write");

    // The layers stayed lazy: the big file was never fetched.
    let log = s.registry.log();
    let (big_layer, big_size) = layers_of(&image)
        .await
        .into_iter()
        .max_by_key(|(_, size)| *size)
        .unwrap();
    let served = bytes_served(&log, &big_layer);
    assert!(
        served * 4 < big_size,
        "{served} of {big_size} bytes of layer {big_layer} served"
    );
    s.containerd.ctr(["container", "rm", "userns-1"]).unwrap();

    // An image lazysnapd cannot mount lazily (plain gzip: ordinary layers) is mapped
    // the same way, as containerd's overlayfs snapshotter does it.
    let report = daemon::rpull::rpull(&plain, &common::rpull_options(&s.containerd))
        .await
        .unwrap();
    assert!(
        report
            .layers
            .iter()
            .all(|l| l.outcome == daemon::rpull::LayerOutcome::Downloaded),
        "{report:?}"
    );
    let out = run_mapped(
        &s,
        &plain,
        "userns-2",
        "id -u; stat -c '%u:%g' /app/motd /bin/busybox",
        true,
    );
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(lines, ["0", "0:0", "0:0"], "inside the container:\n{out}");
}

/// A pod's namespaces as the kubelet sends them for `hostUsers: false`: a network of
/// the pod's own, a user namespace of 65536 IDs.
fn namespaces() -> NamespaceOption {
    let ids = |host_id| IdMapping {
        host_id,
        container_id: 0,
        length: 65536,
    };
    NamespaceOption {
        network: NAMESPACE_MODE_POD,
        pid: NAMESPACE_MODE_CONTAINER,
        ipc: NAMESPACE_MODE_POD,
        userns_options: Some(UserNamespace {
            mode: NAMESPACE_MODE_POD,
            uids: vec![ids(CRI_HOST_ID)],
            gids: vec![ids(CRI_HOST_ID)],
        }),
    }
}

/// Where the kubelet would put a pod's IDs: a multiple of 65536.
const CRI_HOST_ID: u32 = 65536 * 5;

/// The pod sandbox, not a container in it: containerd gives a user-namespaced container
/// idmapped bind mounts (/etc/hosts, resolv.conf), which need runc 1.2+ (`features` with
/// `mountExtensions.idmap`); bookworm's runc is 1.1.5 and sid's needs glibc 2.38. The
/// sandbox's root filesystem is the same path: its image (busybox sleeping) is eStargz,
/// mounted lazily, prepared with the pod's mapping.
#[tokio::test(flavor = "multi_thread")]
async fn a_cri_pod_sandbox_with_a_user_namespace_runs_on_a_lazy_image() {
    let name = "a_cri_pod_sandbox_with_a_user_namespace_runs_on_a_lazy_image";
    if testkit::skip_unless_root(name) {
        return;
    }
    if Release::from_env().unwrap() != Release::Sid || !snapshotter::idmap::kernel_idmaps_fuse() {
        eprintln!("{name}: skipped: needs containerd 2.x (LAZYSNAP_CONTAINERD=2) and Linux 6.12+");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).unwrap();
    let pause_plain = push_pause_image(&registry);
    let pause = format!("{}/cri/pause:estargz", registry.host);
    convert(&pause_plain, &pause, &["--estargz"]);
    let daemon = start_lazysnapd(dir.path(), "[lazy]\nbackground_fetch = false\n");
    let _network = install_pod_cni(dir.path()).unwrap();
    let containerd = containerd_with_cri(dir.path(), &daemon, &registry, &pause, &["remap-ids"]);
    let mut cri = cri_client(&containerd).await;
    let logs = dir.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let pod = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "userns".into(),
            uid: format!("userns-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: logs.to_str().unwrap().into(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces()),
            }),
        }),
        ..PodSandboxConfig::default()
    };
    let sandbox = cri.run_pod_sandbox(&pod).await.unwrap_or_else(|e| {
        panic!(
            "RunPodSandbox: {e}\ncontainerd log:\n{}\nlazysnapd log:\n{}",
            containerd.log(),
            daemon.log()
        )
    });
    let log = daemon.log();
    for (layer, _) in layers_of(&pause).await {
        assert!(
            log.lines()
                .any(|l| l.contains("layer mounted lazily") && l.contains(&layer)),
            "sandbox layer {layer} was not mounted lazily:\n{log}"
        );
    }
    // The sandbox's process: the pod's root is CRI_HOST_ID on the host, and the image's
    // files, root's in the layer, are that root's through its mount. `runc start` returns
    // when it has told the container's init to go on, before that init has exec'd the
    // image's command, so the process is waited for.
    let find_sleeper = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .map(|p| p.path())
            .find(|p| {
                std::fs::read(p.join("cmdline")).is_ok_and(|c| c == b"/bin/sleep\x003600\x00")
                    && std::fs::read_to_string(p.join("uid_map"))
                        .is_ok_and(|m| m.split_whitespace().eq(["0", "327680", "65536"]))
            })
    };
    let mut sleeper = None;
    testkit::wait_until(Duration::from_secs(10), || {
        sleeper = find_sleeper();
        sleeper.is_some()
    });
    let sleeper = sleeper.unwrap_or_else(|| {
        let processes = std::process::Command::new("ps")
            .args(["-eo", "pid,user,args"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        panic!(
            "no sandbox process in the pod's user namespace within 10 s\nprocesses:\n{processes}\ncontainerd log:\n{}",
            containerd.log()
        )
    });
    let owner = std::fs::metadata(&sleeper).unwrap();
    assert_eq!(owner.uid(), CRI_HOST_ID);
    let busybox = std::fs::metadata(sleeper.join("root/bin/busybox")).unwrap();
    assert_eq!((busybox.uid(), busybox.gid()), (CRI_HOST_ID, CRI_HOST_ID));

    cri.stop_pod_sandbox(&sandbox).await.unwrap();
    cri.remove_pod_sandbox(&sandbox).await.unwrap();
    // Removing the pod removed its snapshot, and with it its idmapped clones.
    let idmapped = daemon.root.join("idmapped");
    let released = testkit::wait_until(Duration::from_secs(30), || {
        std::fs::read_dir(&idmapped).map_or(0, |d| d.count()) == 0
    });
    assert!(
        released,
        "idmapped clones left: {:?}",
        mounts_under(&idmapped)
    );
    drop(cri);
}
