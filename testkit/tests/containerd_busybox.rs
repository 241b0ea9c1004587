//! End to end through real peers: a busybox image built here, pushed to docker-registry with
//! curl, pulled and run by containerd 1.6 on its built-in overlayfs snapshotter; then every
//! mount and process is gone once the guards are dropped.

use std::path::PathBuf;

use testkit::containerd::{Containerd, ContainerdOptions, mounts_under, process_alive, shims_of};
use testkit::image::{Entry, ImageBuilder, busybox_layer};
use testkit::registry::Registry;

/// What must be gone after the drop: the temp dirs (nothing mounted) and the processes.
struct Leftovers {
    dirs: Vec<PathBuf>,
    pids: Vec<u32>,
    socket: PathBuf,
    namespace: String,
}

impl Leftovers {
    fn of(registry: &Registry, containerd: &Containerd) -> Self {
        Self {
            dirs: vec![registry.dir.clone(), containerd.dir().to_path_buf()],
            pids: vec![registry.pid(), containerd.pid()],
            socket: containerd.address().to_path_buf(),
            namespace: containerd.namespace().to_string(),
        }
    }

    fn assert_clean(&self) {
        for dir in &self.dirs {
            assert_eq!(mounts_under(dir), Vec::<PathBuf>::new(), "still mounted");
        }
        for pid in &self.pids {
            assert!(!process_alive(*pid), "process {pid} still alive");
        }
        assert_eq!(shims_of(&self.socket), Vec::<u32>::new(), "shims left");
        // runc's host-wide state and the namespace's cgroups (v1: one per hierarchy).
        let mut host_wide = vec![PathBuf::from("/run/containerd/runc").join(&self.namespace)];
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            host_wide.push(hierarchy.path().join(&self.namespace));
        }
        for path in host_wide {
            assert!(!path.exists(), "{} left behind", path.display());
        }
        assert!(
            !self.dirs[1].exists(),
            "containerd dir {} not removed",
            self.dirs[1].display()
        );
    }
}

#[test]
fn busybox_pushed_pulled_and_run_on_overlayfs() -> anyhow::Result<()> {
    if testkit::skip_unless_root("busybox_pushed_pulled_and_run_on_overlayfs") {
        return Ok(());
    }
    let registry_dir = tempfile::tempdir()?;
    let registry = Registry::start(registry_dir.path())?;
    let containerd = Containerd::start()?;
    let leftovers = Leftovers::of(&registry, &containerd);

    // A second layer exercises whiteouts, hardlinks and annotations on the way through.
    let image = ImageBuilder::new()
        .layer(busybox_layer()?)
        .entries(&[
            Entry::dir("etc"),
            Entry::file("etc/motd", "hello-from-layer-two\n"),
            Entry::hardlink("etc/motd.link", "etc/motd"),
            Entry::whiteout("etc/group"),
        ])?
        .cmd(&["/bin/sh"])
        .build()?;
    let reference = registry.push("test/busybox", "1", &image)?;
    assert_eq!(reference, format!("{}/test/busybox:1", registry.host));

    containerd.ctr(["image", "pull", "--plain-http", &reference])?;
    let images = containerd.ctr(["image", "ls", "-q"])?;
    assert!(images.contains(&reference), "image ls: {images}");

    let out = containerd.ctr([
        "run",
        "--rm",
        &reference,
        "hello",
        "echo",
        "hello-from-busybox",
    ])?;
    assert!(
        out.contains("hello-from-busybox"),
        "ctr run printed {out:?}"
    );

    // The upper layer's file and hardlink are there; its whiteout hid the lower etc/group.
    let out = containerd.ctr([
        "run",
        "--rm",
        &reference,
        "layers",
        "sh",
        "-c",
        "cat /etc/motd.link; test -e /etc/group || echo group-whited-out",
    ])?;
    assert!(out.contains("hello-from-layer-two"), "got {out:?}");
    assert!(out.contains("group-whited-out"), "got {out:?}");

    containerd.ctr(["image", "rm", "--sync", &reference])?;
    let images = containerd.ctr(["image", "ls", "-q"])?;
    assert!(!images.contains(&reference), "image still listed: {images}");

    drop(containerd);
    drop(registry);
    leftovers.assert_clean();
    Ok(())
}

/// A container still running at drop time is killed, its rootfs unmounted, its shim gone;
/// the image came in as an OCI layout archive rather than from a registry.
#[test]
fn drop_cleans_up_a_running_container() -> anyhow::Result<()> {
    if testkit::skip_unless_root("drop_cleans_up_a_running_container") {
        return Ok(());
    }
    let registry_dir = tempfile::tempdir()?;
    let registry = Registry::start(registry_dir.path())?;
    let containerd = Containerd::start()?;
    let leftovers = Leftovers::of(&registry, &containerd);

    let image = ImageBuilder::new().layer(busybox_layer()?).build()?;
    let layout = tempfile::tempdir()?;
    let name = "example.test/layout/busybox:1";
    image.write_oci_layout(layout.path(), Some(name))?;
    let archive = layout.path().with_extension("tar");
    let mut builder = tar::Builder::new(std::fs::File::create(&archive)?);
    builder.append_dir_all(".", layout.path())?;
    builder.into_inner()?;
    containerd.ctr(["image", "import", archive.to_str().expect("utf-8 path")])?;
    std::fs::remove_file(&archive)?;
    let images = containerd.ctr(["image", "ls", "-q"])?;
    assert!(images.contains(name), "image ls after import: {images}");

    containerd.ctr(["run", "-d", name, "sleeper", "sleep", "1000"])?;
    let ready = testkit::wait_until(std::time::Duration::from_secs(20), || {
        containerd
            .ctr(["task", "ls"])
            .is_ok_and(|tasks| tasks.contains("sleeper") && tasks.contains("RUNNING"))
    });
    assert!(
        ready,
        "sleeper never ran: {:?}",
        containerd.ctr(["task", "ls"])
    );
    assert!(
        !containerd.mounts().is_empty(),
        "a running container has a mounted rootfs"
    );
    let shims = shims_of(containerd.address());
    assert_eq!(shims.len(), 1, "one shim for one container: {shims:?}");
    let mut leftovers = leftovers;
    leftovers.pids.extend(shims);

    drop(containerd);
    drop(registry);
    leftovers.assert_clean();
    Ok(())
}

/// The options reach containerd's config: CRI kept on request, proxy snapshotters listed.
#[test]
fn options_keep_cri_and_add_proxy_snapshotters() -> anyhow::Result<()> {
    if testkit::skip_unless_root("options_keep_cri_and_add_proxy_snapshotters") {
        return Ok(());
    }
    let plain = Containerd::start()?;
    let plugins = plain.ctr(["plugins", "ls"])?;
    assert!(
        !plugins.contains(" cri "),
        "CRI is off by default:\n{plugins}"
    );
    drop(plain);

    let socket_dir = tempfile::tempdir()?;
    // The proxy connects lazily, so no server needs to listen for the plugin to be listed.
    let options = ContainerdOptions::default()
        .keep_cri()
        .proxy_snapshotter("testproxy", &socket_dir.path().join("proxy.sock"))
        .namespace("custom-ns");
    let containerd = Containerd::start_with(&options)?;
    assert_eq!(containerd.namespace(), "custom-ns");
    let plugins = containerd.ctr(["plugins", "ls"])?;
    let listed = |kind: &str, id: &str| {
        plugins.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.first() == Some(&kind) && fields.get(1) == Some(&id)
        })
    };
    assert!(listed("io.containerd.grpc.v1", "cri"), "{plugins}");
    assert!(
        listed("io.containerd.snapshotter.v1", "testproxy"),
        "{plugins}"
    );
    Ok(())
}
