//! A SOCI layer opened for serving: its zTOC checked against the digest the index gave
//! for it, decoded, checked against the layer and itself, and indexed as an estargz
//! layer whose chunks are span pieces.

use std::sync::Arc;

use estargz::{BlobReader, Cancel, Layer, Sha256Sum};

use crate::layout::{Layout, LayoutError};
use crate::ztoc::{self, ZtocError};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the zTOC's digest is {got}, its descriptor says {want}")]
    Digest { want: Sha256Sum, got: Sha256Sum },
    #[error(transparent)]
    Ztoc(#[from] ZtocError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("the zTOC is for a layer of {ztoc} bytes; the blob has {blob}")]
    Size { ztoc: u64, blob: u64 },
    #[error("the zTOC's entries: {0}")]
    Entries(#[from] estargz::Error),
}

/// Opens the gzip layer `blob` (of `blob_size` bytes) through the zTOC `ztoc_bytes`,
/// which must have the digest `ztoc_digest`.
pub fn open_layer(
    blob: Arc<dyn BlobReader>,
    blob_size: u64,
    ztoc_bytes: &[u8],
    ztoc_digest: &Sha256Sum,
    cancel: &Cancel,
) -> Result<Layer, OpenError> {
    open_layer_prefetching(blob, blob_size, ztoc_bytes, ztoc_digest, &[], cancel)
}

/// [`open_layer`], the pieces of the spans in `prefetch` (span ids, from the layer's
/// prefetch artifact) marked for the prefetch.
pub fn open_layer_prefetching(
    blob: Arc<dyn BlobReader>,
    blob_size: u64,
    ztoc_bytes: &[u8],
    ztoc_digest: &Sha256Sum,
    prefetch: &[std::ops::RangeInclusive<u32>],
    cancel: &Cancel,
) -> Result<Layer, OpenError> {
    let got = Sha256Sum::of(ztoc_bytes);
    if got != *ztoc_digest {
        return Err(OpenError::Digest {
            want: *ztoc_digest,
            got,
        });
    }
    let layout = Layout::check(ztoc::decode(ztoc_bytes)?)?;
    if layout.compressed_size != blob_size {
        return Err(OpenError::Size {
            ztoc: layout.compressed_size,
            blob: blob_size,
        });
    }
    let index = layout.index(ztoc_digest, ztoc_bytes.len() as u64, prefetch, cancel)?;
    Ok(Layer::from_spans(
        blob,
        blob_size,
        index,
        *ztoc_digest,
        Arc::new(layout),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ztoc_builder::build_ztoc;
    use estargz::{EntryKind, VecBlob};
    use std::io::Write;

    /// A layer of the shapes a real one has: directories, files small and big (several
    /// spans), a symlink, a hardlink, an empty file, an xattr, a setuid mode and owners.
    fn sample() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
        let mut tar = tar::Builder::new(Vec::new());
        let mut files = Vec::new();
        let header = |kind: tar::EntryType, mode: u32, size: u64| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(1000);
            h.set_gid(100);
            h.set_mtime(1_700_000_000);
            h.set_size(size);
            h
        };
        tar.append_data(
            &mut header(tar::EntryType::Directory, 0o755, 0),
            "usr/",
            &[][..],
        )
        .unwrap();
        let mut state = 1u64;
        for (i, len) in [10usize, 700_000, 0, 3_000_000, 5_000]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    (state >> 59) as u8 % 9 + b'a'
                })
                .collect();
            let name = format!("usr/file{i}");
            tar.append_data(
                &mut header(tar::EntryType::Regular, 0o4755, len as u64),
                &name,
                &data[..],
            )
            .unwrap();
            files.push((name, data));
        }
        let mut link = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut link, "usr/link", "file1").unwrap();
        let mut hard = header(tar::EntryType::Link, 0o644, 0);
        tar.append_link(&mut hard, "usr/hard", "usr/file0").unwrap();
        let mut pax = tar::Builder::new(Vec::new());
        pax.append_pax_extensions([("SCHILY.xattr.user.note", &b"hi"[..])])
            .unwrap();
        let mut tar_bytes = tar.into_inner().unwrap();
        tar_bytes.truncate(tar_bytes.len() - 1024);
        let mut pax_bytes = pax.into_inner().unwrap();
        pax_bytes.truncate(pax_bytes.len() - 1024);
        tar_bytes.extend_from_slice(&pax_bytes);
        let mut tail = tar::Builder::new(Vec::new());
        tail.append_data(
            &mut header(tar::EntryType::Regular, 0o600, 2),
            "usr/noted",
            &b"ok"[..],
        )
        .unwrap();
        tar_bytes.extend_from_slice(&tail.into_inner().unwrap());
        files.push(("usr/noted".into(), b"ok".to_vec()));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&tar_bytes).unwrap();
        (gz.finish().unwrap(), files)
    }

    fn open(gz: &[u8], span: u64) -> (Layer, Vec<u8>) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(gz).unwrap();
        let ztoc = ztoc::encode(&build_ztoc(file.as_file(), span, "test").unwrap());
        let blob = Arc::new(VecBlob::new(gz.to_vec()));
        let layer = open_layer(
            blob,
            gz.len() as u64,
            &ztoc,
            &Sha256Sum::of(&ztoc),
            &Cancel::new(),
        )
        .unwrap();
        (layer, ztoc)
    }

    #[tokio::test]
    async fn every_file_of_a_soci_layer_reads_back() {
        let (gz, files) = sample();
        let (layer, _) = open(&gz, 256 << 10);
        for (name, data) in &files {
            let got = layer.read_file_range(name, 0, u64::MAX).await.unwrap();
            assert!(got == *data, "{name}");
            if data.len() > 100_000 {
                let mid = layer.read_file_range(name, 300_001, 70_000).await.unwrap();
                assert!(mid[..] == data[300_001..370_001], "{name} at 300001");
            }
        }
        let index = layer.index();
        let file = index.entry(index.lookup("usr/file1").unwrap());
        assert!(file.chunks().len() > 1, "a big file spans several spans");
        assert_eq!((file.mode(), file.uid(), file.gid()), (0o4755, 1000, 100));
        assert_eq!(file.mtime().secs, 1_700_000_000);
        let link = index.entry(index.lookup("usr/link").unwrap());
        assert_eq!(
            (link.kind(), link.symlink_target()),
            (EntryKind::Symlink, Some("file1"))
        );
        let hard = layer.read_file_range("usr/hard", 0, 100).await.unwrap();
        assert_eq!(hard, files[0].1);
        let noted = index.entry(index.lookup("usr/noted").unwrap());
        let xattrs: Vec<(&str, &[u8])> = noted.xattrs().collect();
        assert_eq!(xattrs, [("user.note", &b"hi"[..])]);
    }

    #[test]
    fn the_pieces_of_prefetched_spans_are_marked() {
        let (gz, _) = sample();
        let (_, ztoc) = open(&gz, 256 << 10);
        let blob = Arc::new(VecBlob::new(gz.clone()));
        let layer = open_layer_prefetching(
            blob,
            gz.len() as u64,
            &ztoc,
            &Sha256Sum::of(&ztoc),
            &[1..=1],
            &Cancel::new(),
        )
        .unwrap();
        let index = layer.index();
        assert!(index.has_prefetch_marks());
        let chunks = index.entry(index.lookup("usr/file1").unwrap()).chunks();
        let second_span = chunks
            .iter()
            .map(|c| c.comp_offset)
            .collect::<std::collections::BTreeSet<_>>();
        let marked: Vec<bool> = chunks.iter().map(|c| c.prefetch).collect();
        assert!(
            marked.iter().any(|m| *m) && !marked.iter().all(|m| *m),
            "{marked:?} over {second_span:?}"
        );
    }

    #[test]
    fn a_ztoc_that_is_not_the_one_named_or_not_for_this_blob_is_refused() {
        let (gz, _) = sample();
        let (_, ztoc) = open(&gz, 256 << 10);
        let blob = Arc::new(VecBlob::new(gz.clone()));
        let wrong = Sha256Sum::of(b"another");
        let named = open_layer(blob.clone(), gz.len() as u64, &ztoc, &wrong, &Cancel::new());
        assert!(matches!(named, Err(OpenError::Digest { .. })));
        let sized = open_layer(
            blob,
            gz.len() as u64 + 1,
            &ztoc,
            &Sha256Sum::of(&ztoc),
            &Cancel::new(),
        );
        assert!(matches!(sized, Err(OpenError::Size { .. })));
    }
}
