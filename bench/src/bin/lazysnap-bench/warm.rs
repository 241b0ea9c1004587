//! `--warm`: each image wholly local in each mode (the full pull onto overlayfs, lazysnap,
//! stargz-snapshotter), then the passes of [`bench::warm`], each in a new container.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bench::cold::images::ImageKind;
use bench::cold::report;
use bench::cold::{self, Ctr, check_interrupted};
use bench::warm::{self, PASSES, WarmRun};

use crate::forms::{Form, Mode};
use crate::node::{Node, PEER_SNAPSHOTTER};
use crate::{Bench, say};

/// How long a layer may take to become wholly local after the filling container.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(600);

impl Bench {
    /// The warm passes of `kind` in every mode, one repetition.
    pub(crate) fn measure_warm(
        &self,
        kind: ImageKind,
        modes: &[Option<Mode>],
        rep: usize,
        runs: &mut Vec<WarmRun>,
    ) -> anyhow::Result<()> {
        let tree = kind
            .warm_tree()
            .with_context(|| format!("the {} image has no warm passes", kind.name()))?;
        for &mode in modes {
            check_interrupted()?;
            let mode_name = mode.map_or(report::OVERLAYFS, Mode::name);
            let node = self.start_node(mode)?;
            let ctr = self.ctr(&node);
            let (form, snapshotter) = match mode {
                None => (Form::Gzip, "overlayfs"),
                Some(Mode::Lazysnap) => (self.args.warm_form, self.args.snapshotter.as_str()),
                Some(Mode::StargzSnapshotter) => (self.args.warm_form, PEER_SNAPSHOTTER),
            };
            let reference = self.reference(kind, form);
            self.pull(&ctr, &reference, mode.map(|_| snapshotter))?;
            // Every file read once, so both lazy snapshotters hold every byte.
            let started = Instant::now();
            let out = run_container(
                &ctr,
                snapshotter,
                &reference,
                &format!("warm-fill-{rep}"),
                "tar -cf - --one-file-system / 2>/dev/null | wc -c",
                self.args.timeout,
            )?;
            let lazysnap_root = match (&node, mode) {
                (Node::Own(own), Some(Mode::Lazysnap)) => Some(own.root.clone()),
                _ => None,
            };
            if let Some(root) = &lazysnap_root {
                self.wait_wholly_local(root)?;
            }
            say(&format!(
                "{} {mode_name}: wholly local {:.1} s after the pull ({} bytes of tar)",
                kind.name(),
                started.elapsed().as_secs_f64(),
                out.trim()
            ));
            for pass in PASSES {
                check_interrupted()?;
                let before = lazysnap_root.as_deref().map(fuse_ops);
                let script = warm::script(pass, tree, &kind.cmd());
                let out = run_container(
                    &ctr,
                    snapshotter,
                    &reference,
                    &format!("warm-{}-{rep}", pass.name()),
                    &script,
                    self.args.timeout,
                )?;
                let timed = warm::parse(&out).with_context(|| {
                    format!("the {} pass printed no timings: {out}", pass.name())
                })?;
                let fuse_ops = match (before, lazysnap_root.as_deref()) {
                    (Some(before), Some(root)) => warm::ops_between(&before, &fuse_ops(root)),
                    _ => BTreeMap::new(),
                };
                say(&format!(
                    "{} {mode_name} {}: {:.3} s, then {:.3} s (output {}){}",
                    kind.name(),
                    pass.name(),
                    timed.first.as_secs_f64(),
                    timed.second.as_secs_f64(),
                    timed.output,
                    if fuse_ops.is_empty() {
                        String::new()
                    } else {
                        format!("; FUSE requests {fuse_ops:?}")
                    }
                ));
                runs.push(WarmRun {
                    image: kind.name().to_string(),
                    mode: mode_name.to_string(),
                    rep,
                    pass,
                    timed,
                    fuse_ops,
                });
            }
            if matches!(node, Node::External) {
                ctr.clear()?;
            }
            drop(node);
        }
        Ok(())
    }

    /// The full pull (`ctr images pull`) or a lazy pull by `snapshotter`
    /// (`lazysnap rpull`).
    fn pull(&self, ctr: &Ctr, reference: &str, snapshotter: Option<&str>) -> anyhow::Result<()> {
        let timeout = Duration::from_secs(self.args.timeout);
        match snapshotter {
            None => {
                let mut args = vec!["images", "pull"];
                if self.plain_http {
                    args.push("--plain-http");
                }
                args.push(reference);
                ctr.run(&args, timeout)?;
            }
            Some(snapshotter) => {
                let mut cmd = Command::new(&self.lazysnap);
                cmd.arg("rpull").arg("--address").arg(&ctr.address).args([
                    "--namespace",
                    &ctr.namespace,
                    "--snapshotter",
                    snapshotter,
                ]);
                if self.plain_http {
                    cmd.arg("--plain-http");
                }
                cmd.arg(reference);
                let (lazy, all) = cold::lazy_layers(&cold::run(cmd, timeout)?);
                if lazy == 0 {
                    bail!("{snapshotter} mounted none of the {all} layers of {reference} lazily");
                }
            }
        }
        Ok(())
    }

    /// Waits until `lazysnap status` says every mounted layer is wholly local (and its
    /// native copy is made).
    fn wait_wholly_local(&self, root: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + LOCAL_TIMEOUT;
        loop {
            check_interrupted()?;
            let mut cmd = Command::new(&self.lazysnap);
            cmd.arg("status").arg("--root").arg(root).arg("--json");
            let status: serde_json::Value =
                serde_json::from_str(&cold::run(cmd, Duration::from_secs(30))?)?;
            let layers = status["layers"].as_array().cloned().unwrap_or_default();
            let missing: u64 = layers
                .iter()
                .map(|l| {
                    l["total_bytes"]
                        .as_u64()
                        .unwrap_or(0)
                        .saturating_sub(l["local_bytes"].as_u64().unwrap_or(0))
                })
                .sum();
            if !layers.is_empty() && missing == 0 {
                return self.wait_native_copies(root, layers.len(), deadline);
            }
            if Instant::now() > deadline {
                bail!("lazysnapd's layers are still {missing} bytes short of wholly local");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Bench {
    /// Unless the bench turned them off, waits until lazysnapd has made the native copy
    /// of each of the `layers` mounted layers (`snapshots/<id>/native`), which the
    /// containers created after that read.
    fn wait_native_copies(
        &self,
        root: &Path,
        layers: usize,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        if self
            .args
            .lazy_option
            .iter()
            .any(|o| o.replace(' ', "") == "native_copies=false")
        {
            return Ok(());
        }
        let copies = || {
            std::fs::read_dir(root.join("snapshots")).map_or(0, |d| {
                d.flatten()
                    .filter(|e| e.path().join("native").is_dir())
                    .count()
            })
        };
        loop {
            check_interrupted()?;
            if copies() >= layers {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "lazysnapd made {} native copies of {layers} layers in time",
                    copies()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// lazysnapd's FUSE requests so far, by opcode, from its status socket's `/metrics`.
fn fuse_ops(root: &Path) -> BTreeMap<String, u64> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--unix-socket"])
        .arg(root.join("status.sock"))
        .arg("http://lazysnapd/metrics");
    cold::run(cmd, Duration::from_secs(30))
        .map(|m| warm::fuse_op_counts(&m))
        .unwrap_or_default()
}

/// `ctr run --rm` of `script` (by /bin/sh) in a new container; its output.
fn run_container(
    ctr: &Ctr,
    snapshotter: &str,
    reference: &str,
    id: &str,
    script: &str,
    timeout_s: u64,
) -> anyhow::Result<String> {
    ctr.run(
        &[
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            reference,
            id,
            "/bin/sh",
            "-c",
            script,
        ],
        Duration::from_secs(timeout_s),
    )
    .with_context(|| format!("container {id} on {snapshotter}"))
}

/// The whole warm mode: every image that has warm passes, `--reps` times, the modes in
/// turn (rotated each repetition so drift hits all alike); writes the report.
pub(crate) fn run(bench: &Bench) -> anyhow::Result<()> {
    let args = &bench.args;
    let images: Vec<ImageKind> = args
        .images
        .iter()
        .copied()
        .filter(|k| k.warm_tree().is_some())
        .collect();
    if images.is_empty() {
        bail!("--warm: none of the images has warm passes (python has)");
    }
    for &kind in &images {
        for form in [Form::Gzip, args.warm_form] {
            check_interrupted()?;
            say(&format!("preparing {} as {}", kind.name(), form.tag()));
            bench.prepare(kind, form)?;
        }
    }
    let mut modes: Vec<Option<Mode>> = vec![None];
    modes.extend(args.modes.iter().copied().map(Some));
    let out = args.out();
    if let Some(parent) = out.with_extension("csv").parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut runs = Vec::new();
    for rep in 1..=args.reps {
        for &kind in &images {
            let mut order = modes.clone();
            order.rotate_left((rep - 1) % modes.len());
            bench.measure_warm(kind, &order, rep, &mut runs)?;
            let mut csv = warm::CSV_HEADER.to_string() + "\n";
            for r in &runs {
                csv.push_str(&warm::csv_line(r));
                csv.push('\n');
            }
            std::fs::write(out.with_extension("csv"), csv)?;
        }
    }
    let command: Vec<String> = std::env::args().collect();
    let heading = format!(
        "# Warm passes: overlayfs full pull vs lazysnap vs stargz-snapshotter\n\n\
         Each image wholly local in each mode first (pulled, then every file read by a \
         container; for lazysnap, `lazysnap status` showing every layer local and its native copy made), then each \
         pass in a new container, twice in a row, timed inside the container (`date +%s%N`). \
         Both snapshotters on their default config; lazy form `{}`; registry on loopback. \
         {} repetitions, the modes in rotating order; medians (min–max) in seconds. \
         Kernel {}. Made by:\n\n```sh\n{}\n```",
        args.warm_form.tag(),
        args.reps,
        kernel_release(),
        command.join(" ")
    );
    let mode_names: Vec<&str> = modes
        .iter()
        .map(|m| m.map_or(report::OVERLAYFS, Mode::name))
        .collect();
    let trees: Vec<(String, String)> = images
        .iter()
        .map(|k| {
            (
                k.name().to_string(),
                k.warm_tree().unwrap_or("/").to_string(),
            )
        })
        .collect();
    std::fs::write(
        out.with_extension("md"),
        warm::markdown(&runs, &heading, &mode_names, &trees),
    )?;
    say(&format!("wrote {}.{{md,csv}}", out.display()));
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
