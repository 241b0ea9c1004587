//! Measurement 3: `find` over the small layer, against the same tree on overlayfs.

use anyhow::ensure;

use crate::Bench;
use crate::layers::Prepared;
use crate::mounts::{FileBlob, Overlay};
use crate::report::{Row, Summary};
use crate::tools::{drop_caches, find_walk};

impl Bench<'_> {
    /// 3. find + stat, first and second walk, against overlayfs over the extracted tree.
    pub(crate) fn walks(&mut self, small: &Prepared) -> anyhow::Result<()> {
        let cache_dir = self.work.join("cache-walk");
        let mut first = (Vec::new(), Vec::new());
        let mut second = (Vec::new(), Vec::new());
        let mut entries = 0;
        for i in 0..self.args.repeat {
            let ov = Overlay::mount(&small.extracted, &self.work.join(format!("overlay{i}")))?;
            drop_caches()?;
            let (n1, s1) = find_walk(&ov.0)?;
            let (n2, s2) = find_walk(&ov.0)?;
            drop(ov);
            ensure!(n1 == n2, "overlay walks saw {n1} then {n2} entries");
            entries = n1;
            first.1.push(s1);
            second.1.push(s2);

            let cache = self.cache(&cache_dir)?;
            let mut m = self.mount(FileBlob::open(&small.estargz)?, &cache, "walk")?;
            drop_caches()?;
            let (m1, t1) = find_walk(m.mountpoint())?;
            let (m2, t2) = find_walk(m.mountpoint())?;
            m.unmount()?;
            ensure!(
                m1 == n1 && m2 == n1,
                "the mount showed {m1} then {m2} entries, the extracted tree {n1}"
            );
            first.0.push(t1);
            second.0.push(t2);
            eprintln!(
                "  walk run {i}: {n1} entries; overlay {s1:.3} s / {s2:.3} s, ours {t1:.3} s / {t2:.3} s"
            );
        }
        for (label, (ours, base), limit) in [("first", first, 3.0), ("second", second, 1.5)] {
            let (o, b) = (Summary::of(&ours), Summary::of(&base));
            let ratio = o.median / b.median;
            self.rows.push(Row {
                what: format!(
                    "`find -printf` (lstat) of all {entries} entries, {label} walk{}",
                    if label == "first" {
                        " (fresh mount, caches dropped)"
                    } else {
                        ""
                    }
                ),
                unit: "s",
                ours: o,
                baseline: Some(("same tree on overlayfs (ext4 lower)".into(), b)),
                goal: format!("≤ {limit}x overlayfs (ratio {ratio:.2}x)"),
                met: ratio <= limit,
            });
        }
        Ok(())
    }
}
