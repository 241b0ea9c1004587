//! Fault injection: every fault either recovers or fails with a clear error; none yields
//! wrong bytes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{FakeServer, Reply, Request, pseudo_random, serve_blob};
use estargz::{BlobErrorKind, BlobReader};
use registry::{
    Client, Credentials, Digest, Error, RegistryConfig, RemoteBlob, Repository, StaticCredentials,
};

const REPO: &str = "fault/repo";

fn config() -> RegistryConfig {
    let mut c = RegistryConfig::default();
    c.http.max_retries = 3;
    c.http.min_wait_msec = 10;
    c.http.max_wait_msec = 2_000;
    c.http.stall_timeout_msec = 500;
    c.http.request_timeout_sec = 10;
    c
}

fn client() -> Client {
    Client::new(config()).expect("client")
}

fn blob_path(digest: &Digest) -> String {
    format!("/v2/{REPO}/blobs/{digest}")
}

fn remote(client: &Client, server: &FakeServer, data: &[u8]) -> RemoteBlob {
    RemoteBlob::new(
        client.clone(),
        Repository::new(server.host.clone(), REPO),
        Digest::sha256_of(data),
        data.len() as u64,
    )
}

fn assert_names_everything(err: &str, server: &FakeServer, digest: &Digest) {
    assert!(
        err.contains(&server.host) && err.contains(REPO) && err.contains(&digest.to_string()),
        "error lacks host, repository or digest: {err}"
    );
}

/// Serves `blob`, but closes the first answer after a third of its body.
async fn first_body_cut_at_a_third(blob: Vec<u8>) -> FakeServer {
    FakeServer::start(move |req, i| match (i, serve_blob(req, &blob)) {
        (
            0,
            Reply::Full {
                status,
                headers,
                body,
            },
        ) => Reply::Cut {
            status,
            headers,
            send: body.len() / 3,
            body,
        },
        (_, reply) => reply,
    })
    .await
}

#[tokio::test]
async fn connection_dropped_mid_body_is_retried() {
    let data = pseudo_random(200_000, 1);
    let server = first_body_cut_at_a_third(data.clone()).await;
    let client = client();
    let got = remote(&client, &server, &data)
        .read(1000, 150_000)
        .await
        .expect("recovered");
    assert_eq!(&got[..], &data[1000..151_000]);
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn a_streamed_read_cut_mid_body_resumes_without_repeating_bytes() {
    let data = pseudo_random(200_000, 7);
    let server = first_body_cut_at_a_third(data.clone()).await;
    let client = client();
    let got = std::sync::Mutex::new(Vec::new());
    let pieces = AtomicUsize::new(0);
    let on_data = |piece: Bytes| {
        pieces.fetch_add(1, Ordering::SeqCst);
        got.lock().unwrap().extend_from_slice(&piece);
    };
    remote(&client, &server, &data)
        .read_streaming(1000, 150_000, &on_data)
        .await
        .expect("recovered");
    // Each byte once, in order: the retry skipped the third already handed over.
    assert_eq!(&got.into_inner().unwrap()[..], &data[1000..151_000]);
    assert!(pieces.load(Ordering::SeqCst) >= 2);
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn connection_always_dropped_fails_clearly() {
    let data = pseudo_random(100_000, 2);
    let blob = data.clone();
    let server = FakeServer::start(move |req, _| match serve_blob(req, &blob) {
        Reply::Full {
            status,
            headers,
            body,
        } => Reply::Cut {
            status,
            headers,
            send: 10,
            body,
        },
        other => other,
    })
    .await;
    let client = client();
    let reader: Arc<dyn BlobReader> = Arc::new(remote(&client, &server, &data));
    let err = reader.read_at(0, 50_000).await.expect_err("must fail");
    assert_eq!(err.kind, BlobErrorKind::Transient, "{err}");
    assert!(err.message.contains("gave up after 4 attempts"), "{err}");
    assert_names_everything(&err.message, &server, &Digest::sha256_of(&data));
    assert_eq!(server.requests().len(), 4);
}

#[tokio::test]
async fn unavailable_and_rate_limited_honour_retry_after() {
    let data = pseudo_random(10_000, 3);
    let blob = data.clone();
    let server = FakeServer::start(move |req, i| match i {
        0 => Reply::with(503, &[("Retry-After", "1")], "busy"),
        1 => Reply::with(429, &[("Retry-After", "0")], "slow down"),
        _ => serve_blob(req, &blob),
    })
    .await;
    let client = client();
    let start = Instant::now();
    let got = remote(&client, &server, &data)
        .read(10, 100)
        .await
        .expect("recovered");
    assert_eq!(&got[..], &data[10..110]);
    // The 503 asked for one second; backoff alone would have waited ~10 ms.
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn endless_5xx_and_too_long_retry_after_give_up() {
    let server = FakeServer::start(|_, _| {
        Reply::with(
            500,
            &[("Content-Type", "application/json")],
            r#"{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}"#,
        )
    })
    .await;
    let client = client();
    let data = b"whatever";
    let err = remote(&client, &server, data)
        .read(0, 4)
        .await
        .expect_err("fails");
    let text = err.to_string();
    assert!(
        text.contains("HTTP 500") && text.contains("disk on fire") && text.contains("4 attempts"),
        "{text}"
    );
    assert_names_everything(&text, &server, &Digest::sha256_of(data));

    // A Retry-After longer than the longest wait allowed ends retrying at once.
    let server = FakeServer::start(|_, _| Reply::with(429, &[("Retry-After", "3600")], "")).await;
    let start = Instant::now();
    let err = remote(&client, &server, data)
        .read(0, 4)
        .await
        .expect_err("fails");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, Error::Status { status: 429, .. }), "{err}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn wrong_content_range_or_length_is_an_error_not_data() {
    let data = pseudo_random(5_000, 4);
    let blob = data.clone();
    // Shifted range: the bytes are real but from the wrong place.
    let server = FakeServer::start(move |_, _| {
        Reply::with(
            206,
            &[("Content-Range", "bytes 101-200/5000")],
            blob[101..=200].to_vec(),
        )
    })
    .await;
    let client = client();
    let err = remote(&client, &server, &data)
        .read(100, 100)
        .await
        .expect_err("wrong range");
    assert!(err.to_string().contains("asked for bytes 100-199"), "{err}");

    // Right Content-Range, short body (honest Content-Length): truncated, retried, fails.
    let blob = data.clone();
    let server = FakeServer::start(move |_, _| {
        Reply::with(
            206,
            &[("Content-Range", "bytes 0-99/5000")],
            blob[..60].to_vec(),
        )
    })
    .await;
    let reader: Arc<dyn BlobReader> = Arc::new(remote(&client, &server, &data));
    let err = reader.read_at(0, 100).await.expect_err("short");
    assert_eq!(err.kind, BlobErrorKind::ShortRead, "{err}");
    assert!(err.message.contains("expected 100 bytes, got 60"), "{err}");

    // Right Content-Range, too long a body.
    let blob = data.clone();
    let server = FakeServer::start(move |_, _| {
        Reply::with(
            206,
            &[("Content-Range", "bytes 0-99/5000")],
            blob[..150].to_vec(),
        )
    })
    .await;
    let err = remote(&client, &server, &data)
        .read(0, 100)
        .await
        .expect_err("long");
    assert!(err.to_string().contains("more than the 100 bytes"), "{err}");

    // A blob size that disagrees with ours.
    let blob = data.clone();
    let server = FakeServer::start(move |_, _| {
        Reply::with(
            206,
            &[("Content-Range", "bytes 0-9/9999")],
            blob[..10].to_vec(),
        )
    })
    .await;
    let err = remote(&client, &server, &data)
        .read(0, 10)
        .await
        .expect_err("size");
    assert!(err.to_string().contains("9999"), "{err}");
}

#[tokio::test]
async fn server_ignoring_range_is_cut_off() {
    // 64 MiB: far more than socket buffers hold, so bytes_sent shows what we pulled.
    let data = pseudo_random(64 << 20, 5);
    let blob = data.clone();
    let server = FakeServer::start(move |_, _| Reply::with(200, &[], blob.clone())).await;
    let client = client();
    let remote_blob = remote(&client, &server, &data);

    // Near the start: the prefix of the whole-body answer serves the read.
    let got = remote_blob.read(1000, 500).await.expect("prefix");
    assert_eq!(&got[..], &data[1000..1500]);
    // Far in: refused at once instead of downloading up to the offset.
    let err = remote_blob.read(60 << 20, 10).await.expect_err("far");
    assert!(matches!(err, Error::RangeNotSupported { .. }), "{err}");
    assert!(err.to_string().contains("ignores Range"), "{err}");
    // Two requests, and only their prefixes were pulled.
    let sent = server.bytes_sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        sent < 32 << 20,
        "client pulled {sent} bytes of a 64 MiB body"
    );
    assert_eq!(server.count(|r| r.header("range").is_some()), 2);
}

#[tokio::test]
async fn redirects_are_followed_cached_and_refreshed() {
    let data = pseudo_random(50_000, 7);
    let digest = Digest::sha256_of(&data);
    let blob = data.clone();
    let storage_failures = Arc::new(AtomicUsize::new(0));
    let fail_next = storage_failures.clone();
    let registry_path = blob_path(&digest);
    let server = FakeServer::start(move |req: &Request, _| {
        if req.path() == registry_path {
            if req.header("authorization") != Some("Basic dTpw") {
                return Reply::with(401, &[("WWW-Authenticate", "Basic realm=\"r\"")], "");
            }
            return Reply::with(
                307,
                &[("Location", "/storage/blob?X-Signature=secret-sig")],
                "",
            );
        }
        // Storage: no registry credentials may arrive here.
        assert!(
            req.header("authorization").is_none(),
            "credentials leaked to storage"
        );
        if fail_next.load(Ordering::SeqCst) > 0 {
            fail_next.fetch_sub(1, Ordering::SeqCst);
            return Reply::status(403);
        }
        serve_blob(req, &blob)
    })
    .await;
    let creds = StaticCredentials([(server.host.clone(), Credentials::new("u", "p"))].into());
    let client = client().with_credentials(Arc::new(creds));
    let remote_blob = remote(&client, &server, &data);
    let registry_hits = |s: &FakeServer| s.count(|r| r.path().starts_with("/v2/"));

    assert_eq!(
        &remote_blob.read(0, 100).await.expect("first")[..],
        &data[..100]
    );
    // 401, then authorised 307: two registry requests, one storage request.
    assert_eq!(registry_hits(&server), 2);
    assert_eq!(
        &remote_blob.read(1000, 100).await.expect("cached")[..],
        &data[1000..1100]
    );
    assert_eq!(
        registry_hits(&server),
        2,
        "the cached storage URL was not used"
    );
    // The signed URL expires: storage says 403, the client asks the registry again.
    storage_failures.store(1, Ordering::SeqCst);
    assert_eq!(
        &remote_blob.read(2000, 100).await.expect("refreshed")[..],
        &data[2000..2100]
    );
    assert_eq!(registry_hits(&server), 3);
}

#[tokio::test]
async fn redirect_loops_are_bounded() {
    let server = FakeServer::start(|req: &Request, i| {
        Reply::with(307, &[("Location", &format!("{}?hop={i}", req.path()))], "")
    })
    .await;
    let client = client();
    let err = remote(&client, &server, b"x")
        .read(0, 1)
        .await
        .expect_err("loop");
    assert!(
        matches!(err, Error::TooManyRedirects { limit: 5, .. }),
        "{err}"
    );
    assert_names_everything(&err.to_string(), &server, &Digest::sha256_of(b"x"));
    assert_eq!(server.requests().len(), 6);
}

#[tokio::test]
async fn stalled_bodies_time_out() {
    let server = FakeServer::start(|_, _| Reply::Stall {
        status: 206,
        headers: vec![("Content-Range".into(), "bytes 0-999/1000".into())],
        prefix: vec![0; 10],
        declared_len: 1000,
    })
    .await;
    let mut config = config();
    config.http.max_retries = 1;
    let client = Client::new(config).expect("client");
    let start = Instant::now();
    let data = vec![0u8; 1000];
    let err = remote(&client, &server, &data)
        .read(0, 1000)
        .await
        .expect_err("stall");
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(
        err.to_string().contains("2 attempts") && err.is_transient(),
        "{err}"
    );
    assert!(
        matches!(err.root(), Error::Transport { timeout: true, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn blob_size_falls_back_from_head_and_downloads_resume() {
    let data = pseudo_random(300_000, 8);
    let digest = Digest::sha256_of(&data);
    let blob = data.clone();
    let server = FakeServer::start(move |req: &Request, i| match req.method.as_str() {
        "HEAD" => Reply::status(405),
        // The whole-blob download is cut twice; the resumptions must ask for the rest.
        _ if req.header("range") == Some("bytes=0-0") => serve_blob(req, &blob),
        _ if i < 4 => match serve_blob(req, &blob) {
            Reply::Full {
                status,
                headers,
                body,
            } => Reply::Cut {
                status,
                headers,
                send: 100_000,
                body,
            },
            other => other,
        },
        _ => serve_blob(req, &blob),
    })
    .await;
    let client = client();
    let repo = Repository::new(server.host.clone(), REPO);
    assert_eq!(
        client.blob_size(&repo, &digest).await.expect("size"),
        data.len() as u64
    );
    let got = client
        .fetch_blob(&repo, &digest, 1 << 20)
        .await
        .expect("resumed");
    assert_eq!(&got[..], &data[..]);
    let ranges: Vec<Option<String>> = server.requests()[2..]
        .iter()
        .map(|r| r.header("range").map(str::to_string))
        .collect();
    assert_eq!(
        ranges,
        [
            None,
            Some("bytes=100000-".into()),
            Some("bytes=200000-".into())
        ]
    );

    // Corrupt content is caught by the digest.
    let bad = data.clone();
    let server = FakeServer::start(move |req: &Request, _| {
        let mut corrupt = bad.clone();
        corrupt[5] ^= 1;
        serve_blob(req, &corrupt)
    })
    .await;
    let repo = Repository::new(server.host.clone(), REPO);
    let err = client
        .fetch_blob(&repo, &digest, 1 << 20)
        .await
        .expect_err("corrupt");
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
}

#[tokio::test]
async fn manifests_are_checked_against_their_digest() {
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"c","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[]}"#;
    let digest = Digest::sha256_of(manifest);
    let wrong = Digest::sha256_of(b"other");
    let header_digest = wrong.to_string();
    let server = FakeServer::start(move |req: &Request, _| {
        let accept = req.header("accept").unwrap_or("");
        assert!(
            accept.contains("application/vnd.oci.image.index.v1+json")
                && accept.contains("application/vnd.docker.distribution.manifest.v2+json"),
            "{accept}"
        );
        let mut tampered = manifest.to_vec();
        tampered.push(b' ');
        let ct = ("Content-Type", "application/vnd.oci.image.manifest.v1+json");
        if req.path().ends_with("/good") {
            Reply::with(200, &[ct], manifest.to_vec())
        } else if req.path().ends_with("/lying-header") {
            Reply::with(
                200,
                &[ct, ("Docker-Content-Digest", &header_digest)],
                manifest.to_vec(),
            )
        } else {
            Reply::with(200, &[ct], tampered)
        }
    })
    .await;
    let client = client();
    let repo = Repository::new(server.host.clone(), REPO);
    let good = client.fetch_manifest(&repo, "good").await.expect("good");
    assert_eq!(good.digest, digest);
    let err = client
        .fetch_manifest(&repo, "lying-header")
        .await
        .expect_err("lying");
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    let err = client
        .fetch_manifest(&repo, &digest.to_string())
        .await
        .expect_err("tampered");
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert_names_everything(&err.to_string(), &server, &digest);
}

#[tokio::test]
async fn mirrors_are_tried_in_order_then_the_origin() {
    let data = pseudo_random(1000, 9);
    let blob = data.clone();
    let origin = FakeServer::start(move |req, _| serve_blob(req, &blob)).await;
    let broken = FakeServer::start(|_, _| Reply::status(500)).await;
    let missing = FakeServer::start(|_, _| Reply::status(404)).await;
    let blob = data.clone();
    let good = FakeServer::start(move |req, _| serve_blob(req, &blob)).await;
    let mk = |mirrors: &[&FakeServer]| {
        let mut toml_text = String::new();
        for m in mirrors {
            toml_text.push_str(&format!(
                "[[resolver.host.\"{}\".mirrors]]\nhost = \"{}\"\nheader = {{ \"X-Mirror\" = \"yes\" }}\n",
                origin.host, m.host
            ));
        }
        let mut c: RegistryConfig = toml::from_str(&toml_text).expect("toml");
        c.http = config().http;
        Client::new(c).expect("client")
    };
    // Failing mirrors are skipped (once each, no retries), the origin answers.
    let client = mk(&[&broken, &missing]);
    let got = remote(&client, &origin, &data)
        .read(0, 1000)
        .await
        .expect("origin");
    assert_eq!(&got[..], &data[..]);
    assert_eq!(
        (
            broken.requests().len(),
            missing.requests().len(),
            origin.requests().len()
        ),
        (1, 1, 1)
    );
    assert_eq!(broken.requests()[0].header("x-mirror"), Some("yes"));
    assert_eq!(origin.requests()[0].header("x-mirror"), None);
    // A working mirror serves; the origin is not asked.
    let client = mk(&[&good]);
    let got = remote(&client, &origin, &data)
        .read(10, 10)
        .await
        .expect("mirror");
    assert_eq!(&got[..], &data[10..20]);
    assert_eq!(good.requests().len(), 1);
    assert_eq!(origin.requests().len(), 1);
    // Pushes never go to mirrors.
    let repo = Repository::new(origin.host.clone(), REPO);
    let _ = client.blob_exists(&repo, &Digest::sha256_of(&data)).await;
    assert_eq!(good.requests().len(), 1);
}
