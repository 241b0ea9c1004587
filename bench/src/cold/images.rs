//! The benchmark images, built from recipes and cached as OCI layouts under a directory
//! named by the recipe's hash: the same recipe is built once, a changed one anew.
//!
//! - `python`: Debian bookworm (debootstrap, minbase) with python3, numpy, scipy and
//!   pandas from Debian's archive, split into four layers; imports pandas and scipy.
//! - `node`: the same base with nodejs, node-typescript, node-lodash, node-marked,
//!   node-js-yaml and node-acorn, in four layers; requires them and uses each once.
//! - `jre`: the same base with default-jre-headless (OpenJDK 17) and clojure, in three
//!   layers; starts Clojure and loads a few of its namespaces.
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
    Node,
    Jre,
    SmallFiles,
    RandomPart,
    ReadAll,
}

impl ImageKind {
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Python => "python",
            ImageKind::Node => "node",
            ImageKind::Jre => "jre",
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
            // First line when node runs; the exit after loading typescript (a 10 MB
            // script), lodash, marked, js-yaml and acorn and using each once.
            ImageKind::Node => vec![
                "/usr/bin/node".into(),
                "-e".into(),
                "console.log('node', process.version); \
                 const ts = require('typescript'), _ = require('lodash'), \
                 { marked } = require('marked'), yaml = require('js-yaml'), \
                 acorn = require('acorn'); \
                 const js = ts.transpileModule('const f = (x: number): number => x * 2;', \
                 { compilerOptions: { module: ts.ModuleKind.CommonJS } }).outputText; \
                 const ast = acorn.parse(js, { ecmaVersion: 2020 }); \
                 const html = marked.parse('# ' + _.capitalize('hello')).trim(); \
                 const doc = yaml.load(yaml.dump({ nodes: ast.body.length, html })); \
                 console.log('typescript', ts.version, 'lodash', _.VERSION, \
                 'nodes', doc.nodes, doc.html)"
                    .into(),
            ],
            // First line when Clojure's core is loaded (JVM started, its modules file and
            // libjvm read); the exit after loading more namespaces and a little work.
            ImageKind::Jre => vec![
                "/usr/bin/clojure".into(),
                "-e".into(),
                "(println \"clojure\" (clojure-version) \"java\" (System/getProperty \"java.version\")) \
                 (require 'clojure.pprint 'clojure.set 'clojure.spec.alpha 'clojure.data 'clojure.string) \
                 (let [f (frequencies (map #(mod % 7) (range 100000)))] \
                 (println \"done\" (clojure.string/join \",\" (map f (range 7)))))"
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
            ImageKind::Python | ImageKind::Node | ImageKind::Jre => Some("/usr"),
            ImageKind::SmallFiles | ImageKind::RandomPart | ImageKind::ReadAll => None,
        }
    }

    fn env(self) -> Vec<String> {
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()]
    }
}

/// Where Debian comes from, for the Debian-based images.
#[derive(Clone, Debug)]
pub struct DebianSource {
    pub mirror: String,
    pub suite: String,
}

const PYTHON_PACKAGES: &str = "python3,python3-numpy,python3-scipy,python3-pandas";
// No node-express: its dependencies need virtual packages whose providers form
// cycles that debootstrap's configure step cannot order.
const NODE_PACKAGES: &str =
    "nodejs,node-typescript,node-lodash,node-marked,node-js-yaml,node-acorn";
const JRE_PACKAGES: &str = "default-jre-headless,clojure";

impl ImageKind {
    /// The packages debootstrap adds to bookworm's minbase, for the Debian-based images.
    fn debian_packages(self) -> Option<&'static str> {
        match self {
            ImageKind::Python => Some(PYTHON_PACKAGES),
            ImageKind::Node => Some(NODE_PACKAGES),
            ImageKind::Jre => Some(JRE_PACKAGES),
            ImageKind::SmallFiles | ImageKind::RandomPart | ImageKind::ReadAll => None,
        }
    }

    /// Whether the image is built with debootstrap (the bench needs it installed).
    pub fn needs_debootstrap(self) -> bool {
        self.debian_packages().is_some()
    }

    /// A file the debootstrapped tree has once the packages are in.
    fn debian_marker(self) -> &'static str {
        match self {
            ImageKind::Node => "usr/bin/node",
            ImageKind::Jre => "usr/bin/java",
            _ => "usr/bin/python3",
        }
    }

    /// How many layers the Debian-based image is split into.
    fn debian_layer_count(self) -> usize {
        match self {
            ImageKind::Jre => 3,
            _ => 4,
        }
    }
}

/// Everything the image's bytes depend on, hashed to name its cache directory.
fn recipe(kind: ImageKind, debian: &DebianSource) -> String {
    let mut r = format!(
        "builder {BUILDER_VERSION}\nimage {}\ncmd {:?}\n",
        kind.name(),
        kind.cmd()
    );
    if let Some(packages) = kind.debian_packages() {
        r.push_str(&debootstrap_line(packages, debian));
        r.push_str("\nmtimes: .py kept, others clamped\n");
        if kind != ImageKind::Python {
            // The python recipe predates this line (its hash, and so its cache, stays).
            r.push_str(&format!(
                "layers: {} by path, lazysnap-bench's layer_of\n",
                kind.debian_layer_count()
            ));
        }
    }
    r
}

fn debootstrap_line(packages: &str, debian: &DebianSource) -> String {
    format!(
        "debootstrap --variant=minbase --include={packages} {} {}",
        debian.suite, debian.mirror
    )
}

/// The debootstrapped tree, shared by every recipe that packs it (named by its command).
fn rootfs_dir(cache: &Path, packages: &str, debian: &DebianSource) -> PathBuf {
    let h = Sha256::digest(debootstrap_line(packages, debian).as_bytes());
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
        ImageKind::Python | ImageKind::Node | ImageKind::Jre => {
            debian_layers(kind, cache, &partial, debian, say)?
        }
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

/// Which layer of a Debian-based image a path belongs to (0 is the base system), as a
/// Dockerfile installing the runtime, then the libraries, would split it.
///
/// - python: the interpreter and its small pure-python dependencies, numpy with pandas,
///   and scipy;
/// - node: the runtime (node and libnode), the node packages, and typescript;
/// - jre: the JVM (`/usr/lib/jvm`), and the jars (clojure and its dependencies).
fn layer_of(kind: ImageKind, rel: &str) -> usize {
    match kind {
        ImageKind::Node => node_layer_of(rel),
        ImageKind::Jre => jre_layer_of(rel),
        _ => python_layer_of(rel),
    }
}

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

fn node_layer_of(rel: &str) -> usize {
    if let Some(pkg) = rel.strip_prefix("usr/share/nodejs/") {
        return if pkg.starts_with("typescript") { 3 } else { 2 };
    }
    if rel.starts_with("usr/share/doc/node-typescript") {
        return 3;
    }
    if rel.starts_with("usr/lib/nodejs/") || rel.starts_with("usr/share/doc/node-") {
        return 2;
    }
    if rel.starts_with("usr/bin/node")
        || rel.starts_with("usr/bin/tsc")
        || rel.starts_with("usr/bin/tsserver")
        || rel.starts_with("usr/lib/x86_64-linux-gnu/libnode")
        || rel.starts_with("usr/lib/x86_64-linux-gnu/nodejs/")
        || rel.starts_with("usr/include/node/")
        || rel.starts_with("usr/share/doc/nodejs")
        || rel.starts_with("usr/share/doc/libnode")
    {
        return 1;
    }
    0
}

fn jre_layer_of(rel: &str) -> usize {
    if rel.starts_with("usr/lib/jvm/")
        || rel.starts_with("usr/share/doc/openjdk-")
        || rel.starts_with("usr/lib/debug/usr/lib/jvm/")
    {
        return 1;
    }
    if rel.starts_with("usr/share/java/") || rel.starts_with("usr/share/maven-repo/") {
        return 2;
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

/// Debootstraps `kind`'s packages (once; the tree is cached) and splits the tree into
/// the image's layers by [`layer_of`].
fn debian_layers(
    kind: ImageKind,
    cache: &Path,
    layout: &Path,
    debian: &DebianSource,
    say: &dyn Fn(&str),
) -> anyhow::Result<Vec<LayerFile>> {
    let packages = kind.debian_packages().context("not a Debian-based image")?;
    let rootfs = &rootfs_dir(cache, packages, debian);
    if !rootfs.join(kind.debian_marker()).exists() {
        testkit::require_program("debootstrap", "debootstrap")?;
        let partial = rootfs.with_extension("partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        say(&format!(
            "debootstrap {} with {packages} from {} (several minutes)",
            debian.suite, debian.mirror
        ));
        let out = Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={packages}")])
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
    let count = kind.debian_layer_count();
    for index in 0..count {
        say(&format!(
            "{} image: writing layer {}/{count}",
            kind.name(),
            index + 1
        ));
        let mut layer = LayerBuilder::new(layout, 6)?;
        // Each layer carries the directories above its files, as `docker build` would.
        let mut wanted_dirs = std::collections::BTreeSet::new();
        for (rel, is_dir) in &paths {
            if !is_dir && layer_of(kind, rel) == index {
                let mut p = rel.as_str();
                while let Some((parent, _)) = p.rsplit_once('/') {
                    wanted_dirs.insert(parent.to_string());
                    p = parent;
                }
            }
        }
        for (rel, is_dir) in &paths {
            let take = if *is_dir {
                (index == 0 && layer_of(kind, rel) == 0) || wanted_dirs.contains(rel)
            } else {
                layer_of(kind, rel) == index
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

#[cfg(test)]
mod tests {
    use super::*;

    fn debian() -> DebianSource {
        DebianSource {
            mirror: "http://deb.debian.org/debian".into(),
            suite: "bookworm".into(),
        }
    }

    #[test]
    fn the_python_recipe_and_its_cache_stay_as_they_were() {
        // The hash names the cached image and the debootstrapped tree: unchanged, the
        // python image built before node and jre existed is used as it is.
        assert_eq!(
            recipe_hash(ImageKind::Python, &debian()),
            "a60e74deb58cdffd"
        );
        assert!(
            rootfs_dir(Path::new("/c"), PYTHON_PACKAGES, &debian())
                .ends_with("debian-rootfs-4766bb5482d21bd0")
        );
        let node = recipe(ImageKind::Node, &debian());
        assert!(node.contains("--include=nodejs,node-typescript"), "{node}");
        assert!(node.contains("layers: 4 by path"), "{node}");
        assert_ne!(
            recipe_hash(ImageKind::Node, &debian()),
            recipe_hash(ImageKind::Jre, &debian())
        );
    }

    #[test]
    fn debian_images_split_by_path() {
        use ImageKind::{Jre, Node, Python};
        for (kind, path, layer) in [
            (Python, "usr/lib/python3/dist-packages/scipy/x.so", 3),
            (Python, "usr/bin/python3.11", 1),
            (Node, "usr/bin/node", 1),
            (Node, "usr/lib/x86_64-linux-gnu/libnode.so.108", 1),
            (Node, "usr/share/nodejs/lodash/lodash.js", 2),
            (Node, "usr/share/nodejs/typescript/lib/typescript.js", 3),
            (Node, "usr/lib/x86_64-linux-gnu/libicuuc.so.72", 0),
            (Jre, "usr/lib/jvm/java-17-openjdk-amd64/lib/modules", 1),
            (Jre, "usr/share/java/clojure-1.11.1.jar", 2),
            (Jre, "etc/java-17-openjdk/security/java.security", 0),
            (Jre, "usr/bin/java", 0),
        ] {
            assert_eq!(layer_of(kind, path), layer, "{} {path}", kind.name());
            assert!(layer < kind.debian_layer_count());
        }
        assert_eq!(Node.warm_tree(), Some("/usr"));
        assert_eq!(Jre.warm_tree(), Some("/usr"));
    }
}
