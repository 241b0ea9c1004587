//! OCI layout → OCI layout conversions, checked against the original layers with our
//! reader, GNU tar, the Rust tar crate and the zstd tool. No root needed.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::*;
use converter::oci::{Descriptor, Digest, Index, Manifest, OCI_INDEX, Object, parse_object};
use converter::{
    ConvertOptions, Error, LayerAction, Layout, Location, OutputFormat, Progress, Summary,
    WriterOptions, convert_image,
};
use testkit::image::{Image, ImageBuilder, Layer as TkLayer, MEDIA_TYPE_LAYER_GZIP, gzip};

fn opts(format: OutputFormat) -> ConvertOptions {
    ConvertOptions {
        writer: WriterOptions {
            format,
            // Small chunks so that big.bin spans several.
            chunk_size: 64 << 10,
            ..WriterOptions::default()
        },
        ..ConvertOptions::default()
    }
}

fn loc(dir: &Path, tag: &str) -> Location {
    format!("oci:{}:{tag}", dir.display()).parse().unwrap()
}

async fn convert(src: &Location, dst: &Location, o: &ConvertOptions) -> converter::Result<Summary> {
    convert_image(src, dst, o, &Progress::quiet()).await
}

/// The manifest and config a layout's tag names.
fn read_image(dir: &Path, tag: &str) -> (Descriptor, Manifest, serde_json::Value) {
    let layout = Layout::open(dir).unwrap();
    let desc = layout.resolve(Some(tag)).unwrap();
    let bytes = layout.read_blob(&desc, "manifest", 1 << 22).unwrap();
    let Object::Manifest(m) = parse_object(&bytes, &desc.media_type, &desc.digest).unwrap() else {
        panic!("{tag} is not a manifest")
    };
    let config = layout.read_blob(&m.config, "config", 1 << 22).unwrap();
    (desc, *m, serde_json::from_slice(&config).unwrap())
}

fn blob(dir: &Path, d: &Digest) -> Vec<u8> {
    std::fs::read(dir.join("blobs/sha256").join(d.hex())).unwrap()
}

fn original_tars(image: &Image) -> Vec<Vec<u8>> {
    image
        .layers
        .iter()
        .map(|l| gunzip_or_unzstd(&l.blob.data))
        .collect()
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Checks every layer of a converted image against the original tars.
async fn check_converted(dir: &Path, tag: &str, image: &Image, format: OutputFormat) {
    let (_, m, config) = read_image(dir, tag);
    let tars = original_tars(image);
    assert_eq!(m.layers.len(), tars.len());
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    for (i, (l, tar)) in m.layers.iter().zip(&tars).enumerate() {
        let data = blob(dir, &l.digest);
        assert_eq!(data.len() as u64, l.size);
        assert_eq!(Digest::sha256_of(&data), l.digest);
        let plain = gunzip_or_unzstd(&data);
        assert_eq!(
            diff_ids[i].as_str().unwrap(),
            Digest::sha256_of(&plain).to_string()
        );
        let ann = l.annotations.clone().unwrap_or_default();
        let toc = match format {
            OutputFormat::Estargz => {
                assert_eq!(l.media_type, MEDIA_TYPE_LAYER_GZIP);
                assert!(data.starts_with(&[0x1f, 0x8b]));
                assert_eq!(
                    ann[estargz::UNCOMPRESSED_SIZE_ANNOTATION],
                    plain.len().to_string()
                );
                Some(ann[estargz::TOC_DIGEST_ANNOTATION].clone())
            }
            OutputFormat::ZstdChunked => {
                assert_eq!(l.media_type, converter::oci::LAYER_ZSTD);
                assert!(ann.contains_key(estargz::MANIFEST_POSITION_ANNOTATION));
                assert!(ann.contains_key(estargz::TARSPLIT_POSITION_ANNOTATION));
                // c/storage's form keeps the tar byte for byte: same DiffID.
                assert_eq!(&plain, tar);
                None
            }
            OutputFormat::StargzZstdChunked => {
                assert_eq!(l.media_type, converter::oci::LAYER_ZSTD);
                assert!(ann.contains_key(estargz::LEGACY_MANIFEST_POSITION_ANNOTATION));
                Some(ann[estargz::TOC_DIGEST_ANNOTATION].clone())
            }
        };
        let layer = open_layer(data.clone(), toc.as_deref()).await;
        if format == OutputFormat::ZstdChunked {
            let checksum = &ann[estargz::MANIFEST_CHECKSUM_ANNOTATION];
            assert_eq!(&layer.manifest_checksum().to_string(), checksum);
        }
        assert_layer_matches_tar(&layer, tar).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn estargz_layers_read_back_equal_and_extract_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    let image = test_image();
    image.write_oci_layout(&src, Some("v1")).unwrap();
    let start = Instant::now();
    let summary = convert(
        &loc(&src, "v1"),
        &loc(&dst, "esgz"),
        &opts(OutputFormat::Estargz),
    )
    .await
    .unwrap();
    let total: u64 = image.layers.iter().map(|l| l.blob.data.len() as u64).sum();
    eprintln!(
        "eStargz conversion of {} layers ({} bytes compressed): {:?}",
        image.layers.len(),
        total,
        start.elapsed()
    );
    assert_eq!(summary.layers.len(), 3);
    assert!(
        summary
            .layers
            .iter()
            .all(|l| l.action == LayerAction::Converted)
    );
    check_converted(&dst, "esgz", &image, OutputFormat::Estargz).await;

    // Non-layer content is kept: manifest annotations, config fields.
    let (desc, m, config) = read_image(&dst, "esgz");
    assert_eq!(desc.digest, summary.root.digest);
    assert_eq!(
        m.annotations.as_ref().unwrap()["org.example.annotation"],
        "kept too"
    );
    assert_eq!(config["config"]["Labels"]["org.example.label"], "kept");
    assert_eq!(config["config"]["Cmd"][1], "/etc/app/greeting");
    assert_eq!(config["history"].as_array().unwrap().len(), 3);

    let work = tmp.path().join("x");
    for (i, (l, tar)) in m.layers.iter().zip(original_tars(&image)).enumerate() {
        let blob_path = dst.join("blobs/sha256").join(l.digest.hex());
        // The TOC digest, computed independently: GNU tar pulls stargz.index.json out.
        let toc_json = run(Command::new("tar")
            .arg("-xzOf")
            .arg(&blob_path)
            .arg("stargz.index.json"));
        assert_eq!(
            &Digest::sha256_of(&toc_json).to_string(),
            l.annotation(estargz::TOC_DIGEST_ANNOTATION).unwrap()
        );
        // GNU tar and the tar crate extract our blob to the original tree.
        let (orig, gnu, rust) = (
            work.join(format!("o{i}")),
            work.join(format!("g{i}")),
            work.join(format!("r{i}")),
        );
        for d in [&orig, &gnu, &rust] {
            std::fs::create_dir_all(d).unwrap();
        }
        let orig_tar = work.join(format!("o{i}.tar"));
        std::fs::write(&orig_tar, &tar).unwrap();
        run(Command::new("tar")
            .arg("-xpf")
            .arg(&orig_tar)
            .arg("-C")
            .arg(&orig));
        run(Command::new("tar")
            .arg("-xzpf")
            .arg(&blob_path)
            .arg("-C")
            .arg(&gnu));
        let data = std::fs::read(&blob_path).unwrap();
        let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(&data[..]));
        archive.set_preserve_permissions(true);
        archive.unpack(&rust).unwrap();
        let want = tree_of_dir(&orig);
        assert!(!want.is_empty());
        assert_eq!(tree_of_dir(&gnu), want, "GNU tar extraction of layer {i}");
        assert_eq!(
            tree_of_dir(&rust),
            want,
            "tar crate extraction of layer {i}"
        );
    }
    // Nothing half-written left in the blobs directory.
    let tmp_files = std::fs::read_dir(dst.join("blobs/sha256"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".tmp")
        })
        .count();
    assert_eq!(tmp_files, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn zstd_chunked_layers_read_back_equal_and_list_with_zstd_tool() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let image = test_image();
    image.write_oci_layout(&src, Some("v1")).unwrap();
    for (format, tag) in [
        (OutputFormat::ZstdChunked, "zc"),
        (OutputFormat::StargzZstdChunked, "szc"),
    ] {
        let dst = tmp.path().join(tag);
        let start = Instant::now();
        convert(&loc(&src, "v1"), &loc(&dst, tag), &opts(format))
            .await
            .unwrap();
        eprintln!("{format:?} conversion: {:?}", start.elapsed());
        check_converted(&dst, tag, &image, format).await;
        let (_, m, _) = read_image(&dst, tag);
        for (l, tar) in m.layers.iter().zip(original_tars(&image)) {
            let blob_path = dst.join("blobs/sha256").join(l.digest.hex());
            // `zstd -d | tar -t` lists every entry of the original.
            let plain = run(Command::new("zstd").arg("-dc").arg(&blob_path));
            let listed = run(Command::new("tar").arg("-t").stdin_file(&plain, tmp.path()));
            let listed: Vec<String> = String::from_utf8(listed)
                .unwrap()
                .lines()
                .map(|n| n.trim_end_matches('/').to_string())
                .filter(|n| !is_stargz_meta(n))
                .collect();
            let want: Vec<String> = tree_of_tar(&tar).into_keys().collect();
            let mut sorted = listed.clone();
            sorted.sort();
            assert_eq!(sorted, want);
        }
    }
}

/// `Command::stdin` from bytes, through a file (keeps the test free of pipe threads).
trait StdinFile {
    fn stdin_file(&mut self, data: &[u8], dir: &Path) -> &mut Self;
}

impl StdinFile for Command {
    fn stdin_file(&mut self, data: &[u8], dir: &Path) -> &mut Self {
        let path = dir.join(format!("stdin-{}", Digest::sha256_of(data).hex()));
        std::fs::write(&path, data).unwrap();
        self.stdin(std::fs::File::open(&path).unwrap())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn layers_already_in_the_format_are_kept_or_annotated() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    let image = test_image();
    image.write_oci_layout(&src, Some("v1")).unwrap();
    let first = convert(
        &loc(&src, "v1"),
        &loc(&dst, "esgz"),
        &opts(OutputFormat::Estargz),
    )
    .await
    .unwrap();
    // Converting the result again changes nothing.
    let again = convert(
        &loc(&dst, "esgz"),
        &loc(&dst, "again"),
        &opts(OutputFormat::Estargz),
    )
    .await
    .unwrap();
    assert!(again.layers.iter().all(|l| l.action == LayerAction::Kept));
    assert_eq!(again.root.digest, first.root.digest);

    // Without annotations, the footer tells: annotations come back, blobs stay.
    let (_, m, config) = read_image(&dst, "esgz");
    let mut b = ImageBuilder::new();
    for (l, d) in m
        .layers
        .iter()
        .zip(config["rootfs"]["diff_ids"].as_array().unwrap())
    {
        b = b.layer(TkLayer::precompressed(
            blob(&dst, &l.digest),
            MEDIA_TYPE_LAYER_GZIP,
            d.as_str().unwrap(),
        ));
    }
    let bare = tmp.path().join("bare");
    b.build()
        .unwrap()
        .write_oci_layout(&bare, Some("v1"))
        .unwrap();
    let annotated = convert(
        &loc(&bare, "v1"),
        &loc(&dst, "annotated"),
        &opts(OutputFormat::Estargz),
    )
    .await
    .unwrap();
    assert!(
        annotated
            .layers
            .iter()
            .all(|l| l.action == LayerAction::Annotated)
    );
    let (_, m2, _) = read_image(&dst, "annotated");
    for (a, b) in m.layers.iter().zip(&m2.layers) {
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.annotations, b.annotations);
    }

    // zstd:chunked from eStargz converts (the format differs).
    let z = convert(
        &loc(&dst, "esgz"),
        &loc(&dst, "zc"),
        &opts(OutputFormat::ZstdChunked),
    )
    .await
    .unwrap();
    assert!(z.layers.iter().all(|l| l.action == LayerAction::Converted));
    let z2 = convert(
        &loc(&dst, "zc"),
        &loc(&dst, "zc2"),
        &opts(OutputFormat::ZstdChunked),
    )
    .await
    .unwrap();
    assert!(z2.layers.iter().all(|l| l.action == LayerAction::Kept));
}

/// Writes two single-platform images and an index over them into one layout.
fn multi_platform_layout(dir: &Path) -> (Image, Image) {
    let amd = test_image();
    let arm = ImageBuilder::new()
        .architecture("arm64")
        .layer(amd.layers[0].clone())
        .entries(&[testkit::image::Entry::file("arch", "arm64")])
        .unwrap()
        .build()
        .unwrap();
    amd.write_oci_layout(dir, None).unwrap();
    arm.write_oci_layout(dir, None).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [amd.manifest_descriptor(), arm.manifest_descriptor()],
        "annotations": {"org.example.index": "kept"},
    });
    let layout = Layout::create(dir).unwrap();
    let bytes = serde_json::to_vec(&index).unwrap();
    let d = layout.write_blob(&bytes).unwrap();
    // Replace what write_oci_layout listed with the index alone.
    std::fs::remove_file(dir.join("index.json")).unwrap();
    layout
        .set_ref(
            Descriptor::new(OCI_INDEX, d, bytes.len() as u64),
            Some("multi"),
        )
        .unwrap();
    (amd, arm)
}

#[tokio::test(flavor = "multi_thread")]
async fn indexes_convert_all_or_chosen_platforms() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    let (_amd, arm) = multi_platform_layout(&src);
    let mut o = opts(OutputFormat::Estargz);
    o.all_platforms = true;
    let all = convert(&loc(&src, "multi"), &loc(&dst, "all"), &o)
        .await
        .unwrap();
    assert_eq!(all.root.media_type, OCI_INDEX);
    assert_eq!(all.manifests, 2);
    // busybox is shared: converted once. 3 + 1 distinct layers.
    assert_eq!(all.layers.len(), 4);
    let layout = Layout::open(&dst).unwrap();
    let desc = layout.resolve(Some("all")).unwrap();
    let index: Index =
        serde_json::from_slice(&layout.read_blob(&desc, "index", 1 << 20).unwrap()).unwrap();
    assert_eq!(
        index.annotations.as_ref().unwrap()["org.example.index"],
        "kept"
    );
    let archs: Vec<&str> = index
        .manifests
        .iter()
        .map(|d| d.platform.as_ref().unwrap().architecture.as_str())
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    for d in &index.manifests {
        let bytes = layout.read_blob(d, "manifest", 1 << 20).unwrap();
        let Object::Manifest(m) = parse_object(&bytes, &d.media_type, &d.digest).unwrap() else {
            panic!()
        };
        for l in &m.layers {
            assert!(l.annotation(estargz::TOC_DIGEST_ANNOTATION).is_some());
            assert!(layout.has_blob(&l.digest));
        }
    }

    // One platform: a manifest.
    let mut o = opts(OutputFormat::Estargz);
    o.platforms = vec![converter::oci::Platform::parse("linux/arm64").unwrap()];
    convert(&loc(&src, "multi"), &loc(&dst, "arm"), &o)
        .await
        .unwrap();
    let (_, m, config) = read_image(&dst, "arm");
    assert_eq!(m.layers.len(), arm.layers.len());
    assert_eq!(config["architecture"], "arm64");

    // A platform the index lacks: a clear error.
    o.platforms = vec![converter::oci::Platform::parse("linux/s390x").unwrap()];
    let err = convert(&loc(&src, "multi"), &loc(&dst, "none"), &o)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NoMatchingPlatform { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("linux/amd64") && msg.contains("linux/arm64"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prioritized_files_go_first_in_their_own_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    let image = test_image();
    image.write_oci_layout(&src, Some("v1")).unwrap();
    let list = tmp.path().join("prio.txt");
    std::fs::write(&list, "# startup\n/bin/busybox\n\netc/app/greeting\n").unwrap();
    let mut o = opts(OutputFormat::Estargz);
    o.writer.prioritized_files = converter::cli::read_prioritized(&list).unwrap().files;
    assert_eq!(
        o.writer.prioritized_files,
        ["/bin/busybox", "etc/app/greeting"]
    );
    convert(&loc(&src, "v1"), &loc(&dst, "p"), &o)
        .await
        .unwrap();
    let (_, m, _) = read_image(&dst, "p");
    let mut landmarks = Vec::new();
    for (l, want_first) in
        m.layers
            .iter()
            .zip([Some("bin/busybox"), Some("etc/app/greeting"), None])
    {
        let layer = open_layer(blob(&dst, &l.digest), None).await;
        let idx = layer.index();
        match want_first {
            Some(path) => {
                let landmark = idx.prefetch_landmark().expect("a prefetch landmark");
                let file = idx.lookup(path).unwrap();
                let range = idx.prefetch_range().unwrap();
                let off = idx.entry(file).chunks()[0].comp_offset;
                assert!(range.contains(&off), "{path} inside the prefetch range");
                landmarks.push(landmark);
            }
            None => assert!(idx.has_no_prefetch_landmark()),
        }
    }
    assert_eq!(landmarks.len(), 2);
    check_converted(&dst, "p", &image, OutputFormat::Estargz).await;
}

// ---- bad input: clear errors naming the layer, and no destination reference ----

/// Converts `image` from a fresh layout and returns the error; asserts that the
/// destination has no index.json entry and no temp files.
async fn convert_fails(image: &Image, damage: impl FnOnce(&Path)) -> Error {
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    image.write_oci_layout(&src, Some("v1")).unwrap();
    damage(&src);
    let err = convert(
        &loc(&src, "v1"),
        &loc(&dst, "out"),
        &opts(OutputFormat::Estargz),
    )
    .await
    .unwrap_err();
    assert!(
        !dst.join("index.json").exists(),
        "a failed conversion wrote index.json"
    );
    if let Ok(rd) = std::fs::read_dir(dst.join("blobs/sha256")) {
        for e in rd {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with(".tmp"), "temp file {name} left behind");
        }
    }
    err
}

fn image_with_layer(data: Vec<u8>, diff_id: &str) -> Image {
    ImageBuilder::new()
        .entries(&[testkit::image::Entry::file("ok", "fine")])
        .unwrap()
        .layer(TkLayer::precompressed(data, MEDIA_TYPE_LAYER_GZIP, diff_id))
        .build()
        .unwrap()
}

/// A tar whose single entry has the raw `name` (the tar crate refuses `..` itself).
fn tar_with_raw_name(name: &str, content: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.as_ustar_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_layers_give_clear_errors_and_no_destination() {
    // Corrupt gzip (whose digest matches, so the gzip itself is the problem).
    let tar = tar_with_raw_name("file", &vec![7u8; 100_000]);
    let mut gz = gzip(&tar).unwrap();
    let mid = gz.len() / 2;
    gz[mid..mid + 16].fill(0xff);
    let bad = Digest::sha256_of(&gz);
    let err = convert_fails(
        &image_with_layer(gz, &Digest::sha256_of(&tar).to_string()),
        |_| {},
    )
    .await;
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("layer {bad}")), "{msg}");
    assert!(matches!(err, Error::Layer { .. }), "{msg}");

    // Truncated tar: the payload stops short.
    let tar = tar_with_raw_name("file", &vec![7u8; 100_000]);
    let cut = &tar[..60_000];
    let gz = gzip(cut).unwrap();
    let bad = Digest::sha256_of(&gz);
    let err = convert_fails(
        &image_with_layer(gz, &Digest::sha256_of(cut).to_string()),
        |_| {},
    )
    .await;
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("layer {bad}")) && msg.contains("truncated"),
        "{msg}"
    );

    // A `..` entry name.
    let tar = tar_with_raw_name("../escape", b"x");
    let gz = gzip(&tar).unwrap();
    let bad = Digest::sha256_of(&gz);
    let err = convert_fails(
        &image_with_layer(gz, &Digest::sha256_of(&tar).to_string()),
        |_| {},
    )
    .await;
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("layer {bad}")) && msg.contains(".."),
        "{msg}"
    );

    // A DiffID in the config that the layer does not have.
    let tar = tar_with_raw_name("file", b"x");
    let gz = gzip(&tar).unwrap();
    let bad = Digest::sha256_of(&gz);
    let err = convert_fails(
        &image_with_layer(gz, &Digest::sha256_of(b"other").to_string()),
        |_| {},
    )
    .await;
    assert!(
        matches!(err, Error::DiffIdMismatch { ref digest, .. } if *digest == bad),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_and_tampered_blobs_give_clear_errors() {
    let image = test_image();
    let victim = image.layers[1].blob.clone();
    let victim_digest = converter::oci::parse_digest(&victim.digest).unwrap();
    let path_of = |src: &Path| src.join("blobs/sha256").join(victim.hex());

    let err = convert_fails(&image, |src| std::fs::remove_file(path_of(src)).unwrap()).await;
    assert!(
        matches!(err, Error::MissingBlob { ref digest, .. } if *digest == victim_digest),
        "{err}"
    );

    // Same size, other bytes: the digest does not match.
    let err = convert_fails(&image, |src| {
        let mut data = std::fs::read(path_of(src)).unwrap();
        let last = data.len() - 3;
        data[last] ^= 0x55;
        std::fs::write(path_of(src), data).unwrap();
    })
    .await;
    assert!(
        matches!(err, Error::DigestMismatch { ref digest, .. } if *digest == victim_digest),
        "{err}"
    );

    // A manifest whose bytes do not match the digest index.json gives.
    let err = convert_fails(&image, |src| {
        let p = src.join("blobs/sha256").join(image.manifest.hex());
        let mut data = std::fs::read(&p).unwrap();
        let last = data.len() - 1;
        data[last] = b' ';
        std::fs::write(&p, data).unwrap();
    })
    .await;
    assert!(
        matches!(
            err,
            Error::DigestMismatch {
                what: "manifest",
                ..
            }
        ),
        "{err}"
    );

    // The config missing.
    let err = convert_fails(&image, |src| {
        std::fs::remove_file(src.join("blobs/sha256").join(image.config.hex())).unwrap()
    })
    .await;
    assert!(
        matches!(err, Error::MissingBlob { what: "config", .. }),
        "{err}"
    );
}
