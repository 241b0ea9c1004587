//! containerd's snapshot semantics over overlayfs, as its own overlay snapshotter has them:
//! active snapshots with no parent are bind mounts, with parents overlay mounts
//! (upperdir/workdir over the parents' directories), views are read-only, committed
//! snapshots are the immutable lower layers of others.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, IoContext, Result};
use crate::filter::{self, Filter};
use crate::fsutil;
use crate::idmap::IdMapping;
use crate::idmapped_lowers::IdmappedLowers;
use crate::remote;
use crate::store::{self, Row, Store};
use crate::types::{Info, Kind, Labels, Mount, UpdateField, Usage};

pub struct Snapshotter {
    root: PathBuf,
    store: Mutex<Store>,
    index_off: bool,
    /// Lower layers as user-namespaced snapshots see them.
    idmapped: IdmappedLowers,
}

/// A lazily mounted snapshot as the store knows it: where it is mounted, and the labels
/// it was prepared with (they say where to fetch the layer from).
#[derive(Debug, Clone)]
pub struct RemoteSnapshot {
    pub name: String,
    pub mountpoint: PathBuf,
    pub labels: Labels,
}

/// A snapshot whose metadata is gone. Its directory is deleted by
/// [`Removed::delete_files`], once whatever is mounted in it (a lazily pulled layer) is
/// unmounted.
#[must_use = "the snapshot's directory stays until Removed::delete_files"]
pub struct Removed {
    key: String,
    dir: PathBuf,
    /// Where its layer was mounted, if it was a lazily pulled snapshot.
    pub lazy_mountpoint: Option<PathBuf>,
}

impl Removed {
    /// Deletes the snapshot's directory. Metadata first, files second: a failure (or a
    /// crash before this) leaves an orphan directory for Cleanup, never metadata
    /// pointing at missing files.
    pub fn delete_files(self) {
        if let Err(e) = fsutil::remove_tree(&self.dir) {
            tracing::warn!(key = self.key, error = %e, "snapshot removed; its directory is left for Cleanup");
        }
    }
}

/// What [`Snapshotter::prepare_for_layer`] found or made.
pub enum PreparedForLayer {
    /// The layer's snapshot is already committed under its target.
    TargetExists,
    /// An active snapshot, with its mounts and the directory to mount the layer in.
    Prepared { mounts: Vec<Mount>, fs_dir: PathBuf },
}

/// Directory names under `snapshots/` that are work in progress, not snapshots.
const NEW_PREFIX: &str = "new-";

impl Snapshotter {
    /// Opens (creating when needed) the snapshotter state under `root`.
    pub fn open(root: &Path) -> Result<Snapshotter> {
        let snapshots = root.join("snapshots");
        std::fs::create_dir_all(&snapshots).io_context("create", &snapshots)?;
        let store = Store::open(&root.join("metadata.db"))?;
        Ok(Snapshotter {
            root: root.to_path_buf(),
            store: Mutex::new(store),
            index_off: fsutil::overlay_has_index_option(),
            idmapped: IdmappedLowers::new(root),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave a half-written transaction (SQLite
        // rolls it back), so a poisoned lock is safe to keep using.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot_dir(&self, id: i64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// The directory holding a snapshot's files (upper dir, committed layer or view).
    pub fn fs_dir(&self, id: i64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    fn work_dir(&self, id: i64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    pub fn prepare(&self, key: &str, parent: &str, labels: &Labels) -> Result<Vec<Mount>> {
        let created = self.create(Kind::Active, key, parent, labels, None)?;
        created
            .map(|(mounts, _)| mounts)
            .ok_or_else(|| Error::Internal("no snapshot created, and none was asked for".into()))
    }

    pub fn view(&self, key: &str, parent: &str, labels: &Labels) -> Result<Vec<Mount>> {
        let created = self.create(Kind::View, key, parent, labels, None)?;
        created
            .map(|(mounts, _)| mounts)
            .ok_or_else(|| Error::Internal("no snapshot created, and none was asked for".into()))
    }

    /// A Prepare for a layer that may be pulled lazily, in one transaction: nothing when
    /// the layer's snapshot is already committed under `target`, else the active
    /// snapshot and the directory its layer is to be mounted in.
    pub fn prepare_for_layer(
        &self,
        key: &str,
        parent: &str,
        labels: &Labels,
        target: &str,
    ) -> Result<PreparedForLayer> {
        Ok(
            match self.create(Kind::Active, key, parent, labels, Some(target))? {
                None => PreparedForLayer::TargetExists,
                Some((mounts, id)) => PreparedForLayer::Prepared {
                    mounts,
                    fs_dir: self.fs_dir(id),
                },
            },
        )
    }

    /// Creates a snapshot and returns its mounts and id; None, creating nothing, when
    /// `unless_committed` names a snapshot that exists.
    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: &Labels,
        unless_committed: Option<&str>,
    ) -> Result<Option<(Vec<Mount>, i64)>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        let mapping = IdMapping::from_labels(labels)?;
        let mut guard = self.lock();
        if let Some(target) = unless_committed
            && store::get(guard.conn(), target)?.is_some()
        {
            return Ok(None);
        }
        if store::get(guard.conn(), key)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key:?}")));
        }
        // Build the directories aside, move them into place inside the transaction:
        // if we crash, either the metadata commit happened with the directory in place,
        // or the directory is an orphan that Cleanup removes.
        let staging = self.stage_dirs(kind)?;
        let result = (|| {
            let tx = guard.transaction()?;
            let parent_row = self.committed_parent(&tx, parent)?;
            let row = store::insert(&tx, key, parent_row.as_ref().map(|p| p.id), kind, labels)?;
            let fs = staging.path().join("fs");
            if let Some(mapping) = &mapping {
                // The container's root owns its upper dir, as the host sees that root.
                std::os::unix::fs::lchown(&fs, Some(mapping.root_uid), Some(mapping.root_gid))
                    .io_context("chown", &fs)?;
            } else if let Some(parent_row) = &parent_row {
                // The new upper dir takes the owner of the parent's root, like containerd.
                let meta = std::fs::metadata(self.fs_dir(parent_row.id))
                    .io_context("stat parent", &self.fs_dir(parent_row.id))?;
                use std::os::unix::fs::MetadataExt;
                std::os::unix::fs::lchown(&fs, Some(meta.uid()), Some(meta.gid()))
                    .io_context("chown", &fs)?;
            }
            let target = self.snapshot_dir(row.id);
            // An id can be handed out again after a crash rolled back its transaction;
            // whatever directory it left behind belongs to no snapshot.
            if target.exists() {
                fsutil::remove_tree(&target)?;
            }
            std::fs::rename(staging.path(), &target).io_context("rename into place", &target)?;
            // Clones left by a snapshot of this id that a crash rolled back.
            self.idmapped.release(row.id);
            let mounts = self.mounts_for(&tx, &row);
            match mounts.and_then(|m| tx.commit().map(|()| m).map_err(Error::from)) {
                Ok(mounts) => Ok(Some((mounts, row.id))),
                Err(e) => {
                    self.idmapped.release(row.id);
                    let _ = fsutil::remove_tree(&target);
                    Err(e)
                }
            }
        })();
        drop(staging);
        result
    }

    /// A temp dir under `snapshots/` with `fs` (and `work` for active snapshots).
    fn stage_dirs(&self, kind: Kind) -> Result<tempfile::TempDir> {
        let base = self.root.join("snapshots");
        let staging = tempfile::Builder::new()
            .prefix(NEW_PREFIX)
            .tempdir_in(&base)
            .io_context("create staging dir in", &base)?;
        let fs = staging.path().join("fs");
        std::fs::create_dir(&fs).io_context("create", &fs)?;
        // Snapshot roots are 0755 whatever the umask (containerd's RootPermission test).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fs, std::fs::Permissions::from_mode(0o755))
            .io_context("chmod", &fs)?;
        if kind == Kind::Active {
            let work = staging.path().join("work");
            std::fs::create_dir(&work).io_context("create", &work)?;
        }
        Ok(staging)
    }

    fn committed_parent(&self, conn: &rusqlite::Connection, parent: &str) -> Result<Option<Row>> {
        if parent.is_empty() {
            return Ok(None);
        }
        let row = store::get(conn, parent)?.ok_or_else(|| Error::NotFound(parent.to_string()))?;
        if row.kind != Kind::Committed {
            return Err(Error::InvalidArgument(format!(
                "parent {parent:?} is not a committed snapshot"
            )));
        }
        Ok(Some(row))
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let guard = self.lock();
        let row = store::get_existing(guard.conn(), key)?;
        if row.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is committed; only active snapshots and views have mounts"
            )));
        }
        self.mounts_for(guard.conn(), &row)
    }

    fn mounts_for(&self, conn: &rusqlite::Connection, row: &Row) -> Result<Vec<Mount>> {
        let ancestors = store::ancestors(conn, row)?;
        let mapping = IdMapping::from_labels(&store::labels(conn, row.id)?)?;
        let path = |id: i64| self.fs_dir(id).to_string_lossy().into_owned();
        // A lazily pulled layer that has a native copy is read from it: containers
        // created now need no FUSE (running ones keep theirs). A user-namespaced
        // snapshot sees each through an idmapped clone.
        let lower_path = |id: i64| -> Result<String> {
            let source = crate::native::native_of(&self.fs_dir(id)).unwrap_or(self.fs_dir(id));
            let seen = match &mapping {
                Some(m) => self.idmapped.lower(row.id, id, &source, m)?,
                None => source,
            };
            Ok(seen.to_string_lossy().into_owned())
        };
        if ancestors.is_empty() {
            let mode = if row.kind == Kind::View { "ro" } else { "rw" };
            return Ok(vec![Mount {
                kind: "bind".into(),
                source: path(row.id),
                options: vec![mode.into(), "rbind".into()],
            }]);
        }
        if row.kind != Kind::Active && ancestors.len() == 1 {
            return Ok(vec![Mount {
                kind: "bind".into(),
                source: lower_path(ancestors[0])?,
                options: vec!["ro".into(), "rbind".into()],
            }]);
        }
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_string());
        }
        if row.kind == Kind::Active {
            options.push(format!("workdir={}", self.work_dir(row.id).display()));
            options.push(format!("upperdir={}", path(row.id)));
        }
        let lower: Vec<String> = ancestors
            .iter()
            .map(|&id| lower_path(id))
            .collect::<Result<_>>()?;
        options.push(format!("lowerdir={}", lower.join(":")));
        Ok(vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options,
        }])
    }

    pub fn commit(&self, name: &str, key: &str, labels: &Labels) -> Result<()> {
        self.commit_with(name, key, labels, None)
    }

    /// Commits an active snapshot whose directory is a lazily mounted layer: its usage is
    /// what the layer says, not a walk over a filesystem whose bytes are not local yet.
    pub fn commit_remote(
        &self,
        name: &str,
        key: &str,
        labels: &Labels,
        usage: Usage,
    ) -> Result<()> {
        self.commit_with(name, key, labels, Some(usage))
    }

    fn commit_with(
        &self,
        name: &str,
        key: &str,
        labels: &Labels,
        usage: Option<Usage>,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "commit name must not be empty".into(),
            ));
        }
        let mut guard = self.lock();
        let tx = guard.transaction()?;
        if store::get(&tx, name)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {name:?}")));
        }
        let row = store::get_existing(&tx, key)?;
        if row.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key:?} is not active and cannot be committed"
            )));
        }
        let usage = match usage {
            Some(usage) => usage,
            None => fsutil::disk_usage(&self.fs_dir(row.id))?,
        };
        store::commit(&tx, row.id, name, labels, usage)?;
        tx.commit()?;
        Ok(())
    }

    /// Removes the snapshot's metadata; its files go with [`Removed::delete_files`].
    pub fn remove(&self, key: &str) -> Result<Removed> {
        let mut guard = self.lock();
        let tx = guard.transaction()?;
        let row = store::get_existing(&tx, key)?;
        if store::has_children(&tx, row.id)? {
            return Err(Error::FailedPrecondition(format!(
                "failed to remove snapshot {key:?}: cannot remove snapshot with child"
            )));
        }
        let was_remote = remote::is_remote(&store::labels(&tx, row.id)?);
        store::delete(&tx, row.id)?;
        tx.commit()?;
        drop(guard);
        self.idmapped.release(row.id);
        Ok(Removed {
            key: key.to_string(),
            dir: self.snapshot_dir(row.id),
            lazy_mountpoint: was_remote.then(|| self.fs_dir(row.id)),
        })
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        let guard = self.lock();
        let row = store::get_existing(guard.conn(), key)?;
        store::info(guard.conn(), &row)
    }

    pub fn update(&self, info: &Info, fields: &[UpdateField]) -> Result<Info> {
        let mut guard = self.lock();
        let tx = guard.transaction()?;
        let row = store::get_existing(&tx, &info.name)?;
        let mut labels = store::labels(&tx, row.id)?;
        if fields.is_empty() {
            labels = info.labels.clone();
        }
        for field in fields {
            match field {
                UpdateField::Labels => labels = info.labels.clone(),
                UpdateField::Label(name) => match info.labels.get(name) {
                    Some(value) => {
                        labels.insert(name.clone(), value.clone());
                    }
                    None => {
                        labels.remove(name);
                    }
                },
            }
        }
        store::set_labels(&tx, row.id, &labels)?;
        store::touch(&tx, row.id)?;
        let row = store::get_existing(&tx, &info.name)?;
        let updated = store::info(&tx, &row)?;
        tx.commit()?;
        Ok(updated)
    }

    pub fn list(&self, filters: &[Filter]) -> Result<Vec<Info>> {
        let guard = self.lock();
        let conn = guard.conn();
        let mut out = Vec::new();
        for row in store::all_rows(conn)? {
            let info = store::info(conn, &row)?;
            if filter::any_matches(filters, &info) {
                out.push(info);
            }
        }
        Ok(out)
    }

    pub fn usage(&self, key: &str) -> Result<Usage> {
        let (row, dir) = {
            let guard = self.lock();
            let row = store::get_existing(guard.conn(), key)?;
            let dir = self.fs_dir(row.id);
            (row, dir)
        };
        match row.kind {
            Kind::Active => fsutil::disk_usage(&dir),
            Kind::View | Kind::Committed => Ok(row.usage),
        }
    }

    /// The directory an existing snapshot's files live in (the mountpoint of a remote one).
    pub fn fs_dir_of(&self, key: &str) -> Result<PathBuf> {
        let guard = self.lock();
        let row = store::get_existing(guard.conn(), key)?;
        Ok(self.fs_dir(row.id))
    }

    /// Every lazily mounted snapshot, for remounting them after a restart.
    pub fn remote_snapshots(&self) -> Result<Vec<RemoteSnapshot>> {
        let guard = self.lock();
        let conn = guard.conn();
        let mut out = Vec::new();
        for row in store::all_rows(conn)? {
            let labels = store::labels(conn, row.id)?;
            if row.kind == Kind::Committed && remote::is_remote(&labels) {
                out.push(RemoteSnapshot {
                    name: row.key.clone(),
                    mountpoint: self.fs_dir(row.id),
                    labels,
                });
            }
        }
        Ok(out)
    }

    /// The lazily mounted snapshots among `key` and its ancestors: what must be served
    /// before `key`'s mounts can work.
    pub fn remote_chain(&self, key: &str) -> Result<Vec<RemoteSnapshot>> {
        let guard = self.lock();
        let conn = guard.conn();
        let row = store::get_existing(conn, key)?;
        let mut ids = vec![row.id];
        ids.extend(store::ancestors(conn, &row)?);
        let mut out = Vec::new();
        for id in ids {
            let labels = store::labels(conn, id)?;
            if remote::is_remote(&labels) {
                out.push(RemoteSnapshot {
                    name: store::key_of(conn, id)?,
                    mountpoint: self.fs_dir(id),
                    labels,
                });
            }
        }
        Ok(out)
    }

    /// Removes every directory under `snapshots/` that no snapshot refers to: leftovers
    /// of crashes and of removals whose file deletion failed. `before_deleting` is given
    /// each one's `fs` directory first, where a lazily pulled layer may still be mounted.
    pub fn cleanup(&self, before_deleting: impl Fn(&Path)) -> Result<Vec<PathBuf>> {
        let guard = self.lock();
        let ids = store::all_ids(guard.conn())?;
        let base = self.root.join("snapshots");
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&base).io_context("read directory", &base)? {
            let entry = entry.io_context("read directory", &base)?;
            let name = entry.file_name();
            let known = name
                .to_str()
                .and_then(|n| n.parse::<i64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if !known {
                before_deleting(&entry.path().join("fs"));
                fsutil::remove_tree(&entry.path())?;
                removed.push(entry.path());
            }
        }
        drop(guard);
        self.idmapped.release_orphans(&ids);
        Ok(removed)
    }
}
