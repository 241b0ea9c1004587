//! Converted images against real peers (root only): a registry, containerd 1.6 with
//! its plain overlayfs snapshotter, and stargz-snapshotter's `ctr-remote`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use common::*;
use converter::oci::{Descriptor, Manifest, Object, parse_object};
use converter::{
    ConvertOptions, LayerAction, Location, OutputFormat, Progress, WriterOptions, convert_image,
};
use testkit::containerd::Containerd;
use testkit::ctr_remote::{content_get, ctr_remote, image_digest};
use testkit::registry::Registry;

fn opts(format: OutputFormat) -> ConvertOptions {
    ConvertOptions {
        writer: WriterOptions {
            format,
            chunk_size: 64 << 10,
            ..WriterOptions::default()
        },
        ..ConvertOptions::default()
    }
}

async fn convert(src: &str, dst: &str, format: OutputFormat) -> converter::Summary {
    let (s, d): (Location, Location) = (src.parse().unwrap(), dst.parse().unwrap());
    let start = Instant::now();
    let summary = convert_image(&s, &d, &opts(format), &Progress::lines())
        .await
        .unwrap();
    eprintln!("{src} -> {dst} ({format:?}): {:?}", start.elapsed());
    summary
}

/// The image manifest `reference` names in containerd's content store (the first
/// manifest when it names an index).
fn manifest_in_containerd(c: &Containerd, reference: &str) -> Manifest {
    let digest = image_digest(c, reference).unwrap();
    let bytes = content_get(c, &digest).unwrap();
    let d = converter::oci::parse_digest(&digest).unwrap();
    match parse_object(&bytes, "", &d).unwrap() {
        Object::Manifest(m) => *m,
        Object::Index(i) => {
            let child: &Descriptor = &i.manifests[0];
            let bytes = content_get(c, &child.digest.to_string()).unwrap();
            match parse_object(&bytes, &child.media_type, &child.digest).unwrap() {
                Object::Manifest(m) => *m,
                Object::Index(_) => panic!("nested index"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn converted_images_run_on_plain_containerd() {
    if testkit::skip_unless_root("converted_images_run_on_plain_containerd") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(&tmp.path().join("registry")).unwrap();
    let host = &registry.host;
    let image = test_image();
    let layout = tmp.path().join("layout");
    image.write_oci_layout(&layout, Some("v1")).unwrap();
    let original = registry.push("orig/app", "v1", &image).unwrap();

    // OCI layout → registry, and registry → registry (mounting nothing: all blobs new).
    let esgz = format!("{host}/conv/app:esgz");
    let zc = format!("{host}/conv/app:zc");
    let szc = format!("{host}/conv/app:szc");
    let s = convert(
        &format!("oci:{}:v1", layout.display()),
        &esgz,
        OutputFormat::Estargz,
    )
    .await;
    assert!(s.layers.iter().all(|l| l.action == LayerAction::Converted));
    convert(&original, &zc, OutputFormat::ZstdChunked).await;
    convert(&original, &szc, OutputFormat::StargzZstdChunked).await;
    // Registry → registry of an image already converted: kept, same digest.
    let again = convert(
        &esgz,
        &format!("{host}/conv/again:1"),
        OutputFormat::Estargz,
    )
    .await;
    assert!(again.layers.iter().all(|l| l.action == LayerAction::Kept));
    assert_eq!(again.root.digest, s.root.digest);

    let containerd = Containerd::start().unwrap();
    for (n, reference) in [&esgz, &zc, &szc].into_iter().enumerate() {
        containerd
            .ctr(["image", "pull", "--plain-http", reference.as_str()])
            .unwrap();
        let out = containerd
            .ctr(["run", "--rm", reference.as_str(), &format!("c{n}")])
            .unwrap();
        assert_eq!(out.trim(), GREETING, "{reference}");
        // Whiteouts, the opaque dir and hardlinks still mean what they meant.
        let out = containerd
            .ctr([
                "run",
                "--rm",
                reference.as_str(),
                &format!("w{n}"),
                "/bin/sh",
                "-c",
                "test ! -e /bin/vi && test ! -e /data/cache/old && cat /data/cache/new /data/new.again && stat -c %h /data/cache/new",
            ])
            .unwrap();
        // Both names of the hardlinked file (no newline in the content), link count 2.
        assert_eq!(out.trim(), "freshfresh2", "{reference}");
    }

    // ctr-remote computes the same TOC digests for our layers as our annotations say.
    for (reference, flag) in [(&esgz, None), (&szc, Some("--zstdchunked"))] {
        let m = manifest_in_containerd(&containerd, reference);
        for l in &m.layers {
            let mut args = vec!["image", "get-toc-digest"];
            args.extend(flag);
            let digest = l.digest.to_string();
            args.push(&digest);
            let got = ctr_remote(&containerd, &args).unwrap();
            assert_eq!(
                got.trim(),
                l.annotation(estargz::TOC_DIGEST_ANNOTATION).unwrap(),
                "{reference} layer {}",
                l.digest
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ctr_remote_layers_read_back_with_our_reader() {
    if testkit::skip_unless_root("ctr_remote_layers_read_back_with_our_reader") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(&tmp.path().join("registry")).unwrap();
    let host = registry.host.clone();
    let image = test_image();
    let original = registry.push("orig/app", "v1", &image).unwrap();
    let tars: Vec<Vec<u8>> = image
        .layers
        .iter()
        .map(|l| gunzip_or_unzstd(&l.blob.data))
        .collect();

    let containerd = Containerd::start().unwrap();
    containerd
        .ctr(["image", "pull", "--plain-http", original.as_str()])
        .unwrap();
    for (flag, name) in [("--estargz", "peer-esgz"), ("--zstdchunked", "peer-zstd")] {
        let dst = format!("{host}/peer/app:{name}");
        let start = Instant::now();
        ctr_remote(
            &containerd,
            [
                "image",
                "convert",
                "--oci",
                flag,
                original.as_str(),
                dst.as_str(),
            ],
        )
        .unwrap();
        eprintln!("ctr-remote {flag}: {:?}", start.elapsed());
        let m = manifest_in_containerd(&containerd, &dst);
        assert_eq!(m.layers.len(), tars.len());
        for (l, tar) in m.layers.iter().zip(&tars) {
            let blob = content_get(&containerd, &l.digest.to_string()).unwrap();
            assert_eq!(converter::oci::Digest::sha256_of(&blob), l.digest);
            let toc = l.annotation(estargz::TOC_DIGEST_ANNOTATION);
            assert!(
                toc.is_some(),
                "ctr-remote sets the TOC digest on {}",
                l.digest
            );
            let layer = open_layer(blob, toc).await;
            if flag == "--zstdchunked" {
                assert_eq!(
                    l.annotation(estargz::LEGACY_MANIFEST_CHECKSUM_ANNOTATION),
                    Some(layer.manifest_checksum().to_string().as_str())
                );
            }
            assert_layer_matches_tar(&layer, tar).await;
        }

        // Our converter sees ctr-remote's layers as already converted.
        containerd.push_plain_http(&dst).unwrap();
        let format = if flag == "--estargz" {
            OutputFormat::Estargz
        } else {
            OutputFormat::StargzZstdChunked
        };
        let ours = convert(&dst, &format!("{host}/peer/ours:{name}"), format).await;
        assert!(
            ours.layers
                .iter()
                .all(|l| l.action != LayerAction::Converted),
            "{:?}",
            ours.layers
        );
    }
}
