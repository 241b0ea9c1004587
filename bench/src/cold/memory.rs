//! A snapshotter daemon's memory, as the kernel counts it: the resident set of the daemon
//! and every process it started (lazysnapd's fd holder), now and at its peak.

use std::collections::BTreeSet;

/// Resident memory of a process tree, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS` summed over the tree.
    pub rss: u64,
    /// `VmHWM` (each process's peak resident set) summed over the tree.
    pub peak: u64,
}

/// The memory of `pid` and its descendants, or `None` when `pid` is gone.
pub fn of_tree(pid: u32) -> Option<Memory> {
    let mut total = of_process(pid)?;
    for child in descendants(pid) {
        if let Some(m) = of_process(child) {
            total.rss += m.rss;
            total.peak += m.peak;
        }
    }
    Some(total)
}

fn of_process(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status(&status)
}

/// `VmRSS` and `VmHWM` of a `/proc/PID/status` text (in kB there).
fn parse_status(status: &str) -> Option<Memory> {
    let field = |name: &str| {
        status.lines().find_map(|l| {
            let kib = l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim();
            kib.parse::<u64>().ok().map(|k| k * 1024)
        })
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

/// Every process below `pid`, from the kernel's per-thread children lists.
fn descendants(pid: u32) -> BTreeSet<u32> {
    let mut found = BTreeSet::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if found.insert(child) {
                    todo.push(child);
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_peak_in_bytes() {
        let status = "Name:\tlazysnapd\nVmHWM:\t  51200 kB\nVmRSS:\t   40960 kB\nThreads:\t9\n";
        assert_eq!(
            parse_status(status),
            Some(Memory {
                rss: 40 << 20,
                peak: 50 << 20
            })
        );
        // A kernel thread or a zombie has no VmRSS.
        assert_eq!(parse_status("Name:\tkthreadd\nThreads:\t1\n"), None);
    }

    #[test]
    fn a_tree_counts_its_children() {
        // An idle shell waiting for an idle sleep: neither's memory moves.
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .expect("sh");
        let mut below = BTreeSet::new();
        for _ in 0..500 {
            below = descendants(shell.id());
            // The child counts once it has exec'd sleep: as a fork of the shell its
            // memory is still the shell's, and changes under the measurement.
            let exec_done = |p: u32| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "sleep")
            };
            if !below.is_empty()
                && below
                    .iter()
                    .all(|&p| exec_done(p) && of_process(p).is_some_and(|m| m.rss > 0))
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let sleep = *below.iter().next().expect("the shell's sleep");
        let tree = of_tree(shell.id()).expect("the shell");
        let parts = of_process(shell.id()).expect("the shell").rss
            + of_process(sleep).expect("the sleep").rss;
        let _ = std::process::Command::new("kill")
            .arg(sleep.to_string())
            .status();
        let _ = shell.kill();
        let _ = shell.wait();
        assert_eq!(below.len(), 1, "{below:?}");
        assert!(
            tree.rss.abs_diff(parts) <= parts / 20,
            "{tree:?} against {parts}"
        );
        assert!(tree.peak >= tree.rss);
        assert_eq!(of_tree(u32::MAX), None);
    }
}
