//! Root tests through the kernel: a real tree, tarred and extracted by GNU tar,
//! converted to eStargz and zstd:chunked, mounted with FUSE and compared entry by entry;
//! two mounts stacked under overlayfs. Skipped with a message when not root.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use estargz::{Layer, OutputFormat, VecBlob, WriterOptions};
use fusefs::{CacheConfig, FsConfig, MountedLayer, SharedCache};
use sha2::{Digest, Sha256};

const CHUNK: u64 = 256 << 10;

/// Held by a test that drops the kernel's caches (dentries and inodes, system-wide) and
/// by the tests that count what the kernel asks while its caches are warm: a drop in the
/// middle of those makes the kernel ask again.
static KERNEL_CACHES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn kernel_caches() -> std::sync::MutexGuard<'static, ()> {
    KERNEL_CACHES.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A tree with every kind of entry GNU tar and the formats carry.
fn make_tree(root: &Path) {
    let p = |rel: &str| root.join(rel);
    for d in [
        "usr/bin",
        "usr/lib/deep/er",
        "etc",
        "tmp",
        "empty",
        "private",
    ] {
        std::fs::create_dir_all(p(d)).unwrap();
    }
    let sizes = [
        0usize,
        1,
        511,
        4095,
        4096,
        65_537,
        CHUNK as usize,
        3 * CHUNK as usize + 17,
    ];
    for (i, size) in sizes.iter().enumerate() {
        std::fs::write(p(&format!("usr/lib/f{i}")), pattern(*size, i as u64)).unwrap();
    }
    std::fs::write(p("usr/lib/deep/er/zeros"), vec![0u8; 2 * CHUNK as usize]).unwrap();
    std::fs::write(p("usr/bin/tool"), pattern(300_000, 77)).unwrap();
    std::fs::write(p("etc/conf"), b"key=value\n").unwrap();
    std::fs::write(p("private/secret"), b"s").unwrap();
    std::os::unix::fs::symlink("tool", p("usr/bin/rel")).unwrap();
    std::os::unix::fs::symlink("/etc/conf", p("usr/bin/abs")).unwrap();
    std::os::unix::fs::symlink("../nowhere", p("etc/dangling")).unwrap();
    std::fs::hard_link(p("usr/bin/tool"), p("usr/bin/tool-hard")).unwrap();
    std::fs::hard_link(p("usr/bin/tool"), p("etc/tool-hard2")).unwrap();
    nix::unistd::mkfifo(
        &p("etc/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &p("etc/null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    xattr::set(p("etc/conf"), "user.color", b"blue").unwrap();
    xattr::set(p("etc/conf"), "user.bin", b"\x00\x01\xfe").unwrap();
    xattr::set(p("usr/lib"), "user.dir", b"yes").unwrap();
    let modes = [
        ("usr/bin/tool", 0o4755),
        ("usr/lib/f1", 0o2711),
        ("usr/lib/f2", 0o000),
        ("usr/lib/f3", 0o600),
        ("tmp", 0o1777),
        ("private", 0o700),
        ("etc/conf", 0o644),
    ];
    for (rel, mode) in modes {
        std::fs::set_permissions(p(rel), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::os::unix::fs::lchown(p("private"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(p("private/secret"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(p("usr/bin/rel"), Some(42), Some(43)).unwrap();
    // Distinct mtimes, children before parents so the parents keep theirs.
    let mut all = walk(root);
    all.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.matches('/').count()));
    for (i, (_, path)) in all.iter().enumerate() {
        let t = filetime::FileTime::from_unix_time(1_600_000_000 + i as i64 * 1000, 0);
        filetime::set_symlink_file_times(path, t, t).unwrap();
    }
}

/// Every path under `root` (relative, "" for root), sorted.
fn walk(root: &Path) -> Vec<(String, PathBuf)> {
    fn go(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((rel, path.clone()));
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                go(root, &path, out);
            }
        }
    }
    let mut out = vec![(String::new(), root.to_path_buf())];
    go(root, root, &mut out);
    out
}

#[derive(Debug, PartialEq)]
struct Observed {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: Option<u64>,
    mtime: i64,
    nlink: Option<u64>,
    rdev: Option<u64>,
    link: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    sha256: Option<String>,
}

/// Everything observable about a tree, plus hardlink groups (paths sharing an inode).
fn observe(root: &Path) -> (BTreeMap<String, Observed>, Vec<Vec<String>>) {
    let mut out = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (rel, path) in walk(root) {
        let m = std::fs::symlink_metadata(&path).unwrap();
        let t = m.file_type();
        let kind = if t.is_dir() {
            "dir"
        } else if t.is_file() {
            "file"
        } else if t.is_symlink() {
            "symlink"
        } else if t.is_fifo() {
            "fifo"
        } else if t.is_char_device() {
            "char"
        } else {
            "other"
        };
        let mut xattrs = BTreeMap::new();
        if !t.is_symlink() {
            for name in xattr::list(&path).unwrap() {
                let name = name.to_string_lossy().into_owned();
                if name.starts_with("user.") {
                    xattrs.insert(name.clone(), xattr::get(&path, &name).unwrap().unwrap());
                }
            }
        }
        let sha256 = t.is_file().then(|| {
            let data = std::fs::read(&path).unwrap();
            format!("{:x}", Sha256::digest(&data))
        });
        if t.is_file() {
            by_ino.entry(m.ino()).or_default().push(rel.clone());
        }
        out.insert(
            rel,
            Observed {
                kind,
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                // Directory sizes are a property of the filesystem, not of the layer.
                size: (!t.is_dir()).then(|| m.size()),
                mtime: m.mtime(),
                nlink: t.is_file().then(|| m.nlink()),
                rdev: (t.is_char_device() || t.is_block_device()).then(|| m.rdev()),
                link: t.is_symlink().then(|| std::fs::read_link(&path).unwrap()),
                xattrs,
                sha256,
            },
        );
    }
    let mut groups: Vec<Vec<String>> = by_ino.into_values().filter(|g| g.len() > 1).collect();
    for g in &mut groups {
        g.sort();
    }
    groups.sort();
    (out, groups)
}

/// Unmounts (lazily) whatever is still mounted under a directory when dropped, so a
/// failing test leaves nothing behind; checks that nothing is left.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in testkit::containerd::mounts_under(&self.0) {
            testkit::containerd::unmount_detach(&m);
        }
    }
}

struct Env {
    rt: tokio::runtime::Runtime,
    cache: SharedCache,
    dir: tempfile::TempDir,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::open(CacheConfig::new(dir.path().join("cache"))).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    Env { rt, cache, dir }
}

impl Env {
    fn mount(&self, blob: Vec<u8>, name: &str, config: FsConfig) -> MountedLayer {
        let blob: Arc<dyn estargz::BlobReader> = Arc::new(VecBlob::new(blob));
        let layer = self
            .rt
            .block_on(Layer::open(blob, &Default::default()))
            .unwrap();
        let mp = self.dir.path().join(name);
        std::fs::create_dir_all(&mp).unwrap();
        fusefs::mount(
            Arc::new(layer),
            &mp,
            None,
            &fusefs::Backing::new(self.cache.clone(), self.rt.handle().clone(), &config),
            config,
        )
        .unwrap()
    }
}

fn tar_dir(src: &Path, out: &Path) {
    run(Command::new("tar")
        .args([
            "--format=posix",
            "--xattrs",
            "--xattrs-include=user.*",
            "--numeric-owner",
        ])
        .arg("-C")
        .arg(src)
        .arg("-cf")
        .arg(out)
        .arg("."));
}

fn convert(tar: &Path, format: OutputFormat) -> Vec<u8> {
    let mut out = Vec::new();
    let opts = WriterOptions {
        format,
        chunk_size: CHUNK,
        ..Default::default()
    };
    estargz::convert(std::fs::File::open(tar).unwrap(), &mut out, &opts).unwrap();
    out
}

fn is_mounted(path: &Path) -> bool {
    testkit::containerd::mounts_under(path).contains(&path.to_path_buf())
}

#[test]
fn mounted_layers_match_the_tree_gnu_tar_extracts() {
    if testkit::skip_unless_root("mounted_layers_match_the_tree_gnu_tar_extracts") {
        return;
    }
    let env = env();
    let _cleanup = Cleanup(env.dir.path().to_path_buf());
    let work = env.dir.path();
    let src = work.join("src");
    make_tree(&src);
    let tar = work.join("layer.tar");
    tar_dir(&src, &tar);
    let reference = work.join("ref");
    std::fs::create_dir(&reference).unwrap();
    run(Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=user.*",
            "--numeric-owner",
            "-xpf",
        ])
        .arg(&tar)
        .arg("-C")
        .arg(&reference));
    let (want, want_links) = observe(&reference);
    assert!(want_links.iter().any(|g| g.len() == 3), "{want_links:?}");

    for (name, format) in [
        ("estargz", OutputFormat::Estargz),
        ("zstd", OutputFormat::ZstdChunked),
    ] {
        let mut mounted = env.mount(convert(&tar, format), name, FsConfig::default());
        let mp = mounted.mountpoint().to_path_buf();
        assert!(is_mounted(&mp));
        let (got, got_links) = observe(&mp);
        // The mount root is the layer's root directory.
        for (path, w) in &want {
            let g = got
                .get(path)
                .unwrap_or_else(|| panic!("{name}: {path:?} missing"));
            assert_eq!(g, w, "{name}: {path:?}");
        }
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}"
        );
        assert_eq!(got_links, want_links, "{name}");

        // Missing names stay missing (negative entries are cached by the kernel).
        for _ in 0..2 {
            let err = std::fs::symlink_metadata(mp.join("usr/nope")).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        }
        let err = std::fs::symlink_metadata(mp.join("etc/conf/x")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));

        // Read-only, with real statfs figures.
        let err = std::fs::OpenOptions::new()
            .write(true)
            .open(mp.join("etc/conf"))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        assert_eq!(
            std::fs::create_dir(mp.join("new"))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EROFS)
        );
        // statfs (kubelet's image-filesystem accounting, `df`): the cache filesystem's.
        let st = nix::sys::statvfs::statvfs(&mp).unwrap();
        let cache_fs = nix::sys::statvfs::statvfs(&work.join("cache")).unwrap();
        assert_eq!(
            (st.blocks(), st.files(), st.fragment_size()),
            (
                cache_fs.blocks(),
                cache_fs.files(),
                cache_fs.fragment_size()
            )
        );
        assert!(st.blocks_available() > 0 && st.files_free() > 0, "{st:?}");
        let mount = fusefs::mountinfo::mounts()
            .into_iter()
            .find(|m| m.mount_point == mp)
            .unwrap();
        assert_eq!(
            (mount.fs_type.as_str(), mount.source.as_str()),
            ("fuse.lazysnap", "lazysnap")
        );
        assert!(
            mount.options.contains("default_permissions") && mount.options.contains("allow_other"),
            "{mount:?}"
        );

        // Many threads reading one big file at once all see the right bytes.
        let big = std::fs::read(reference.join("usr/lib/f7")).unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| assert_eq!(std::fs::read(mp.join("usr/lib/f7")).unwrap(), big));
            }
        });
        let stats = mounted.stats();
        assert_eq!(stats.verification_failures, 0);
        if name == "estargz" {
            assert!(stats.range_requests > 0);
        } else {
            // Same content, same chunk digests: the shared disk cache already had it all.
            assert_eq!(stats.range_requests, 0, "{stats:?}");
            assert!(stats.cache_hits > 0);
        }
        env.rt.block_on(mounted.prefetch_done());

        // Once in several CI runs the kernel still counted a user of the mount right
        // after the readers closed their files (EBUSY); a user that goes away must not
        // fail the test, one that stays still does.
        assert!(testkit::wait_until(Duration::from_secs(5), || mounted
            .unmount()
            .is_ok()));
        assert!(!is_mounted(&mp));
    }
}

fn layer_from(work: &Path, name: &str, build: impl FnOnce(&Path)) -> Vec<u8> {
    let src = work.join(format!("{name}-src"));
    std::fs::create_dir_all(&src).unwrap();
    build(&src);
    let tar = work.join(format!("{name}.tar"));
    tar_dir(&src, &tar);
    convert(&tar, OutputFormat::Estargz)
}

#[test]
fn overlayfs_stacks_mounts_with_whiteouts_and_opaque_dirs() {
    if testkit::skip_unless_root("overlayfs_stacks_mounts_with_whiteouts_and_opaque_dirs") {
        return;
    }
    let env = env();
    let _cleanup = Cleanup(env.dir.path().to_path_buf());
    let work = env.dir.path();
    let lower = layer_from(work, "lower", |d| {
        std::fs::create_dir_all(d.join("app/cfg")).unwrap();
        std::fs::write(d.join("app/keep"), b"keep").unwrap();
        std::fs::write(d.join("app/gone"), b"gone").unwrap();
        std::fs::write(d.join("app/cfg/old1"), b"old1").unwrap();
        std::fs::write(d.join("app/cfg/old2"), b"old2").unwrap();
        std::fs::write(d.join("app/over"), b"lower").unwrap();
    });
    let upper = layer_from(work, "upper", |d| {
        std::fs::create_dir_all(d.join("app/cfg")).unwrap();
        std::fs::write(d.join("app/.wh.gone"), b"").unwrap();
        std::fs::write(d.join("app/cfg/.wh..wh..opq"), b"").unwrap();
        std::fs::write(d.join("app/cfg/new"), b"new").unwrap();
        std::fs::write(d.join("app/over"), b"upper").unwrap();
    });
    let lower_m = env.mount(lower, "lower-mnt", FsConfig::default());
    let upper_m = env.mount(upper, "upper-mnt", FsConfig::default());
    let merged = work.join("merged");
    std::fs::create_dir(&merged).unwrap();
    let opts = format!(
        "lowerdir={}:{}",
        upper_m.mountpoint().display(),
        lower_m.mountpoint().display()
    );
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged));
    let list = |rel: &str| {
        let mut v: Vec<String> = std::fs::read_dir(merged.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(list("app"), ["cfg", "keep", "over"]);
        assert_eq!(list("app/cfg"), ["new"]);
        assert!(!merged.join("app/gone").exists());
        assert_eq!(std::fs::read(merged.join("app/over")).unwrap(), b"upper");
        assert_eq!(std::fs::read(merged.join("app/keep")).unwrap(), b"keep");
        assert_eq!(std::fs::read(merged.join("app/cfg/new")).unwrap(), b"new");
        // The upper mount itself shows overlay's on-disk conventions.
        let wh = std::fs::symlink_metadata(upper_m.mountpoint().join("app/gone")).unwrap();
        assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
        assert_eq!(
            xattr::get(
                upper_m.mountpoint().join("app/cfg"),
                "trusted.overlay.opaque"
            )
            .unwrap()
            .as_deref(),
            Some(&b"y"[..])
        );
    }));
    run(Command::new("umount").arg(&merged));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    let (mut upper_m, mut lower_m) = (upper_m, lower_m);
    upper_m.unmount().unwrap();
    lower_m.unmount().unwrap();
    assert!(testkit::containerd::mounts_under(work).is_empty());
}

#[test]
fn dropping_a_busy_mount_detaches_it() {
    if testkit::skip_unless_root("dropping_a_busy_mount_detaches_it") {
        return;
    }
    let env = env();
    let _cleanup = Cleanup(env.dir.path().to_path_buf());
    let blob = layer_from(env.dir.path(), "busy", |d| {
        std::fs::write(d.join("f"), b"data").unwrap();
    });
    let mut m = env.mount(blob, "busy-mnt", FsConfig::default());
    let mp = m.mountpoint().to_path_buf();
    let open = std::fs::File::open(mp.join("f")).unwrap();
    // Busy: a plain unmount refuses and the mount stays usable.
    assert!(m.unmount().is_err());
    assert!(is_mounted(&mp));
    assert_eq!(std::fs::read(mp.join("f")).unwrap(), b"data");
    drop(m);
    assert!(!is_mounted(&mp));
    drop(open);
    assert!(testkit::wait_until(Duration::from_secs(5), || {
        testkit::containerd::mounts_under(env.dir.path()).is_empty()
    }));
}

#[test]
fn a_file_read_whole_is_then_served_by_kernel_passthrough_even_under_overlayfs() {
    if testkit::skip_unless_root("a_file_read_whole_is_then_served_by_kernel_passthrough") {
        return;
    }
    let _caches = kernel_caches();
    let env = env();
    let _cleanup = Cleanup(env.dir.path().to_path_buf());
    let work = env.dir.path();
    let big = pattern(3 << 20, 11);
    let blob = layer_from(work, "pt", |d| {
        std::fs::write(d.join("big"), &big).unwrap();
        std::fs::write(d.join("small"), b"small").unwrap();
    });
    let config = FsConfig {
        prefetch: false,
        background_fetch: false,
        passthrough: true,
        ..FsConfig::default()
    };
    let mut m = env.mount(blob, "pt-mnt", config);
    let mp = m.mountpoint().to_path_buf();
    assert_eq!(std::fs::read(mp.join("big")).unwrap(), big);
    // The close reaches the daemon asynchronously; then the copy is written.
    let files = work.join("cache/files");
    assert!(testkit::wait_until(Duration::from_secs(10), || {
        walk(&files).iter().any(|(_, p)| p.is_file())
    }));
    env.rt.block_on(m.fs().writes_settled());
    let served = |m: &MountedLayer| {
        let s = m.stats();
        s.cache_hits + s.cache_misses
    };
    let before = served(&m);
    // Two opens at once share the inode's backing file; overlayfs stacks on top.
    let (merged, upper, ovl_work) = (work.join("merged"), work.join("up"), work.join("ovl"));
    for d in [&merged, &upper, &ovl_work] {
        std::fs::create_dir(d).unwrap();
    }
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            mp.display(),
            upper.display(),
            ovl_work.display()
        ))
        .arg(&merged));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let held = std::fs::File::open(mp.join("big")).unwrap();
        std::process::Command::new("sh")
            .arg("-c")
            .arg("echo 3 > /proc/sys/vm/drop_caches")
            .status()
            .unwrap();
        assert_eq!(std::fs::read(mp.join("big")).unwrap(), big);
        assert_eq!(std::fs::read(merged.join("big")).unwrap(), big);
        let mut again = Vec::new();
        std::io::Read::read_to_end(&mut &held, &mut again).unwrap();
        assert_eq!(again, big);
    }));
    run(Command::new("umount").arg(&merged));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert_eq!(
        served(&m),
        before,
        "the kernel read the local copy without asking the daemon"
    );
    m.unmount().unwrap();
    assert!(testkit::containerd::mounts_under(work).is_empty());
}

/// Requests of one opcode the mount has served so far.
fn served_ops(m: &MountedLayer, op: &str) -> u64 {
    m.stats()
        .op_latency
        .iter()
        .find(|h| h.op == op)
        .map_or(0, |h| h.count)
}

#[test]
fn a_warm_tree_is_opened_listed_and_read_without_asking_the_daemon() {
    if testkit::skip_unless_root("a_warm_tree_is_opened_listed_and_read_without_asking_the_daemon")
    {
        return;
    }
    let _caches = kernel_caches();
    let env = env();
    let _cleanup = Cleanup(env.dir.path().to_path_buf());
    let work = env.dir.path();
    let blob = layer_from(work, "warm", |d| {
        for i in 0..20 {
            std::fs::create_dir_all(d.join(format!("d{i}"))).unwrap();
            std::fs::write(d.join(format!("d{i}/f")), format!("file {i}")).unwrap();
        }
    });
    let mut m = env.mount(blob, "warm-mnt", FsConfig::default());
    let mp = m.mountpoint().to_path_buf();
    let walk_and_read = || {
        let mut seen = 0;
        for dir in std::fs::read_dir(&mp).unwrap() {
            let dir = dir.unwrap().path();
            for f in std::fs::read_dir(&dir).unwrap() {
                let f = f.unwrap().path();
                let i: usize = dir.file_name().unwrap().to_str().unwrap()[1..]
                    .parse()
                    .unwrap();
                assert_eq!(std::fs::read_to_string(&f).unwrap(), format!("file {i}"));
                seen += 1;
            }
        }
        assert_eq!(seen, 20);
    };
    walk_and_read();
    // A read that waited for its chunk is counted by the task that answered it, just
    // after the answer: count once the counts stop moving.
    let counts =
        || ["open", "opendir", "read", "readdir", "readdirplus"].map(|op| served_ops(&m, op));
    let mut first = counts();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = counts();
        if now == first {
            break;
        }
        first = now;
    }
    // The kernel was told once that opens need no daemon: a layer served so takes at
    // most one OPEN and one OPENDIR.
    assert!(first[0] <= 1 && first[1] <= 1, "open, opendir: {first:?}");
    assert_eq!(
        xattr::get(mp.join("d1/f"), "user.x").map_err(|e| e.raw_os_error()),
        Ok(None),
        "no extended attribute here, and not EOPNOTSUPP either (containerd's diff fails on it)"
    );
    walk_and_read();
    walk_and_read();
    let again = counts();
    assert_eq!(
        (again[0], again[1], again[2], again[3] + again[4]),
        (first[0], first[1], first[2], first[3] + first[4]),
        "opens, listings and reads of a warm tree all come from the kernel's caches"
    );
    m.unmount().unwrap();
    assert!(testkit::containerd::mounts_under(work).is_empty());
}

#[test]
fn a_long_listing_of_a_wide_directory_takes_no_request_per_name() {
    if testkit::skip_unless_root("a_long_listing_of_a_wide_directory_takes_no_request_per_name") {
        return;
    }
    const NAMES: usize = 20_000;
    let _caches = kernel_caches();
    let env = env();
    let _cleanup = Cleanup(env.dir.path().to_path_buf());
    let mut toc =
        String::from(r#"{"version":1,"entries":[{"name":"wide/","type":"dir","mode":493}"#);
    for i in 0..NAMES {
        toc.push_str(&format!(
            r#",{{"name":"wide/f{i:05}","type":"reg","size":0,"mode":420}}"#
        ));
    }
    toc.push_str("]}");
    let (blob, _, _) = testkit::image::estargz_of_toc(toc.as_bytes()).unwrap();
    let mut m = env.mount(blob, "wide-mnt", FsConfig::default());
    let out = Command::new("ls")
        .arg("-ln")
        .arg(m.mountpoint().join("wide"))
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(lines.len(), NAMES, "a line per name after the total");
    for (i, line) in lines.iter().enumerate() {
        assert!(
            line.starts_with("-rw-r--r-- 1 0 0 0 ") && line.ends_with(&format!(" f{i:05}")),
            "{line}"
        );
    }
    let (lookups, listings) = (served_ops(&m, "lookup"), served_ops(&m, "readdirplus"));
    assert!(
        lookups < 10,
        "ls -l of {NAMES} names took {lookups} LOOKUPs: the attributes should come with \
         the listing ({listings} READDIRPLUS)"
    );
    m.unmount().unwrap();
}
