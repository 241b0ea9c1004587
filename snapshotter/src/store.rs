//! The metadata store: snapshots, their parents, kinds, labels and usage in SQLite.
//!
//! Every change happens in one transaction; directories on disk are created before the
//! transaction that records them commits and removed after the one that forgets them
//! commits, so a crash can only leave directories that no metadata refers to, which
//! Cleanup removes.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::error::{Error, Result};
use crate::types::{Info, Kind, Labels, Usage};

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent INTEGER REFERENCES snapshots(id),
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    usage_size INTEGER NOT NULL DEFAULT 0,
    usage_inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX snapshots_parent ON snapshots(parent);
CREATE TABLE labels (
    snapshot INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (snapshot, name)
) WITHOUT ROWID;
";

/// One snapshot's row.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub id: i64,
    pub key: String,
    pub parent: Option<i64>,
    pub kind: Kind,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub usage: Usage,
}

pub(crate) struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        // WAL with FULL sync: a committed transaction survives a crash of the process
        // or the machine; readers never see a half-applied change.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        match version {
            0 => {
                let tx = conn.unchecked_transaction()?;
                tx.execute_batch(SCHEMA)?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
                tx.commit()?;
            }
            SCHEMA_VERSION => {}
            other => {
                return Err(Error::Internal(format!(
                    "metadata store {} has schema version {other}, this lazysnapd knows {SCHEMA_VERSION}",
                    path.display()
                )));
            }
        }
        Ok(Store { conn })
    }

    pub fn transaction(&mut self) -> Result<Transaction<'_>> {
        Ok(self.conn.transaction()?)
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}

fn to_ns(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_ns(ns: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
}

/// The current time at the precision the store keeps, so returned and stored values agree.
pub(crate) fn now() -> SystemTime {
    from_ns(to_ns(SystemTime::now()))
}

const ROW_COLUMNS: &str = "id, key, parent, kind, created_ns, updated_ns, usage_size, usage_inodes";

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let kind: i64 = r.get(3)?;
    Ok(Row {
        id: r.get(0)?,
        key: r.get(1)?,
        parent: r.get(2)?,
        kind: Kind::from_db(kind).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                3,
                rusqlite::types::Type::Integer,
                format!("unknown snapshot kind {kind}").into(),
            )
        })?,
        created: from_ns(r.get(4)?),
        updated: from_ns(r.get(5)?),
        usage: Usage {
            size: r.get(6)?,
            inodes: r.get(7)?,
        },
    })
}

pub(crate) fn get(conn: &Connection, key: &str) -> Result<Option<Row>> {
    Ok(conn
        .query_row(
            &format!("SELECT {ROW_COLUMNS} FROM snapshots WHERE key = ?1"),
            [key],
            read_row,
        )
        .optional()?)
}

pub(crate) fn get_existing(conn: &Connection, key: &str) -> Result<Row> {
    get(conn, key)?.ok_or_else(|| Error::NotFound(key.to_string()))
}

pub(crate) fn all_rows(conn: &Connection) -> Result<Vec<Row>> {
    let mut stmt = conn.prepare(&format!("SELECT {ROW_COLUMNS} FROM snapshots ORDER BY id"))?;
    let rows = stmt
        .query_map([], read_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub(crate) fn key_of(conn: &Connection, id: i64) -> Result<String> {
    Ok(
        conn.query_row("SELECT key FROM snapshots WHERE id = ?1", [id], |r| {
            r.get(0)
        })?,
    )
}

pub(crate) fn labels(conn: &Connection, id: i64) -> Result<Labels> {
    let mut stmt = conn.prepare_cached("SELECT name, value FROM labels WHERE snapshot = ?1")?;
    let labels = stmt
        .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Labels, _>>()?;
    Ok(labels)
}

/// Replaces a snapshot's labels; empty values are dropped, as containerd's stores do.
pub(crate) fn set_labels(conn: &Connection, id: i64, labels: &Labels) -> Result<()> {
    conn.execute("DELETE FROM labels WHERE snapshot = ?1", [id])?;
    let mut stmt =
        conn.prepare_cached("INSERT INTO labels (snapshot, name, value) VALUES (?1, ?2, ?3)")?;
    for (name, value) in labels.iter().filter(|(_, v)| !v.is_empty()) {
        stmt.execute(params![id, name, value])?;
    }
    Ok(())
}

pub(crate) fn info(conn: &Connection, row: &Row) -> Result<Info> {
    let parent = match row.parent {
        Some(parent) => key_of(conn, parent)?,
        None => String::new(),
    };
    Ok(Info {
        name: row.key.clone(),
        parent,
        kind: row.kind,
        created: row.created,
        updated: row.updated,
        labels: labels(conn, row.id)?,
    })
}

pub(crate) fn insert(
    tx: &Transaction<'_>,
    key: &str,
    parent: Option<i64>,
    kind: Kind,
    labels: &Labels,
) -> Result<Row> {
    let now = now();
    tx.execute(
        "INSERT INTO snapshots (key, parent, kind, created_ns, updated_ns) VALUES (?1, ?2, ?3, ?4, ?4)",
        params![key, parent, kind.to_db(), to_ns(now)],
    )?;
    let id = tx.last_insert_rowid();
    set_labels(tx, id, labels)?;
    Ok(Row {
        id,
        key: key.to_string(),
        parent,
        kind,
        created: now,
        updated: now,
        usage: Usage::default(),
    })
}

/// Turns an active snapshot into a committed one under a new name; the id (and so the
/// directory and the children's parent links) stays the same.
pub(crate) fn commit(
    tx: &Transaction<'_>,
    id: i64,
    name: &str,
    labels: &Labels,
    usage: Usage,
) -> Result<()> {
    let now = to_ns(now());
    tx.execute(
        "UPDATE snapshots SET key = ?2, kind = ?3, created_ns = ?4, updated_ns = ?4,
         usage_size = ?5, usage_inodes = ?6 WHERE id = ?1",
        params![
            id,
            name,
            Kind::Committed.to_db(),
            now,
            usage.size,
            usage.inodes
        ],
    )?;
    set_labels(tx, id, labels)
}

pub(crate) fn touch(tx: &Transaction<'_>, id: i64) -> Result<()> {
    tx.execute(
        "UPDATE snapshots SET updated_ns = ?2 WHERE id = ?1",
        params![id, to_ns(now())],
    )?;
    Ok(())
}

pub(crate) fn has_children(conn: &Connection, id: i64) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM snapshots WHERE parent = ?1 LIMIT 1",
            [id],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

pub(crate) fn delete(tx: &Transaction<'_>, id: i64) -> Result<()> {
    tx.execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
    Ok(())
}

/// Ids of the snapshot's ancestors, nearest first.
pub(crate) fn ancestors(conn: &Connection, row: &Row) -> Result<Vec<i64>> {
    let mut stmt = conn.prepare_cached("SELECT parent FROM snapshots WHERE id = ?1")?;
    let mut chain = Vec::new();
    let mut next = row.parent;
    let mut child = row.id;
    while let Some(id) = next {
        // A parent always exists before its child, so ids strictly fall along the chain;
        // anything else is a damaged store, and checking it guarantees termination.
        if id >= child {
            return Err(Error::Internal(format!(
                "parent chain of {:?} is damaged at snapshot id {id}",
                row.key
            )));
        }
        child = id;
        chain.push(id);
        next = stmt.query_row([id], |r| r.get(0))?;
    }
    Ok(chain)
}

pub(crate) fn all_ids(conn: &Connection) -> Result<std::collections::HashSet<i64>> {
    let mut stmt = conn.prepare("SELECT id FROM snapshots")?;
    let ids = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(ids)
}
