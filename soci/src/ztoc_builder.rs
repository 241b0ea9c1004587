//! Builds a gzip layer's zTOC. soci reads the layer three times (inflating for the
//! checkpoints, hashing the spans, inflating again for the tar headers); here one
//! inflate pass makes the checkpoints while a second thread walks the tar headers in
//! the output it is handed, and only the span hashing reads the compressed bytes again.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

use sha2::{Digest, Sha256};

use crate::checkpoint_blob::{self, Checkpoints};
use crate::gzip_checkpoints::{self, Checkpoint};
use crate::tar_toc::{self, TarError};
use crate::ztoc::{Compression, VERSION, Ztoc};

/// soci's default: a checkpoint about every 4 MiB of tar.
pub const DEFAULT_SPAN_SIZE: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("reading the layer: {0}")]
    Io(#[from] io::Error),
    #[error("the layer's gzip stream: {0}")]
    Gzip(#[from] gzip_checkpoints::Error),
    #[error("the layer's tar stream: {0}")]
    Tar(#[from] TarError),
}

/// Inflated output goes to the tar thread in pieces of about this size.
const HAND_OVER: usize = 256 << 10;

/// The zTOC of the gzip-compressed tar `layer`, with a checkpoint after about every
/// `span_size` bytes of tar, naming `build_tool` as its maker.
pub fn build_ztoc(layer: &File, span_size: u64, build_tool: &str) -> Result<Ztoc, BuildError> {
    build_ztoc_reporting(layer, span_size, build_tool, &|_| {})
}

/// [`build_ztoc`], telling `read` how many compressed bytes it has read as it goes.
pub fn build_ztoc_reporting(
    layer: &File,
    span_size: u64,
    build_tool: &str,
    read: &(dyn Fn(u64) + Sync),
) -> Result<Ztoc, BuildError> {
    let compressed_size = layer.metadata()?.len();
    let (points, (files, tar_size)) = std::thread::scope(|scope| {
        let (send, receive) = mpsc::sync_channel::<Vec<u8>>(4);
        let tar = scope.spawn(move || tar_toc::read_tar_toc(ChannelReader::new(receive)));
        let mut pending = Vec::with_capacity(HAND_OVER);
        let gz = BufReader::with_capacity(
            256 << 10,
            Positional {
                file: layer,
                at: 0,
                read,
            },
        );
        let built = gzip_checkpoints::build_checkpoints_passing_output(gz, span_size, |out| {
            pending.extend_from_slice(out);
            if pending.len() >= HAND_OVER {
                let full = std::mem::replace(&mut pending, Vec::with_capacity(HAND_OVER));
                // A closed channel: the tar thread stopped on an error it reports.
                send.send(full).map_err(|_| io::ErrorKind::BrokenPipe)?;
            }
            Ok(())
        });
        if built.is_ok() && !pending.is_empty() {
            let _ = send.send(pending);
        }
        drop(send);
        let toc = tar
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        match (built, toc) {
            (Ok(points), Ok(toc)) => Ok((points, toc)),
            (_, Err(tar)) => Err(BuildError::from(tar)),
            (Err(gzip), Ok(_)) => Err(BuildError::from(gzip)),
        }
    })?;
    let span_digests = span_digests(layer, &points, compressed_size)?;
    let checkpoints = checkpoint_blob::encode(&Checkpoints { span_size, points });
    Ok(Ztoc {
        version: VERSION.to_string(),
        build_tool_identifier: build_tool.to_string(),
        compressed_archive_size: compressed_size as i64,
        uncompressed_archive_size: tar_size as i64,
        files,
        compression: Compression::Gzip,
        max_span_id: span_digests.len() as i32 - 1,
        span_digests,
        checkpoints,
    })
}

/// The compressed bytes of span `i` run from its checkpoint's first input byte to the
/// next checkpoint's offset (the last span to the end of the layer), as soci cuts them.
pub fn span_range(points: &[Checkpoint], i: usize, compressed_size: u64) -> (u64, u64) {
    let start = points[i].input_start();
    let end = points
        .get(i + 1)
        .map_or(compressed_size, |next| next.compressed_offset);
    (start, end)
}

fn span_digests(layer: &File, points: &[Checkpoint], size: u64) -> io::Result<Vec<String>> {
    let mut buf = vec![0u8; 1 << 20];
    (0..points.len())
        .map(|i| {
            let (mut at, end) = span_range(points, i, size);
            let mut hash = Sha256::new();
            while at < end {
                let want = (end - at).min(buf.len() as u64) as usize;
                layer.read_exact_at(&mut buf[..want], at)?;
                hash.update(&buf[..want]);
                at += want as u64;
            }
            Ok(format!("sha256:{}", hex(&hash.finalize())))
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a file from its start whatever the file's own position.
struct Positional<'a> {
    file: &'a File,
    at: u64,
    read: &'a (dyn Fn(u64) + Sync),
}

impl Read for Positional<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        (self.read)(n as u64);
        Ok(n)
    }
}

/// Reads the pieces sent over a channel as one stream.
struct ChannelReader {
    pieces: mpsc::Receiver<Vec<u8>>,
    current: Vec<u8>,
    at: usize,
}

impl ChannelReader {
    fn new(pieces: mpsc::Receiver<Vec<u8>>) -> Self {
        ChannelReader {
            pieces,
            current: Vec::new(),
            at: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            match self.pieces.recv() {
                Ok(piece) => {
                    self.current = piece;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A gzip tar of a few files, one big enough for several spans.
    fn layer() -> tempfile::NamedTempFile {
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            tar.append_data(&mut h, name, data).unwrap();
        };
        add("small", b"hello");
        let big: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i * 7 % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        add("big", &big);
        add("after", b"world");
        let tar = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        gz.write_all(&tar).unwrap();
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&gz.finish().unwrap()).unwrap();
        file
    }

    #[test]
    fn every_file_reads_back_through_its_ztoc() {
        let file = layer();
        let z = build_ztoc(file.as_file(), 512 << 10, "test").unwrap();
        let gz = std::fs::read(file.path()).unwrap();
        assert_eq!(z.compressed_archive_size as usize, gz.len());
        let points = checkpoint_blob::decode(&z.checkpoints).unwrap().points;
        assert!(points.len() >= 3, "{} spans", points.len());
        assert_eq!(z.span_digests.len(), points.len());
        for (i, digest) in z.span_digests.iter().enumerate() {
            let (start, end) = span_range(&points, i, gz.len() as u64);
            let want = format!(
                "sha256:{}",
                hex(&Sha256::digest(&gz[start as usize..end as usize]))
            );
            assert_eq!(digest, &want);
        }
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut tar)
            .unwrap();
        for f in &z.files {
            let (offset, size) = (f.uncompressed_offset as u64, f.uncompressed_size as usize);
            let cp = points
                .iter()
                .rev()
                .find(|p| p.uncompressed_offset <= offset)
                .unwrap();
            let from = &gz[cp.input_start() as usize..];
            let got =
                gzip_checkpoints::inflate_from(cp, from, offset - cp.uncompressed_offset, size)
                    .unwrap();
            assert_eq!(
                got,
                &tar[offset as usize..offset as usize + size],
                "{:?}",
                f.name
            );
        }
        assert_eq!(z.files.len(), 3);
        // tar-rs ends the archive with its two zero blocks and no record padding.
        assert_eq!(z.uncompressed_archive_size as usize, tar.len());
    }

    #[test]
    fn a_broken_layer_is_an_error() {
        let file = layer();
        let mut gz = std::fs::read(file.path()).unwrap();
        gz.truncate(gz.len() / 2);
        let mut short = tempfile::NamedTempFile::new().unwrap();
        short.write_all(&gz).unwrap();
        assert!(build_ztoc(short.as_file(), 512 << 10, "test").is_err());
        let mut not_tar = tempfile::NamedTempFile::new().unwrap();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        enc.write_all(&[b'x'; 5000]).unwrap();
        not_tar.write_all(&enc.finish().unwrap()).unwrap();
        assert!(matches!(
            build_ztoc(not_tar.as_file(), 512 << 10, "test"),
            Err(BuildError::Tar(_))
        ));
    }
}
