//! User-namespaced containers (containerd's `remap-ids` capability): a snapshot prepared
//! with `containerd.io/snapshot/uidmapping` and `gidmapping` gets an upper directory owned
//! by the container's root as the host sees it, and lower layers seen through idmapped
//! mounts (`idmapped_lowers`), so the image's files appear owned by the container's IDs
//! without a copy or a chown. Lazily mounted layers allow that on Linux 6.12+
//! (FUSE_ALLOW_IDMAP).

use crate::error::{Error, Result};
use crate::types::Labels;

pub const LABEL_UID_MAPPING: &str = "containerd.io/snapshot/uidmapping";
pub const LABEL_GID_MAPPING: &str = "containerd.io/snapshot/gidmapping";

/// One range: container IDs `container..container+size` are host IDs `host..host+size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdRange {
    pub container: u32,
    pub host: u32,
    pub size: u32,
}

/// A snapshot's mapping, as its labels give it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdMapping {
    uids: Vec<IdRange>,
    gids: Vec<IdRange>,
    /// The host IDs of the container's root.
    pub root_uid: u32,
    pub root_gid: u32,
}

impl IdMapping {
    /// The mapping the labels ask for; `None` without the labels. containerd sets both or
    /// neither; one alone, a malformed list or a list without container ID 0 is refused.
    pub fn from_labels(labels: &Labels) -> Result<Option<IdMapping>> {
        let (uid, gid) = (labels.get(LABEL_UID_MAPPING), labels.get(LABEL_GID_MAPPING));
        let (uid, gid) = match (uid, gid) {
            (None, None) => return Ok(None),
            (Some(u), Some(g)) => (u, g),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{LABEL_UID_MAPPING} and {LABEL_GID_MAPPING} come together; one was given"
                )));
            }
        };
        let uids = parse_ranges(uid, LABEL_UID_MAPPING)?;
        let gids = parse_ranges(gid, LABEL_GID_MAPPING)?;
        Ok(Some(IdMapping {
            root_uid: root_of(&uids, LABEL_UID_MAPPING)?,
            root_gid: root_of(&gids, LABEL_GID_MAPPING)?,
            uids,
            gids,
        }))
    }

    pub fn uid_ranges(&self) -> &[IdRange] {
        &self.uids
    }

    pub fn gid_ranges(&self) -> &[IdRange] {
        &self.gids
    }
}

/// containerd's form: `container:host:size[,container:host:size...]`.
pub fn parse_ranges(text: &str, label: &str) -> Result<Vec<IdRange>> {
    let bad = |why: &str| Error::InvalidArgument(format!("{label} {text:?}: {why}"));
    let mut out = Vec::new();
    for part in text.split(',') {
        let fields: Vec<&str> = part.trim().split(':').collect();
        let [c, h, s] = fields[..] else {
            return Err(bad("each range is container:host:size"));
        };
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| bad("IDs are unsigned 32-bit numbers"))
        };
        let range = IdRange {
            container: num(c)?,
            host: num(h)?,
            size: num(s)?,
        };
        if range.size == 0
            || range.container.checked_add(range.size - 1).is_none()
            || range.host.checked_add(range.size - 1).is_none()
        {
            return Err(bad("a range is empty or runs past 2^32"));
        }
        out.push(range);
    }
    Ok(out)
}

fn root_of(ranges: &[IdRange], label: &str) -> Result<u32> {
    ranges
        .iter()
        .find(|r| r.container == 0)
        .map(|r| r.host)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{label}: no range maps the container's root (container ID 0)"
            ))
        })
}

/// Whether this kernel can idmap FUSE mounts (Linux 6.12 added FUSE_ALLOW_IDMAP).
pub fn kernel_idmaps_fuse() -> bool {
    let Ok(uts) = nix::sys::utsname::uname() else {
        return false;
    };
    kernel_at_least(&uts.release().to_string_lossy(), (6, 12))
}

fn kernel_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(uid: Option<&str>, gid: Option<&str>) -> Labels {
        let mut l = Labels::new();
        if let Some(u) = uid {
            l.insert(LABEL_UID_MAPPING.into(), u.into());
        }
        if let Some(g) = gid {
            l.insert(LABEL_GID_MAPPING.into(), g.into());
        }
        l
    }

    #[test]
    fn mappings_as_containerd_writes_them() {
        assert_eq!(IdMapping::from_labels(&Labels::new()).unwrap(), None);
        let m = IdMapping::from_labels(&labels(
            Some("0:100000:65536"),
            Some("1:300001:10,0:200000:1"),
        ))
        .unwrap()
        .unwrap();
        assert_eq!((m.root_uid, m.root_gid), (100000, 200000));
        assert_eq!(
            m.gid_ranges(),
            [
                IdRange {
                    container: 1,
                    host: 300001,
                    size: 10
                },
                IdRange {
                    container: 0,
                    host: 200000,
                    size: 1
                }
            ]
        );
    }

    #[test]
    fn bad_mappings_are_refused_with_the_reason() {
        for (uid, gid, want) in [
            (Some("0:1:1"), None, "come together"),
            (Some("0:1"), Some("0:1:1"), "container:host:size"),
            (Some("0:x:1"), Some("0:1:1"), "unsigned"),
            (Some("0:1:0"), Some("0:1:1"), "empty"),
            (Some("0:4294967295:2"), Some("0:1:1"), "past 2^32"),
            (Some("1:1000:10"), Some("0:1:1"), "container ID 0"),
        ] {
            let err = IdMapping::from_labels(&labels(uid, gid)).unwrap_err();
            assert!(err.to_string().contains(want), "{uid:?} {gid:?}: {err}");
        }
    }

    #[test]
    fn kernel_versions() {
        assert!(kernel_at_least("6.18.0-1-amd64", (6, 12)));
        assert!(kernel_at_least("6.12.0", (6, 12)));
        assert!(kernel_at_least("7.0.1", (6, 12)));
        assert!(!kernel_at_least("6.1.0-28-amd64", (6, 12)));
        assert!(!kernel_at_least("5.19.17", (6, 12)));
        assert!(!kernel_at_least("garbage", (6, 12)));
    }
}
