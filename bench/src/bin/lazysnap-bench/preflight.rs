//! Before any run: the machine checked for what the runs need, and the programs they
//! run found (or, for the peer daemon, built).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bench::cold::peer;

use crate::Args;
use crate::forms::{Form, Mode};
use crate::say;

/// A sibling of this executable, else the name on PATH.
pub(crate) fn sibling(name: &str, given: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.clone());
    }
    if let Ok(me) = std::env::current_exe()
        && let Some(dir) = me.parent()
        && dir.join(name).is_file()
    {
        return Ok(dir.join(name));
    }
    testkit::require_program(name, "lazysnap (cargo build --release -p daemon)")
}

/// Refuses, with the reason, when the machine lacks what the runs need.
pub(crate) fn preflight(args: &Args) -> anyhow::Result<()> {
    if !testkit::is_root() {
        bail!(
            "needs root (it mounts, runs containerd and creates network namespaces); run it with sudo"
        );
    }
    if !Path::new("/dev/fuse").exists() {
        bail!(
            "/dev/fuse is missing: load the fuse module (modprobe fuse) or give the container the device"
        );
    }
    if let Some(socket) = &args.containerd {
        if std::os::unix::net::UnixStream::connect(socket).is_err() {
            bail!("no containerd answers on {}", socket.display());
        }
    } else {
        testkit::require_program("containerd", "containerd")?;
        testkit::require_program("runc", "runc")?;
    }
    testkit::require_program("ctr", "containerd")?;
    testkit::require_program("curl", "curl")?;
    if args.registry.is_none() {
        testkit::require_program("docker-registry", "docker-registry")?;
        if !args.no_link {
            testkit::require_program("ip", "iproute2")?;
            testkit::require_program("tc", "iproute2")?;
            if !Path::new("/dev/net/tun").exists() {
                bail!(
                    "/dev/net/tun is missing (the emulated link needs TUN devices); use --no-link to run without it"
                );
            }
        }
    }
    if args.images.iter().any(|k| k.needs_debootstrap()) {
        testkit::require_program("debootstrap", "debootstrap")?;
    }
    if args
        .forms
        .iter()
        .any(|f| matches!(f, Form::EsgzCtr | Form::EsgzCtrOpt | Form::ZstdCtr))
    {
        testkit::require_program("ctr-remote", "stargz-snapshotter")?;
    }
    if args.modes.is_empty() {
        bail!("--modes is empty: give lazysnap, stargz-snapshotter or both");
    }
    if args.modes.contains(&Mode::StargzSnapshotter) && args.containerd.is_some() {
        bail!(
            "--containerd: the stargz-snapshotter peer needs a containerd the bench starts \
             (with the peer as a proxy snapshotter); add --modes lazysnap to run without it"
        );
    }
    Ok(())
}

/// The peer daemon: --peer, else next to this program, built there when missing.
pub(crate) fn peer_binary(given: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if !p.is_file() {
            bail!(
                "--peer {}: no such file (build it with: {} {})",
                p.display(),
                peer::build_script().display(),
                p.display()
            );
        }
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let out = me
        .parent()
        .context("this program has no directory")?
        .join(peer::BINARY);
    if out.is_file() {
        return Ok(out);
    }
    say(&format!(
        "building the stargz-snapshotter peer: {} {}",
        peer::build_script().display(),
        out.display()
    ));
    peer::build(&out).context(
        "the stargz-snapshotter peer could not be built; give a built one with --peer, \
         or run without it with --modes lazysnap",
    )?;
    Ok(out)
}
