//! `/proc/self/mountinfo`, parsed once for everyone who asks what is mounted where.

use std::path::{Path, PathBuf};

/// One line of mountinfo: the fields lazysnap looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mounted filesystem.
    pub device: String,
    pub mount_point: PathBuf,
    /// Everything after the separator's filesystem type (`fuse.lazysnap`, `overlay`, ...).
    pub fs_type: String,
    pub source: String,
    /// Per-mount and per-superblock options, comma-separated, as the kernel lists them.
    pub options: String,
}

/// The mount table of this process's mount namespace, in mount order; empty if it
/// cannot be read.
pub fn mounts() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| parse(&text))
        .unwrap_or_default()
}

/// Parses mountinfo text (proc(5)); lines that do not have its shape are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fs_type = right.next()?.to_string();
            let source = unescape(right.next().unwrap_or_default());
            let super_options = right.next().unwrap_or_default();
            Some(Mount {
                device: fields.get(2)?.to_string(),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fs_type,
                source,
                options: format!("{},{super_options}", fields.get(5)?),
            })
        })
        .collect()
}

/// Mount points at or below `dir`, deepest first (the order to unmount them in).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mounts()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|mount_point| mount_point.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fields_and_unescapes_paths() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - fuse.lazysnap lazysnap ro,user_id=0\n\
                    37 35 0:31 / /sys rw shared:7 - sysfs sysfs rw\n\
                    garbage\n";
        let mounts = parse(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].device, "98:0");
        assert_eq!(mounts[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(mounts[0].fs_type, "fuse.lazysnap");
        assert_eq!(mounts[0].source, "lazysnap");
        assert_eq!(mounts[0].options, "rw,noatime,ro,user_id=0");
        assert_eq!(mounts[1].fs_type, "sysfs");
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape("a\\040b\\011c\\134d"), "a b\tc\\d");
        assert_eq!(unescape("\\04"), "\\04");
        assert_eq!(unescape("\\999"), "\\999");
    }
}
