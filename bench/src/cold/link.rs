//! An emulated network link between the node (this namespace) and a network namespace
//! the bench creates for the registry: two TUN devices, one on each side, joined by a
//! forwarder in this process that holds each packet for the one-way delay, so TCP sees
//! the real round-trip time (these kernels lack sch_netem); rate is a tc tbf on each
//! TUN device's egress. Removed on drop: the namespace, and the TUN devices with our fds.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The node's and the registry's addresses on the point-to-point link.
pub const NODE_IP: &str = "10.213.77.1";
pub const REGISTRY_IP: &str = "10.213.77.2";

pub struct Link {
    pub netns: String,
    node_dev: String,
    registry_dev: String,
    delay_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Packets the forwarder dropped because a write failed (queue full): 0 is expected.
    pub dropped: Arc<AtomicU64>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip (Debian package iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn tc(netns: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, "tc"]);
            c
        }
        None => std::process::Command::new("tc"),
    };
    let out = cmd.args(args).output().context("running tc")?;
    if !out.status.success() {
        bail!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Opens a new TUN device named `name` (IFF_TUN | IFF_NO_PI: raw IP packets).
#[allow(unsafe_code)]
fn open_tun(name: &str) -> anyhow::Result<File> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    if name.len() >= libc::IFNAMSIZ {
        bail!("interface name {name} is too long");
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `req` is laid out as.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
    if rc < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Waits up to 100 ms for `file` to become readable, so the thread can see `stop`.
#[allow(unsafe_code)]
fn readable(file: &File) -> bool {
    let mut fd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, 100) };
    n > 0 && fd.revents & libc::POLLIN != 0
}

impl Link {
    /// Creates the namespace and the link, unshaped (full speed, no delay) until [`Link::shape`].
    pub fn create() -> anyhow::Result<Link> {
        let pid = std::process::id();
        let netns = format!("lsbench{pid}");
        ip(&["netns", "add", &netns])?;
        let mut link = Link {
            netns: netns.clone(),
            node_dev: format!("lsbn{pid}"),
            registry_dev: format!("lsbr{pid}"),
            delay_us: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        // From here on, drop removes whatever was made.
        let node = open_tun(&link.node_dev)?;
        let registry = open_tun(&link.registry_dev)?;
        ip(&["link", "set", &link.registry_dev, "netns", &netns])?;
        ip(&[
            "addr",
            "add",
            NODE_IP,
            "peer",
            REGISTRY_IP,
            "dev",
            &link.node_dev,
        ])?;
        ip(&["link", "set", &link.node_dev, "up"])?;
        let rdev = link.registry_dev.clone();
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            REGISTRY_IP,
            "peer",
            NODE_IP,
            "dev",
            &rdev,
        ])?;
        ip(&["-n", &netns, "link", "set", &rdev, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        let node_w = node.try_clone()?;
        let registry_w = registry.try_clone()?;
        link.forward(node, registry_w);
        link.forward(registry, node_w);
        Ok(link)
    }

    /// One direction: a reader stamps each packet with its release time, a writer
    /// releases it then. One FIFO suffices because the delay is the same for every packet.
    fn forward(&mut self, mut from: File, mut to: File) {
        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        let (stop, delay) = (self.stop.clone(), self.delay_us.clone());
        self.threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if !readable(&from) {
                    continue;
                }
                let Ok(n) = from.read(&mut buf) else { break };
                let due = Instant::now() + Duration::from_micros(delay.load(Ordering::Relaxed));
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }));
        let (stop, dropped) = (self.stop.clone(), self.dropped.clone());
        self.threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((due, packet)) = rx.recv_timeout(Duration::from_millis(100)) else {
                    continue;
                };
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if to.write(&packet).is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    /// Sets the one-way delay and (when given) the rate in Mbit/s of both directions.
    pub fn shape(&self, rate_mbit: Option<f64>, delay: Duration) -> anyhow::Result<()> {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
        let Some(rate) = rate_mbit else {
            return Ok(());
        };
        let bytes_per_s = rate * 1e6 / 8.0;
        // Burst: 4 ms worth at the rate (at least 16 KiB). Queue: twice the bandwidth-delay
        // product, as a router sized for the path would hold.
        let burst = ((bytes_per_s * 0.004) as u64).max(16 << 10);
        let bdp = bytes_per_s * 2.0 * delay.as_secs_f64();
        let limit = ((2.0 * bdp) as u64).max(256 << 10) + burst;
        let args = |dev: &str| -> Vec<String> {
            vec![
                "qdisc".into(),
                "replace".into(),
                "dev".into(),
                dev.to_string(),
                "root".into(),
                "tbf".into(),
                "rate".into(),
                format!("{}kbit", (rate * 1000.0) as u64),
                "burst".into(),
                burst.to_string(),
                "limit".into(),
                limit.to_string(),
            ]
        };
        let node = args(&self.node_dev);
        tc(None, &node.iter().map(String::as_str).collect::<Vec<_>>())?;
        let registry = args(&self.registry_dev);
        tc(
            Some(&self.netns),
            &registry.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        Ok(())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // The TUN devices go with their last fd (closed with the threads) and the
        // namespace's with the namespace.
        let _ = ip(&["netns", "del", &self.netns]);
    }
}
