//! Pushing built images to a real docker-registry with curl (no root needed).

use std::process::Command;

use testkit::image::{Entry, ImageBuilder, Layer, MEDIA_TYPE_LAYER_GZIP, gzip, tar_bytes};
use testkit::registry::{Registry, push_manifest};

fn curl_get(url: &str, accept: &str) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("curl")
        .args([
            "--silent",
            "--fail",
            "-H",
            &format!("Accept: {accept}"),
            url,
        ])
        .output()?;
    anyhow::ensure!(out.status.success(), "GET {url}: {}", out.status);
    Ok(out.stdout)
}

#[test]
fn pushed_image_reads_back_byte_for_byte() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let registry = Registry::start(dir.path())?;
    // A caller-compressed layer (as eStargz tests will push) next to a built one.
    let tar = tar_bytes(&[Entry::file("pre", "compressed by the caller")])?;
    let diff_id = testkit::image::sha256_digest(&tar);
    let pre = Layer::precompressed(gzip(&tar)?, MEDIA_TYPE_LAYER_GZIP, &diff_id)
        .with_annotation("containerd.io/snapshot/stargz/toc.digest", "sha256:1234");
    let image = ImageBuilder::new()
        .entries(&[Entry::file("a", "a")])?
        .layer(pre)
        .build()?;

    let reference = registry.push("test/read-back", "v1", &image)?;
    assert_eq!(reference, format!("{}/test/read-back:v1", registry.host));
    // Pushing again skips the blobs the registry has and still succeeds.
    registry.push("test/read-back", "v2", &image)?;

    let base = format!("http://{}/v2/test/read-back", registry.host);
    let manifest = curl_get(&format!("{base}/manifests/v1"), &image.manifest.media_type)?;
    assert_eq!(manifest, image.manifest.data);
    for blob in image.blobs() {
        let data = curl_get(&format!("{base}/blobs/{}", blob.digest), "*/*")?;
        assert_eq!(data, blob.data, "blob {}", blob.digest);
    }
    Ok(())
}

#[test]
fn manifest_with_missing_blobs_is_a_clear_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let registry = Registry::start(dir.path())?;
    let image = ImageBuilder::new()
        .entries(&[Entry::file("a", "a")])?
        .build()?;
    let err = push_manifest(&registry.host, "test/missing", "v1", &image.manifest)
        .expect_err("the registry has none of the blobs");
    let message = format!("{err:#}");
    assert!(message.contains("test/missing:v1"), "{message}");
    assert!(message.contains("HTTP 400"), "{message}");
    assert!(message.contains("BLOB_UNKNOWN"), "{message}");
    Ok(())
}
