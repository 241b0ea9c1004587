//! Measurement 5: `ls -l` of one directory of a million entries.

use anyhow::ensure;

use crate::Bench;
use crate::mounts::{FileBlob, Overlay};
use crate::report::{Row, Summary};
use crate::tools::{drop_caches, ls};

impl Bench<'_> {
    /// 5. `ls -l` of one directory with a million entries, against `ls -l` of the same
    ///    names on overlayfs (what the full pull gives) and against `ls -f` on our mount.
    pub(crate) fn wide_listing(&mut self) -> anyhow::Result<()> {
        let n = self.args.wide_entries;
        let mut toc = String::with_capacity(n * 64);
        toc.push_str(r#"{"version":1,"entries":[{"name":"wide/","type":"dir","mode":493}"#);
        for i in 0..n {
            toc.push_str(&format!(
                r#",{{"name":"wide/f{i:07}","type":"reg","size":0,"mode":420}}"#
            ));
        }
        toc.push_str("]}");
        let (blob, _, _) = testkit::image::estargz_of_toc(toc.as_bytes())?;
        drop(toc);
        let path = self.work.join("wide.esgz");
        std::fs::write(&path, blob)?;
        let lower = self.work.join("wide-extracted");
        std::fs::create_dir_all(lower.join("wide"))?;
        for i in 0..n {
            std::fs::File::create(lower.join(format!("wide/f{i:07}")))?;
        }
        let cache_dir = self.work.join("cache-wide");
        let (mut short, mut long) = (Vec::new(), Vec::new());
        let (mut overlay, mut overlay_short) = (Vec::new(), Vec::new());
        let mut served = String::new();
        for i in 0..self.args.repeat {
            let ov = Overlay::mount(&lower, &self.work.join(format!("overlay-wide{i}")))?;
            drop_caches()?;
            let (lines, base) = ls(&ov.0.join("wide"), "-l")?;
            drop(ov);
            ensure!(lines == n + 1, "ls -l on overlayfs listed {lines} lines");
            let ov = Overlay::mount(&lower, &self.work.join(format!("overlay-wide-f{i}")))?;
            drop_caches()?;
            overlay_short.push(ls(&ov.0.join("wide"), "-f")?.1);
            drop(ov);
            let mut times = [0.0; 2];
            for (slot, flag) in [(0, "-f"), (1, "-l")] {
                let cache = self.cache(&cache_dir)?;
                let mut m = self.mount(FileBlob::open(&path)?, &cache, "wide")?;
                drop_caches()?;
                let (lines, secs) = ls(&m.mountpoint().join("wide"), flag)?;
                // `ls -f` adds . and ..; `ls -l` a total line.
                ensure!(
                    lines == n + 1 + (flag == "-f") as usize,
                    "ls {flag} listed {lines} lines"
                );
                if flag == "-l" {
                    served = m
                        .stats()
                        .op_latency
                        .iter()
                        .filter(|h| h.count > 0)
                        .map(|h| format!("{} {}", h.op, h.count))
                        .collect::<Vec<_>>()
                        .join(", ");
                }
                m.unmount()?;
                times[slot] = secs;
            }
            eprintln!(
                "  wide run {i}: ours ls -f {:.3} s, ls -l {:.3} s; overlayfs ls -l {base:.3} s; \
                 requests during ls -l: {served}",
                times[0], times[1]
            );
            short.push(times[0]);
            long.push(times[1]);
            overlay.push(base);
        }
        let (o, b, f) = (
            Summary::of(&long),
            Summary::of(&overlay),
            Summary::of(&short),
        );
        let ratio = o.median / b.median;
        let what = format!("`ls -l` of one directory of {n} entries (fresh mount, caches dropped)");
        self.rows.push(Row {
            what: what.clone(),
            unit: "s",
            ours: o,
            baseline: Some((
                "`ls -l` of the same names on overlayfs (ext4 lower), caches dropped".into(),
                b,
            )),
            goal: format!("≤ 3x overlayfs (ratio {ratio:.2}x)"),
            met: ratio <= 3.0,
        });
        let ratio = o.median / f.median;
        self.rows.push(Row {
            what,
            unit: "s",
            ours: o,
            baseline: Some(("`ls -f` of it, fresh mount, caches dropped".into(), f)),
            goal: format!("≤ 3x `ls -f` (ratio {ratio:.2}x)"),
            met: ratio <= 3.0,
        });
        let own = b.median / Summary::of(&overlay_short).median;
        self.notes.push(format!(
            "Wide directory: on overlayfs, `ls -l` took {own:.1}x as long as `ls -f` (medians): \
             beyond the names, `ls -l` makes a statx and two xattr reads (security.selinux, \
             system.posix_acl_access) per name. Through FUSE the attributes come with the \
             listing (READDIRPLUS), but the kernel keeps no xattrs, so each xattr read is a \
             request. Requests our mount served during the last `ls -l`: {served}."
        ));
        Ok(())
    }
}
