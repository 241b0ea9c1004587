//! The snapshotter's own types, independent of containerd's protobufs.

use std::collections::BTreeMap;
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    /// The names containerd's filters use for kinds.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }

    pub(crate) fn to_db(self) -> i64 {
        match self {
            Kind::View => 1,
            Kind::Active => 2,
            Kind::Committed => 3,
        }
    }

    pub(crate) fn from_db(value: i64) -> Option<Kind> {
        match value {
            1 => Some(Kind::View),
            2 => Some(Kind::Active),
            3 => Some(Kind::Committed),
            _ => None,
        }
    }
}

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    /// Name of the parent snapshot, empty when there is none.
    pub parent: String,
    pub kind: Kind,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// Which fields of an `Info` an update touches (containerd's field paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateField {
    /// Replace the whole label map.
    Labels,
    /// Set or remove (when absent from the given labels) one label.
    Label(String),
}
