//! SIGKILL in the middle of a stream of Prepare/Commit/Remove calls: after a restart the
//! metadata and the directories on disk agree.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use snapshotter::proto::snapshots as pb;
use testkit::lazysnapd::Lazysnapd;

const BIN: &str = env!("CARGO_BIN_EXE_lazysnapd");

/// The directory a freshly prepared snapshot writes into, from its mounts.
fn writable_dir(mounts: &[snapshotter::proto::containerd::types::Mount]) -> PathBuf {
    let m = &mounts[0];
    if m.r#type == "bind" {
        return PathBuf::from(&m.source);
    }
    let upper = m
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .expect("overlay mount without upperdir");
    PathBuf::from(upper)
}

/// Prepares, writes a marker, commits and removes snapshots as fast as it can, until the
/// daemon dies under it. Keys carry a round number so that each round's names are new.
async fn churn(address: PathBuf, round: usize) {
    let Ok(mut c) = snapshotter::client::connect(&address).await else {
        return;
    };
    let mut parent = String::new();
    for i in 0.. {
        let key = format!("r{round}-active-{i}");
        let prepared = c
            .prepare(pb::PrepareSnapshotRequest {
                key: key.clone(),
                parent: parent.clone(),
                ..Default::default()
            })
            .await;
        let Ok(prepared) = prepared else { return };
        let dir = writable_dir(&prepared.into_inner().mounts);
        if std::fs::write(dir.join(format!("marker-r{round}-{i}")), &key).is_err() {
            return;
        }
        let name = format!("r{round}-committed-{i}");
        let committed = c
            .commit(pb::CommitSnapshotRequest {
                name: name.clone(),
                key,
                labels: HashMap::from([("round".to_string(), round.to_string())]),
                ..Default::default()
            })
            .await;
        if committed.is_err() {
            return;
        }
        // Keep chains short: every few layers, drop the chain back to its root.
        if i % 4 == 3 {
            for j in (i - 3..=i).rev() {
                let removed = c
                    .remove(pb::RemoveSnapshotRequest {
                        key: format!("r{round}-committed-{j}"),
                        ..Default::default()
                    })
                    .await;
                if removed.is_err() {
                    return;
                }
            }
            parent.clear();
        } else {
            parent = name;
        }
    }
}

struct Row {
    id: i64,
    key: String,
    kind: i64,
}

fn rows(root: &Path) -> Vec<Row> {
    let db = rusqlite::Connection::open_with_flags(
        root.join("metadata.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = db.prepare("SELECT id, key, kind FROM snapshots").unwrap();
    stmt.query_map([], |r| {
        Ok(Row {
            id: r.get(0)?,
            key: r.get(1)?,
            kind: r.get(2)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn snapshot_dirs(root: &Path) -> BTreeSet<String> {
    std::fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_stream_leaves_metadata_and_directories_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Lazysnapd::start(Path::new(BIN), dir.path()).unwrap();
    let mut orphans_seen = 0;
    for (round, run_ms) in [7u64, 23, 41, 60, 97, 130, 170, 230]
        .into_iter()
        .enumerate()
    {
        let mut worker = tokio::spawn(churn(daemon.address.clone(), round));
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        daemon.kill().unwrap();
        // A call in flight fails with the daemon. One made after the kill waits in the
        // kept socket's backlog for the next daemon (by design): that client is stopped.
        match tokio::time::timeout(Duration::from_secs(5), &mut worker).await {
            Ok(finished) => finished.unwrap(),
            Err(_) => worker.abort(),
        }
        daemon.restart().unwrap();

        // Every snapshot in the metadata has its directory, and a committed one has
        // the marker its active form wrote.
        let rows = rows(&daemon.root);
        for row in &rows {
            let fs = daemon
                .root
                .join("snapshots")
                .join(row.id.to_string())
                .join("fs");
            assert!(
                fs.is_dir(),
                "snapshot {} (id {}) lost its directory",
                row.key,
                row.id
            );
            if row.kind == 3 {
                let (r, i) = row
                    .key
                    .trim_start_matches('r')
                    .split_once("-committed-")
                    .unwrap();
                let marker = fs.join(format!("marker-r{r}-{i}"));
                assert!(
                    marker.is_file(),
                    "committed {} is missing {}",
                    row.key,
                    marker.display()
                );
            }
        }
        let known: BTreeSet<String> = rows.iter().map(|r| r.id.to_string()).collect();
        orphans_seen += snapshot_dirs(&daemon.root).difference(&known).count();

        // Cleanup removes exactly the directories no metadata refers to.
        let mut c = snapshotter::client::connect(&daemon.address).await.unwrap();
        c.cleanup(pb::CleanupRequest::default()).await.unwrap();
        assert_eq!(
            snapshot_dirs(&daemon.root),
            known,
            "after Cleanup in round {round}"
        );

        // The daemon works on the recovered state.
        let listed = c
            .list(pb::ListSnapshotsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .map_or(0, |batch| batch.info.len());
        assert_eq!(listed, rows.len().min(100));
    }
    eprintln!("orphaned directories found after kills and removed by Cleanup: {orphans_seen}");
}
