//! The containerd and snapshotter daemon each run starts on, fresh (or the user's).

use std::path::PathBuf;

use anyhow::Context;
use bench::cold::Ctr;
use bench::cold::peer::StargzPeer;
use testkit::containerd::{Containerd, ContainerdOptions};
use testkit::lazysnapd::Lazysnapd;

use crate::Bench;
use crate::forms::Mode;

/// The peer's name as a proxy snapshotter in the containerd the bench starts.
pub(crate) const PEER_SNAPSHOTTER: &str = "stargz";

/// The containerd and lazysnapd of one run: fresh ones, or the user's.
pub(crate) enum Node {
    Own(Box<OwnNode>),
    External,
}

/// Dropped in field order: containerd (and its tasks) before the snapshotter daemon,
/// then the dir.
pub(crate) struct OwnNode {
    containerd: Containerd,
    pub(crate) lazysnapd: Option<Lazysnapd>,
    pub(crate) peer: Option<StargzPeer>,
    /// The daemon's root (lazysnapd's, or the peer's), else the temp dir.
    pub(crate) root: PathBuf,
    _dir: tempfile::TempDir,
}

impl OwnNode {
    /// The lazy snapshotter daemon's pid, if this node has one.
    pub(crate) fn daemon_pid(&self) -> Option<u32> {
        let pid = match (&self.lazysnapd, &self.peer) {
            (Some(daemon), _) => daemon.pid(),
            (None, Some(peer)) => peer.pid(),
            (None, None) => 0,
        };
        (pid != 0).then_some(pid)
    }
}

impl Bench {
    /// A fresh containerd with a fresh daemon of `mode` as a proxy snapshotter; with
    /// `None`, containerd alone (full pulls onto overlayfs, `ctr-remote`).
    pub(crate) fn start_node(&self, mode: Option<Mode>) -> anyhow::Result<Node> {
        if self.args.containerd.is_some() {
            return Ok(Node::External);
        }
        let dir = tempfile::Builder::new()
            .prefix("lsbench-")
            .tempdir_in("/var/tmp")?;
        let options = ContainerdOptions::default().namespace("lazysnap-bench");
        match mode {
            None => {
                let containerd = Containerd::start_with(&options)?;
                Ok(Node::Own(Box::new(OwnNode {
                    containerd,
                    lazysnapd: None,
                    peer: None,
                    root: dir.path().to_path_buf(),
                    _dir: dir,
                })))
            }
            Some(Mode::StargzSnapshotter) => {
                let binary = self
                    .peer
                    .as_ref()
                    .context("the stargz-snapshotter peer is not built")?;
                let peer =
                    StargzPeer::start(binary, &dir.path().join("peer"), &self.registry_host)?;
                let containerd = Containerd::start_with(
                    &options.proxy_snapshotter(PEER_SNAPSHOTTER, &peer.address),
                )?;
                let root = peer.root.clone();
                Ok(Node::Own(Box::new(OwnNode {
                    containerd,
                    lazysnapd: None,
                    peer: Some(peer),
                    root,
                    _dir: dir,
                })))
            }
            Some(Mode::Lazysnap) => self.start_lazysnap_node(dir, options),
        }
    }

    fn start_lazysnap_node(
        &self,
        dir: tempfile::TempDir,
        options: ContainerdOptions,
    ) -> anyhow::Result<Node> {
        let config = dir.path().join("lazysnapd.toml");
        std::fs::write(
            &config,
            format!(
                "log_level = \"{}\"\n[lazy]\n{}{}[cache]\n{}\
                 [resolver.host.\"{}\"]\nplain_http = true\n",
                if self.args.keep_logs.is_some() {
                    "debug"
                } else {
                    "info"
                },
                if self.args.no_background_fetch {
                    "background_fetch = false\n"
                } else {
                    ""
                },
                self.args
                    .lazy_option
                    .iter()
                    .map(|o| format!("{o}\n"))
                    .collect::<String>(),
                self.args
                    .cache_option
                    .iter()
                    .map(|o| format!("{o}\n"))
                    .collect::<String>(),
                self.registry_host
            ),
        )?;
        let config = config.to_str().context("non-UTF-8 temp path")?.to_string();
        let daemon = Lazysnapd::start_with_args(
            &self.lazysnapd,
            &dir.path().join("ls"),
            &["--config", &config],
        )?;
        let containerd = Containerd::start_with(
            &options.proxy_snapshotter(&self.args.snapshotter, &daemon.address),
        )?;
        let root = daemon.root.clone();
        Ok(Node::Own(Box::new(OwnNode {
            containerd,
            lazysnapd: Some(daemon),
            peer: None,
            root,
            _dir: dir,
        })))
    }

    pub(crate) fn ctr(&self, node: &Node) -> Ctr {
        match node {
            Node::Own(own) => Ctr {
                address: own.containerd.address().to_path_buf(),
                namespace: own.containerd.namespace().to_string(),
            },
            Node::External => Ctr {
                address: self.args.containerd.clone().unwrap_or_default(),
                namespace: self.args.namespace.clone(),
            },
        }
    }
}
