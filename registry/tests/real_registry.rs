//! Against Debian's docker-registry (distribution v2), plain HTTP on 127.0.0.1.

use std::sync::Arc;

use bytes::Bytes;
use estargz::{BlobErrorKind, BlobReader, VecBlob};
use registry::{
    Client, DOCKER_MANIFEST_LIST, Descriptor, Digest, Error, ImageIndex, ImageManifest, OCI_INDEX,
    OCI_MANIFEST, Platform, PushOutcome, Reference, RegistryConfig, RemoteBlob, Repository,
};
use testkit::image::noise;
use testkit::registry::Registry;

fn descriptor(media_type: &str, data: &[u8], platform: Option<&str>) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: Digest::sha256_of(data),
        size: data.len() as u64,
        annotations: None,
        platform: platform.map(|p| Platform::parse(p).expect("platform")),
        other: Default::default(),
    }
}

/// Pushes a one-layer image; returns the manifest bytes.
async fn push_image(client: &Client, repo: &Repository, layer: &[u8], tag: &str) -> Bytes {
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","layer":{}}}"#,
        layer.len()
    );
    for (data, from) in [(config.as_bytes(), None), (layer, None)] {
        client
            .push_blob(
                repo,
                &Digest::sha256_of(data),
                Bytes::copy_from_slice(data),
                from,
            )
            .await
            .expect("push blob");
    }
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        other: Default::default(),
        config: descriptor(
            "application/vnd.oci.image.config.v1+json",
            config.as_bytes(),
            None,
        ),
        layers: vec![descriptor(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            layer,
            None,
        )],
        annotations: None,
    };
    let bytes = Bytes::from(serde_json::to_vec(&manifest).expect("json"));
    let digest = client
        .push_manifest(repo, tag, OCI_MANIFEST, bytes.clone())
        .await
        .expect("push manifest");
    assert_eq!(digest, Digest::sha256_of(&bytes));
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_pull_and_range_reads_against_docker_registry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Registry::start(dir.path()).expect("start docker-registry");
    let client = Client::new(RegistryConfig::default()).expect("client");
    let repo = Repository::new(reg.host.clone(), "lazysnap/app");

    let layer = noise(3 << 20, 7);
    let manifest_bytes = push_image(&client, &repo, &layer, "v1").await;
    let layer_digest = Digest::sha256_of(&layer);

    // Pushing again finds the blob already there.
    let again = client
        .push_blob(&repo, &layer_digest, Bytes::from(layer.clone()), None)
        .await
        .expect("re-push");
    assert_eq!(again, PushOutcome::Exists);

    // Resolve by tag, by digest and through references as users write them.
    let reference: Reference = format!("{}/lazysnap/app:v1", reg.host)
        .parse()
        .expect("ref");
    let resolved = client.resolve(&reference).await.expect("resolve");
    assert_eq!(resolved.bytes, manifest_bytes);
    assert_eq!(resolved.manifest.layers[0].digest, layer_digest);
    assert!(resolved.index.is_none());
    let by_digest: Reference = format!("{}/lazysnap/app@{}", reg.host, resolved.digest)
        .parse()
        .expect("ref");
    assert_eq!(
        client.resolve(&by_digest).await.expect("by digest").bytes,
        manifest_bytes
    );

    // Size, whole-blob fetch (digest-checked), ranges.
    assert_eq!(
        client.blob_size(&repo, &layer_digest).await.expect("size"),
        layer.len() as u64
    );
    let whole = client
        .fetch_blob(&repo, &layer_digest, 8 << 20)
        .await
        .expect("fetch");
    assert_eq!(&whole[..], &layer[..]);
    let too_small = client.fetch_blob(&repo, &layer_digest, 1 << 20).await;
    assert!(too_small.is_err());

    let blob = RemoteBlob::open(client.clone(), repo.clone(), layer_digest.clone())
        .await
        .expect("open");
    assert_eq!(blob.size(), layer.len() as u64);
    let reader: Arc<dyn BlobReader> = Arc::new(blob);
    assert_eq!(reader.size().await.expect("size"), layer.len() as u64);
    let got = reader.read_at(1_000_000, 4096).await.expect("read");
    assert_eq!(&got[..], &layer[1_000_000..1_004_096]);
    let tail = reader
        .read_at(layer.len() as u64 - 10, 100)
        .await
        .expect("tail");
    assert_eq!(&tail[..], &layer[layer.len() - 10..]);
    assert!(
        reader
            .read_at(layer.len() as u64, 5)
            .await
            .expect("end")
            .is_empty()
    );
    let err = reader
        .read_at(layer.len() as u64 + 1, 5)
        .await
        .expect_err("past end");
    assert_eq!(err.kind, BlobErrorKind::OutOfRange);

    // Chunked upload and cross-repository mount.
    let other = noise(300_000, 99);
    let other_digest = Digest::sha256_of(&other);
    let outcome = client
        .push_blob_chunked(
            &repo,
            &other_digest,
            &VecBlob::new(other.clone()),
            64 * 1024,
        )
        .await
        .expect("chunked");
    assert_eq!(outcome, PushOutcome::Uploaded);
    assert_eq!(
        client
            .fetch_blob(&repo, &other_digest, 1 << 20)
            .await
            .expect("fetch chunked"),
        Bytes::from(other.clone())
    );
    let wrong = client
        .push_blob_chunked(
            &Repository::new(reg.host.clone(), "lazysnap/wrong"),
            &Digest::sha256_of(b"not this"),
            &VecBlob::new(other.clone()),
            64 * 1024,
        )
        .await
        .expect_err("digest mismatch");
    assert!(
        matches!(wrong.root(), Error::DigestMismatch { .. }),
        "{wrong}"
    );

    let dest = Repository::new(reg.host.clone(), "lazysnap/copy");
    let mounted = client
        .push_blob(
            &dest,
            &other_digest,
            Bytes::from(other.clone()),
            Some(&repo),
        )
        .await
        .expect("mount");
    assert_eq!(mounted, PushOutcome::Mounted);
    assert_eq!(
        client
            .blob_exists(&dest, &other_digest)
            .await
            .expect("head"),
        Some(other.len() as u64)
    );
    // A mount that cannot happen (the source lacks the blob) falls back to an upload.
    let fresh = noise(1000, 5);
    let fresh_digest = Digest::sha256_of(&fresh);
    let uploaded = client
        .push_blob(
            &dest,
            &fresh_digest,
            Bytes::from(fresh.clone()),
            Some(&Repository::new(reg.host.clone(), "lazysnap/empty")),
        )
        .await
        .expect("mount fallback");
    assert_eq!(uploaded, PushOutcome::Uploaded);

    // Missing things fail with errors that name host, repository and digest.
    let missing = Digest::sha256_of(b"missing");
    let err = client
        .blob_size(&repo, &missing)
        .await
        .expect_err("missing");
    let text = err.to_string();
    assert!(matches!(err, Error::NotFound { .. }), "{text}");
    assert!(
        text.contains(&reg.host)
            && text.contains("lazysnap/app")
            && text.contains(&missing.to_string()),
        "{text}"
    );
    let err = client
        .resolve(
            &format!("{}/lazysnap/app:nope", reg.host)
                .parse()
                .expect("ref"),
        )
        .await
        .expect_err("missing tag");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_pick_the_platform() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = Registry::start(dir.path()).expect("start docker-registry");
    let repo = Repository::new(reg.host.clone(), "multi/arch");
    let client = Client::new(RegistryConfig::default()).expect("client");
    let amd = push_image(&client, &repo, b"amd64 layer", "amd64").await;
    let arm = push_image(&client, &repo, b"arm64 layer", "arm64").await;
    for (media_type, tag) in [(OCI_INDEX, "oci"), (DOCKER_MANIFEST_LIST, "docker")] {
        let index = ImageIndex {
            schema_version: 2,
            media_type: Some(media_type.into()),
            other: Default::default(),
            manifests: vec![
                descriptor(OCI_MANIFEST, &arm, Some("linux/arm64/v8")),
                descriptor(OCI_MANIFEST, &amd, Some("linux/amd64")),
            ],
            annotations: None,
        };
        let bytes = Bytes::from(serde_json::to_vec(&index).expect("json"));
        client
            .push_manifest(&repo, tag, media_type, bytes)
            .await
            .expect("push index");
        let reference: Reference = format!("{}/multi/arch:{tag}", reg.host)
            .parse()
            .expect("ref");
        let amd_image = client
            .resolve_for(&reference, &Platform::parse("linux/amd64").expect("p"))
            .await
            .expect("amd64");
        assert_eq!(amd_image.bytes, amd);
        assert!(amd_image.index.is_some());
        let arm_image = client
            .resolve_for(&reference, &Platform::parse("linux/arm64").expect("p"))
            .await
            .expect("arm64");
        assert_eq!(arm_image.bytes, arm);
        let err = client
            .resolve_for(&reference, &Platform::parse("linux/s390x").expect("p"))
            .await
            .expect_err("no s390x");
        let text = err.to_string();
        assert!(
            text.contains("linux/s390x") && text.contains("linux/amd64"),
            "{text}"
        );
    }
}
