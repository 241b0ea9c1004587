//! Each image in each form in the registry: built, converted by lazysnap or by
//! `ctr-remote`, optimized, indexed by soci, pushed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use bench::cold::images::{self, ImageKind};
use bench::cold::{self, oci};

use crate::forms::{Form, Mode};
use crate::node::Node;
use crate::{Bench, say};

impl Bench {
    fn convert(&self, extra: &[&str], src: &str, dst: &str) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.lazysnap);
        cmd.args(["convert", "--no-progress-bars"])
            .args(extra)
            .args([src, dst]);
        cold::run(cmd, Duration::from_secs(3600)).map(|_| ())
    }

    /// Makes sure the registry holds `kind` in `form` (built, converted, optimized as
    /// needed, from the cache when it can); returns the form's compressed size.
    pub(crate) fn prepare(&self, kind: ImageKind, form: Form) -> anyhow::Result<u64> {
        let plain = images::build_plain(&self.args.cache, kind, &self.debian(), &say)?;
        let dir = plain
            .parent()
            .context("layout without parent")?
            .to_path_buf();
        let plain_oci = format!("oci:{}:latest", plain.display());
        let layout = dir.join(form.tag());
        let repo = format!("lsbench/{}", kind.name());
        if form == Form::Gzip {
            oci::push_layout(&plain, &self.registry_host, &repo, form.tag())?;
            return oci::compressed_size(&plain);
        }
        if !layout.join("index.json").is_file() {
            let dst = format!("oci:{}:latest", layout.display());
            match form {
                Form::Esgz => self.convert(&[], &plain_oci, &dst)?,
                Form::Zstd => self.convert(&["--zstdchunked"], &plain_oci, &dst)?,
                Form::EsgzOpt => {
                    let list = dir.join("optimize.list");
                    if !list.is_file() {
                        self.optimize(kind, &list)?;
                    }
                    let list = list.to_str().context("non-UTF-8 path")?;
                    self.convert(&["--prioritize", list], &plain_oci, &dst)?;
                }
                Form::EsgzCtr | Form::EsgzCtrOpt | Form::ZstdCtr => {
                    self.ctr_remote(kind, form, &layout)?
                }
                Form::GzipSoci => self.convert(&["--soci"], &plain_oci, &dst)?,
                Form::GzipSociRef => self.soci_ref(&plain, &layout)?,
                Form::Gzip => unreachable!("handled above"),
            }
        }
        oci::push_layout(&layout, &self.registry_host, &repo, form.tag())?;
        oci::compressed_size(&layout)
    }

    /// Indexes the plain image with soci's own code (`--soci-ref`): a layout of the plain
    /// image's blobs and what soci made, its index.json naming soci's OCI index.
    fn soci_ref(&self, plain: &Path, layout: &Path) -> anyhow::Result<()> {
        use sha2::Digest as _;
        let peer = self
            .args
            .soci_ref
            .clone()
            .or_else(|| std::env::var_os("LAZYSNAP_SOCI_REF").map(PathBuf::from))
            .context("the gzip-soci-ref form needs --soci-ref (or LAZYSNAP_SOCI_REF)")?;
        let (_, manifest, _) = oci::read_manifest(plain)?;
        let digest = format!("sha256:{:x}", sha2::Sha256::digest(&manifest));
        let partial = layout.with_extension("partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        let made = partial.join("made");
        std::fs::create_dir_all(&made)?;
        let mut cmd = Command::new(peer);
        cmd.arg("index-build").arg(plain).arg(&digest).arg(&made);
        let out = cold::run(cmd, Duration::from_secs(3600))?;
        let top = out
            .lines()
            .find_map(|l| l.strip_prefix("oci_index: "))
            .and_then(|l| l.split_whitespace().next())
            .context("soci printed no oci_index line")?
            .to_string();
        let blobs = partial.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs)?;
        for entry in std::fs::read_dir(plain.join("blobs").join("sha256"))? {
            let entry = entry?;
            std::fs::hard_link(entry.path(), blobs.join(entry.file_name()))?;
        }
        for entry in std::fs::read_dir(&made)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let hex = name
                .strip_prefix("sha256:")
                .context("soci wrote a blob not named by digest")?;
            std::fs::rename(entry.path(), blobs.join(hex))?;
        }
        std::fs::remove_dir(&made)?;
        let size = std::fs::metadata(blobs.join(top.trim_start_matches("sha256:")))?.len();
        std::fs::write(
            partial.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json",
                           "digest": top, "size": size}],
        });
        std::fs::write(partial.join("index.json"), serde_json::to_vec(&index)?)?;
        std::fs::rename(&partial, layout)?;
        Ok(())
    }

    /// Runs `lazysnap optimize` on the gzip image once (on a fresh node) and keeps the list
    /// of the files the command read, in order.
    fn optimize(&self, kind: ImageKind, list: &Path) -> anyhow::Result<()> {
        say(&format!(
            "lazysnap optimize {}: running its command once",
            kind.name()
        ));
        self.prepare(kind, Form::Gzip)?;
        let node = self.start_node(Some(Mode::Lazysnap))?;
        let ctr = self.ctr(&node);
        let root = match &node {
            Node::Own(own) => own.root.clone(),
            Node::External => self.args.lazysnapd_root.clone(),
        };
        let partial = list.with_extension("partial");
        let mut cmd = Command::new(&self.lazysnap);
        cmd.arg("optimize")
            .arg("--address")
            .arg(&ctr.address)
            .args([
                "--namespace",
                &ctr.namespace,
                "--snapshotter",
                &self.args.snapshotter,
            ])
            .arg("--root")
            .arg(&root)
            .arg("--record")
            .arg(&partial)
            .arg("--no-progress-bars");
        if self.plain_http {
            cmd.arg("--plain-http");
        }
        cmd.arg(self.reference(kind, Form::Gzip))
            .arg(self.reference(kind, Form::EsgzOpt));
        let out = cold::run(cmd, Duration::from_secs(3600))?;
        say(out.trim());
        if matches!(node, Node::External) {
            ctr.clear()?;
        }
        drop(node);
        std::fs::rename(&partial, list)?;
        Ok(())
    }

    /// Converts (`esgz-ctr`, `zstd-ctr`) or optimizes (`esgz-ctr-opt`) the gzip image with
    /// stargz-snapshotter's `ctr-remote` in a containerd of its own (optimize runs the
    /// image's command there with runc), and exports the result into `layout`.
    fn ctr_remote(&self, kind: ImageKind, form: Form, layout: &Path) -> anyhow::Result<()> {
        self.prepare(kind, Form::Gzip)?;
        let node = self.start_node(None)?;
        let ctr = self.ctr(&node);
        if matches!(node, Node::External) {
            ctr.clear()?;
        }
        let long = Duration::from_secs(3600);
        let src = self.reference(kind, Form::Gzip);
        let dst = self.reference(kind, form);
        let mut pull = vec!["images", "pull"];
        if self.plain_http {
            pull.push("--plain-http");
        }
        pull.push(&src);
        ctr.run(&pull, long)?;
        let mut cmd = Command::new("ctr-remote");
        cmd.arg("--address")
            .arg(&ctr.address)
            .args(["--namespace", &ctr.namespace]);
        let cmdline = kind.cmd();
        match form {
            Form::EsgzCtr => {
                say(&format!(
                    "ctr-remote image convert --estargz --oci {}",
                    kind.name()
                ));
                cmd.args(["image", "convert", "--estargz", "--oci", &src, &dst]);
            }
            Form::ZstdCtr => {
                say(&format!(
                    "ctr-remote image convert --zstdchunked --oci {}",
                    kind.name()
                ));
                cmd.args(["image", "convert", "--zstdchunked", "--oci", &src, &dst]);
            }
            Form::EsgzCtrOpt => {
                say(&format!(
                    "ctr-remote image optimize --oci {}: running its command once",
                    kind.name()
                ));
                cmd.args(["image", "optimize", "--oci"])
                    .arg("--entrypoint")
                    .arg(serde_json::to_string(&cmdline[..1])?)
                    .arg("--args")
                    .arg(serde_json::to_string(&cmdline[1..])?)
                    .args([&src, &dst]);
            }
            _ => bail!("{} is not a ctr-remote form", form.tag()),
        }
        cold::run(cmd, long)?;
        let tar = layout.with_extension("tar");
        let partial = layout.with_extension("partial");
        let tar_str = tar.to_str().context("non-UTF-8 path")?;
        ctr.run(
            &["images", "export", "--skip-manifest-json", tar_str, &dst],
            long,
        )?;
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        std::fs::create_dir_all(&partial)?;
        let mut untar = Command::new("tar");
        untar.arg("-xf").arg(&tar).arg("-C").arg(&partial);
        cold::run(untar, long)?;
        std::fs::remove_file(&tar)?;
        if matches!(node, Node::External) {
            ctr.clear()?;
        }
        drop(node);
        std::fs::rename(&partial, layout)?;
        Ok(())
    }
}
