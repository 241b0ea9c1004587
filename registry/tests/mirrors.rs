//! Mirrors as P2P engines run them: every request names the upstream registry (`ns=`,
//! which Spegel requires), and a mirror that answers range reads wrongly (the whole blob,
//! several ranges, an error) is passed over for range reads for a while, while its
//! whole-blob answers are still used.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{FakeServer, Reply, Request, pseudo_random, serve_blob};
use registry::{Client, Digest, RegistryConfig, RemoteBlob, Repository};

const REPO: &str = "p2p/app";

fn client_with_mirror(origin: &FakeServer, mirror: &FakeServer, retry_sec: u64) -> Client {
    let text = format!(
        "[[resolver.host.\"{}\".mirrors]]\nhost = \"{}\"\n",
        origin.host, mirror.host
    );
    let mut c: RegistryConfig = toml::from_str(&text).expect("toml");
    c.http.max_retries = 0;
    c.http.mirror_range_retry_sec = retry_sec;
    Client::new(c).expect("client")
}

fn blob_requests(server: &FakeServer, digest: &Digest) -> usize {
    server.count(|r| r.path().ends_with(&format!("/blobs/{digest}")))
}

fn remote(client: &Client, origin: &FakeServer, data: &[u8]) -> RemoteBlob {
    RemoteBlob::new(
        client.clone(),
        Repository::new(origin.host.clone(), REPO),
        Digest::sha256_of(data),
        data.len() as u64,
    )
}

/// Like Spegel: refuses requests without `ns`, serves only the blobs its node holds
/// (404 for the rest).
fn spegel(holds: Vec<Vec<u8>>) -> impl Fn(&Request, usize) -> Reply + Send + Sync {
    move |req, _| {
        if req.query("ns").is_empty() {
            return Reply::status(400);
        }
        holds
            .iter()
            .find(|b| req.path().ends_with(&Digest::sha256_of(b).to_string()))
            .map_or_else(|| Reply::status(404), |b| serve_blob(req, b))
    }
}

#[tokio::test]
async fn a_spegel_like_mirror_gets_ns_and_serves_what_it_holds() {
    let held = pseudo_random(300_000, 1);
    let absent = pseudo_random(300_000, 2);
    let (h, a) = (held.clone(), absent.clone());
    let origin = FakeServer::start(move |req, _| {
        let blob = if req.path().ends_with(&Digest::sha256_of(&h).to_string()) {
            &h
        } else {
            &a
        };
        serve_blob(req, blob)
    })
    .await;
    let mirror = FakeServer::start(spegel(vec![held.clone()])).await;
    let client = client_with_mirror(&origin, &mirror, 300);
    let (held_digest, absent_digest) = (Digest::sha256_of(&held), Digest::sha256_of(&absent));

    // What the mirror holds comes from it, every request naming the upstream.
    let got = remote(&client, &origin, &held)
        .read(1000, 5000)
        .await
        .unwrap();
    assert_eq!(&got[..], &held[1000..6000]);
    assert_eq!(blob_requests(&mirror, &held_digest), 1);
    assert_eq!(blob_requests(&origin, &held_digest), 0);
    for r in mirror.requests() {
        assert_eq!(
            r.query("ns"),
            std::slice::from_ref(&origin.host),
            "{}",
            r.target
        );
    }

    // What it does not hold: one 404, then the origin, and no more asking the mirror for
    // that blob for a while.
    let absent_blob = remote(&client, &origin, &absent);
    for i in 0..3u64 {
        let got = absent_blob.read(i * 10_000, 4096).await.unwrap();
        assert_eq!(&got[..], &absent[(i * 10_000) as usize..][..4096]);
    }
    assert_eq!(blob_requests(&mirror, &absent_digest), 1);
    assert_eq!(blob_requests(&origin, &absent_digest), 3);
    // ... while the blobs it holds still come from it.
    remote(&client, &origin, &held).read(0, 100).await.unwrap();
    assert_eq!(blob_requests(&mirror, &held_digest), 2);
    // The origin never gets `ns`: it serves its own content.
    assert!(origin.requests().iter().all(|r| r.query("ns").is_empty()));

    // Whole blobs also come from the mirror, with `ns`.
    let repo = Repository::new(origin.host.clone(), REPO);
    let whole = client
        .fetch_blob(&repo, &held_digest, 1 << 20)
        .await
        .unwrap();
    assert_eq!(&whole[..], &held[..]);
    assert_eq!(blob_requests(&mirror, &held_digest), 3);
    assert_eq!(blob_requests(&origin, &held_digest), 0);
}

#[tokio::test]
async fn a_mirror_ignoring_range_serves_whole_blobs_but_no_more_ranges() {
    let data = pseudo_random(3 << 20, 3);
    let digest = Digest::sha256_of(&data);
    let d = data.clone();
    let origin = FakeServer::start(move |req, _| serve_blob(req, &d)).await;
    let d = data.clone();
    // Answers every GET with the whole blob, whatever the Range header says.
    let mirror = FakeServer::start(move |_, _| {
        Reply::with(
            200,
            &[("Content-Type", "application/octet-stream")],
            d.clone(),
        )
    })
    .await;
    let client = client_with_mirror(&origin, &mirror, 1);
    let blob = remote(&client, &origin, &data);

    // A small read near the start: the whole-blob answer still covers it.
    assert_eq!(&blob.read(100, 200).await.unwrap()[..], &data[100..300]);
    // Later reads go to the origin, even far into the blob.
    assert_eq!(
        &blob.read(2 << 20, 1000).await.unwrap()[..],
        &data[2 << 20..(2 << 20) + 1000]
    );
    assert_eq!(&blob.read(500, 10).await.unwrap()[..], &data[500..510]);
    assert_eq!(blob_requests(&mirror, &digest), 1);
    assert_eq!(blob_requests(&origin, &digest), 2);

    // A whole blob is what it serves well.
    let repo = Repository::new(origin.host.clone(), REPO);
    let whole = client.fetch_blob(&repo, &digest, 4 << 20).await.unwrap();
    assert_eq!(whole.len(), data.len());
    assert_eq!(blob_requests(&mirror, &digest), 2);
    assert_eq!(blob_requests(&origin, &digest), 2);

    // After the pause the mirror is tried for ranges again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    blob.read(100, 10).await.unwrap();
    assert_eq!(blob_requests(&mirror, &digest), 3);
}

#[tokio::test]
async fn several_ranges_or_errors_from_a_mirror_send_ranges_elsewhere() {
    let data = pseudo_random(100_000, 4);
    let digest = Digest::sha256_of(&data);
    let d = data.clone();
    let origin = FakeServer::start(move |req, _| serve_blob(req, &d)).await;
    let d = data.clone();
    // One range asked, a multipart answer given.
    let multipart = FakeServer::start(move |_, _| {
        let mut body = b"\r\n--b0undary\r\nContent-Range: bytes 0-9/100000\r\n\r\n".to_vec();
        body.extend_from_slice(&d[..10]);
        body.extend_from_slice(b"\r\n--b0undary--\r\n");
        Reply::with(
            206,
            &[("Content-Type", "multipart/byteranges; boundary=b0undary")],
            body,
        )
    })
    .await;
    let failing_now = Arc::new(AtomicBool::new(true));
    let f = failing_now.clone();
    let d = data.clone();
    let flaky = FakeServer::start(move |req, _| {
        if f.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            serve_blob(req, &d)
        }
    })
    .await;

    for (mirror, retry_sec) in [(&multipart, 300), (&flaky, 1)] {
        let client = client_with_mirror(&origin, mirror, retry_sec);
        let blob = remote(&client, &origin, &data);
        let before = blob_requests(&origin, &digest);
        for i in 0..3 {
            let got = blob.read(i * 1000, 10).await.unwrap();
            assert_eq!(&got[..], &data[i as usize * 1000..][..10]);
        }
        assert_eq!(blob_requests(mirror, &digest), 1, "{}", mirror.host);
        assert_eq!(blob_requests(&origin, &digest) - before, 3);
        if mirror.host == flaky.host {
            // Recovered, it gets range reads again once its pause is over.
            failing_now.store(false, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let got = blob.read(0, 10).await.unwrap();
            assert_eq!(&got[..], &data[..10]);
            assert_eq!(blob_requests(mirror, &digest), 2);
            assert_eq!(blob_requests(&origin, &digest) - before, 3);
        }
    }
}
