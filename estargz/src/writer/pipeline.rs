//! The compression pipeline: worker threads compress members in parallel, and the
//! results are written in sequence order, hashed as they go.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A member to compress: its sequence number and uncompressed bytes.
pub(super) type Job = (u64, Vec<u8>);

pub(super) fn worker(
    jobs: Arc<Mutex<Receiver<Job>>>,
    results: SyncSender<(u64, Result<Vec<u8>>)>,
    gzip: bool,
    level: i32,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok((seq, data)) = job else { return };
        let out = compress(&data, gzip, level);
        if results.send((seq, out)).is_err() {
            return;
        }
    }
}

/// One gzip member or one zstd frame.
pub(super) fn compress(data: &[u8], gzip: bool, level: i32) -> Result<Vec<u8>> {
    if gzip {
        let mut enc = flate2::write::GzEncoder::new(
            Vec::with_capacity(data.len() / 2 + 64),
            flate2::Compression::new(level as u32),
        );
        enc.write_all(data)
            .map_err(|e| Error::io("gzip compression", e))?;
        enc.finish().map_err(|e| Error::io("gzip compression", e))
    } else {
        zstd::bulk::compress(data, level).map_err(|e| Error::io("zstd compression", e))
    }
}

/// Wraps the input in a decompressor chosen by its magic bytes.
pub(super) fn decompressed<'a, R: Read + 'a>(input: R) -> Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(1 << 16, input);
    let head = br
        .fill_buf()
        .map_err(|e| Error::io("reading the input layer", e))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(br)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let d = zstd::stream::read::Decoder::with_buffer(br)
            .map_err(|e| Error::io("starting zstd decompression of the input", e))?;
        Ok(Box::new(d))
    } else {
        Ok(Box::new(br))
    }
}

pub(super) struct HashingWriter<W> {
    pub(super) inner: W,
    pub(super) hasher: Sha256,
    pub(super) count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(super) fn put(&mut self, data: &[u8]) -> Result<()> {
        self.inner
            .write_all(data)
            .map_err(|e| Error::io("writing the layer", e))?;
        self.hasher.update(data);
        self.count += data.len() as u64;
        Ok(())
    }
}

/// Sends members to the workers and writes their results in order.
pub(super) struct Pipeline<W> {
    pub(super) jobs: Option<SyncSender<Job>>,
    pub(super) results: Receiver<(u64, Result<Vec<u8>>)>,
    pub(super) max_in_flight: usize,
    pub(super) in_flight: usize,
    pub(super) next_write: u64,
    pub(super) ready: BTreeMap<u64, Vec<u8>>,
    pub(super) out: HashingWriter<W>,
    /// (offset, compressed length) of each member, by sequence number.
    pub(super) spans: Vec<(u64, u64)>,
}

impl<W: Write> Pipeline<W> {
    pub(super) fn submit(&mut self, seq: u64, data: Vec<u8>) -> Result<()> {
        while self.in_flight >= self.max_in_flight {
            self.wait_one()?;
        }
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| Error::Worker("pipeline closed".into()))?;
        jobs.send((seq, data))
            .map_err(|_| Error::Worker("compression workers are gone".into()))?;
        self.in_flight += 1;
        Ok(())
    }

    fn wait_one(&mut self) -> Result<()> {
        let (seq, res) = self
            .results
            .recv()
            .map_err(|_| Error::Worker("compression workers are gone".into()))?;
        self.in_flight -= 1;
        self.ready.insert(seq, res?);
        while let Some(data) = self.ready.remove(&self.next_write) {
            self.spans.push((self.out.count, data.len() as u64));
            self.out.put(&data)?;
            self.next_write += 1;
        }
        Ok(())
    }

    pub(super) fn drain(&mut self) -> Result<()> {
        while self.in_flight > 0 {
            self.wait_one()?;
        }
        Ok(())
    }
}
