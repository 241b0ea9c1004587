//! The benchmark images, built from recipes and cached as OCI layouts under a directory
//! named by the recipe's hash: the same recipe is built once, a changed one anew.
//!
//! - `python`: Debian bookworm (debootstrap, minbase) with python3, numpy, scipy and
//!   pandas from Debian's archive, split into four layers; imports pandas and scipy.
//! - `small-files`: busybox and 100,000 small files; reads one and lists them all.
//! - `random-part`: busybox and one 1 GiB file of random bytes; reads 32 MiB of it.
//! - `read-all`: busybox and one 1 GiB file of random bytes, read completely (the shape
//!   of an image that loads a model).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use super::oci::{LayerBuilder, LayerFile, write_layout};
use crate::layergen::Rng;

/// Bump when the builder's output changes for the same recipe.
const BUILDER_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageKind {
    Python,
    SmallFiles,
    RandomPart,
    ReadAll,
}

impl ImageKind {
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Python => "python",
            ImageKind::SmallFiles => "small-files",
            ImageKind::RandomPart => "random-part",
            ImageKind::ReadAll => "read-all",
        }
    }

    /// The container's command.
    pub fn cmd(self) -> Vec<String> {
        let sh = |script: &str| vec!["/bin/sh".into(), "-c".into(), script.into()];
        match self {
            // First line when the interpreter runs; the exit after the imports.
            ImageKind::Python => vec![
                "/usr/bin/python3".into(),
                "-c".into(),
                "import sys; print('python', sys.version.split()[0], flush=True); \
                 import pandas, scipy.stats; \
                 print('pandas', pandas.__version__, 'scipy', scipy.__version__)"
                    .into(),
            ],
            ImageKind::SmallFiles => {
                sh("echo start; cat /data/d042/f042042 | wc -c; ls -lR /data | wc -l")
            }
            ImageKind::RandomPart => sh(
                "echo start; dd if=/data/random.bin bs=1048576 skip=512 count=32 2>/dev/null | md5sum",
            ),
            ImageKind::ReadAll => sh("echo start; md5sum /model/weights.bin"),
        }
    }

    /// The tree the warm mode's data and metadata passes read, for images that have
    /// GNU tar, find and date (the Debian-based ones); `None` for the busybox ones.
    pub fn warm_tree(self) -> Option<&'static str> {
        match self {
            ImageKind::Python => Some("/usr"),
            ImageKind::SmallFiles | ImageKind::RandomPart | ImageKind::ReadAll => None,
        }
    }

    fn env(self) -> Vec<String> {
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()]
    }
}

/// Where Debian comes from, for the python image.
#[derive(Clone, Debug)]
pub struct DebianSource {
    pub mirror: String,
    pub suite: String,
}

const PYTHON_PACKAGES: &str = "python3,python3-numpy,python3-scipy,python3-pandas";

/// Everything the image's bytes depend on, hashed to name its cache directory.
fn recipe(kind: ImageKind, debian: &DebianSource) -> String {
    let mut r = format!(
        "builder {BUILDER_VERSION}\nimage {}\ncmd {:?}\n",
        kind.name(),
        kind.cmd()
    );
    if kind == ImageKind::Python {
        r.push_str(&debootstrap_line(debian));
        r.push_str("\nmtimes: .py kept, others clamped\n");
    }
    r
}

fn debootstrap_line(debian: &DebianSource) -> String {
    format!(
        "debootstrap --variant=minbase --include={PYTHON_PACKAGES} {} {}",
        debian.suite, debian.mirror
    )
}

/// The debootstrapped tree, shared by every recipe that packs it (named by its command).
fn rootfs_dir(cache: &Path, debian: &DebianSource) -> PathBuf {
    let h = Sha256::digest(debootstrap_line(debian).as_bytes());
    cache.join(format!("debian-rootfs-{}", &format!("{h:x}")[..16]))
}

pub fn recipe_hash(kind: ImageKind, debian: &DebianSource) -> String {
    let h = Sha256::digest(recipe(kind, debian).as_bytes());
    format!("{:x}", h)[..16].to_string()
}

/// The image's cache directory: `plain/` (the gzip OCI layout) and the other forms.
pub fn image_dir(cache: &Path, kind: ImageKind, debian: &DebianSource) -> PathBuf {
    cache.join(format!("{}-{}", kind.name(), recipe_hash(kind, debian)))
}

/// Builds the plain (gzip) layout of `kind` unless the cache has it; returns its path.
pub fn build_plain(
    cache: &Path,
    kind: ImageKind,
    debian: &DebianSource,
    say: &dyn Fn(&str),
) -> anyhow::Result<PathBuf> {
    let dir = image_dir(cache, kind, debian);
    let layout = dir.join("plain");
    if layout.join("index.json").is_file() {
        return Ok(layout);
    }
    std::fs::create_dir_all(&dir)?;
    let partial = dir.join("plain.partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    say(&format!(
        "building the {} image in {}",
        kind.name(),
        dir.display()
    ));
    let layers = match kind {
        ImageKind::Python => python_layers(&rootfs_dir(cache, debian), &partial, debian, say)?,
        ImageKind::SmallFiles => vec![busybox_layer(&partial)?, small_files_layer(&partial)?],
        ImageKind::RandomPart => vec![
            busybox_layer(&partial)?,
            random_layer(&partial, "data", "random.bin", 1 << 30, 0x5eed_0001)?,
        ],
        ImageKind::ReadAll => vec![
            busybox_layer(&partial)?,
            random_layer(&partial, "model", "weights.bin", 1 << 30, 0x5eed_0002)?,
        ],
    };
    write_layout(&partial, &layers, &kind.cmd(), &kind.env(), "latest")?;
    std::fs::write(dir.join("recipe.txt"), recipe(kind, debian))?;
    std::fs::rename(&partial, &layout)?;
    Ok(layout)
}

/// busybox (Debian's busybox-static, as the tests use it) with its applet links.
fn busybox_layer(layout: &Path) -> anyhow::Result<LayerFile> {
    let mut layer = LayerBuilder::new(layout, 6)?;
    let mut dirs = std::collections::BTreeSet::new();
    let entries = testkit::image::busybox_entries()?;
    for entry in &entries {
        add_testkit_entry(&mut layer, entry, &mut dirs)?;
    }
    layer.finish()
}

fn add_testkit_entry(
    layer: &mut LayerBuilder,
    entry: &testkit::image::Entry,
    dirs: &mut std::collections::BTreeSet<String>,
) -> anyhow::Result<()> {
    use testkit::image::Entry;
    match entry {
        Entry::Dir { path, mode } => {
            if dirs.insert(path.clone()) {
                layer.dir(path, *mode)?;
            }
        }
        Entry::File {
            path,
            content,
            mode,
        } => layer.file(path, *mode, content)?,
        Entry::Symlink { path, target } => layer.symlink(path, target)?,
        other => bail!("busybox layer: unexpected entry {other:?}"),
    }
    Ok(())
}

/// 100 directories of 1,000 files of 64 bytes to 8 KiB of text-like bytes.
fn small_files_layer(layout: &Path) -> anyhow::Result<LayerFile> {
    let mut layer = LayerBuilder::new(layout, 6)?;
    layer.dir("data", 0o755)?;
    let mut rng = Rng::new(0x5ea1_f11e);
    let mut buf = Vec::new();
    for d in 0..100u32 {
        let dir = format!("data/d{d:03}");
        layer.dir(&dir, 0o755)?;
        for f in 0..1000u32 {
            let size = rng.log_uniform(64, 8192) as usize;
            buf.clear();
            // Letters with some repetition, so the files compress like text.
            while buf.len() < size {
                let word = rng.below(1 << 12);
                buf.extend_from_slice(format!("w{word:x} ").as_bytes());
            }
            buf.truncate(size);
            layer.file(&format!("{dir}/f{:06}", d * 1000 + f), 0o644, &buf)?;
        }
    }
    layer.finish()
}

/// Reads `len` pseudo-random bytes (incompressible) from a seeded generator.
struct RandomReader {
    rng: Rng,
    left: u64,
}

impl Read for RandomReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = (out.len() as u64).min(self.left) as usize / 8 * 8;
        let n = if n == 0 {
            self.left.min(out.len() as u64) as usize
        } else {
            n
        };
        for chunk in out[..n].chunks_mut(8) {
            let b = self.rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn random_layer(
    layout: &Path,
    dir: &str,
    name: &str,
    len: u64,
    seed: u64,
) -> anyhow::Result<LayerFile> {
    // Level 1: random bytes do not compress at any level, and 9 would only cost time.
    let mut layer = LayerBuilder::new(layout, 1)?;
    layer.dir(dir, 0o755)?;
    let reader = RandomReader {
        rng: Rng::new(seed),
        left: len,
    };
    layer.file_from(&format!("{dir}/{name}"), 0o644, len, reader)?;
    layer.finish()
}

/// Which of the four python layers a path belongs to: a base system, the interpreter
/// and its small pure-python dependencies, numpy with pandas, and scipy.
fn python_layer_of(rel: &str) -> usize {
    const DIST: &str = "usr/lib/python3/dist-packages/";
    if let Some(pkg) = rel.strip_prefix(DIST) {
        if pkg.starts_with("scipy") {
            return 3;
        }
        if pkg.starts_with("numpy") || pkg.starts_with("pandas") {
            return 2;
        }
        return 1;
    }
    if rel.starts_with("usr/lib/python3")
        || rel.starts_with("usr/bin/python3")
        || rel.starts_with("usr/share/doc/python3")
    {
        return 1;
    }
    0
}

/// Entries never put in an image: the host-specific or transient parts of a debootstrap.
fn skipped(rel: &str) -> bool {
    [
        "dev/",
        "proc/",
        "sys/",
        "run/",
        "tmp/",
        "var/cache/apt/",
        "var/lib/apt/lists/",
        "var/log/",
    ]
    .iter()
    .any(|p| rel.starts_with(p))
}

fn python_layers(
    rootfs: &Path,
    layout: &Path,
    debian: &DebianSource,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<LayerFile>> {
    if !rootfs.join("usr/bin/python3").exists() {
        testkit::require_program("debootstrap", "debootstrap")?;
        let partial = rootfs.with_extension("partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        say(&format!(
            "debootstrap {} with {PYTHON_PACKAGES} from {} (several minutes)",
            debian.suite, debian.mirror
        ));
        let out = Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={PYTHON_PACKAGES}")])
            .arg(&debian.suite)
            .arg(&partial)
            .arg(&debian.mirror)
            .output()
            .context("running debootstrap")?;
        if !out.status.success() {
            bail!(
                "debootstrap failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::rename(&partial, rootfs)?;
    }
    let mut paths = Vec::new();
    walk(rootfs, "", &mut paths)?;
    paths.sort();
    let mut layers = Vec::new();
    for index in 0..4 {
        say(&format!("python image: writing layer {}/4", index + 1));
        let mut layer = LayerBuilder::new(layout, 6)?;
        // Each layer carries the directories above its files, as `docker build` would.
        let mut wanted_dirs = std::collections::BTreeSet::new();
        for (rel, is_dir) in &paths {
            if !is_dir && python_layer_of(rel) == index {
                let mut p = rel.as_str();
                while let Some((parent, _)) = p.rsplit_once('/') {
                    wanted_dirs.insert(parent.to_string());
                    p = parent;
                }
            }
        }
        for (rel, is_dir) in &paths {
            let take = if *is_dir {
                (index == 0 && python_layer_of(rel) == 0) || wanted_dirs.contains(rel)
            } else {
                python_layer_of(rel) == index
            };
            if take {
                layer.copy_from(rootfs, rel)?;
            }
        }
        layers.push(layer.finish()?);
    }
    Ok(layers)
}

/// Relative paths under `root` (with whether each is a directory), skipping [`skipped`].
fn walk(root: &Path, rel: &str, out: &mut Vec<(String, bool)>) -> anyhow::Result<()> {
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_str().context("non-UTF-8 file name in the rootfs")?;
        let child = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let is_dir = entry.file_type()?.is_dir();
        if skipped(&format!("{child}/")) && !is_dir {
            continue;
        }
        if is_dir && skipped(&format!("{child}/x")) {
            // Keep the directory itself (empty), not its contents.
            out.push((child, true));
            continue;
        }
        out.push((child.clone(), is_dir));
        if is_dir {
            walk(root, &child, out)?;
        }
    }
    Ok(())
}
