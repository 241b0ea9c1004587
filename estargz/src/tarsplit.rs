//! The vbatts/tar-split JSON-lines stream that zstd:chunked (containers/storage) stores
//! so a consumer can rebuild the bit-exact tar from files fetched chunk by chunk.

use std::io::Write;

use base64::Engine as _;

use crate::error::{Error, Result};

/// Go's `hash/crc64` with the ISO polynomial, the checksum tar-split records per file.
pub(crate) struct Crc64 {
    table: [u64; 256],
    crc: u64,
}

impl Crc64 {
    pub fn new() -> Self {
        const ISO: u64 = 0xD800_0000_0000_0000;
        let mut table = [0u64; 256];
        for (i, t) in table.iter_mut().enumerate() {
            let mut crc = i as u64;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ ISO
                } else {
                    crc >> 1
                };
            }
            *t = crc;
        }
        Crc64 { table, crc: 0 }
    }

    pub fn reset(&mut self) {
        self.crc = 0;
    }

    pub fn update(&mut self, data: &[u8]) {
        let mut crc = !self.crc;
        for &b in data {
            crc = self.table[((crc as u8) ^ b) as usize] ^ (crc >> 8);
        }
        self.crc = !crc;
    }

    /// Go's `Sum(nil)`: big-endian bytes.
    pub fn sum(&self) -> [u8; 8] {
        self.crc.to_be_bytes()
    }
}

/// Writes tar-split entries, zstd-compressed, into memory.
pub(crate) struct TarSplitWriter {
    enc: zstd::stream::write::Encoder<'static, Vec<u8>>,
    position: u64,
    uncompressed: u64,
}

const SEGMENT: u8 = 2;
const FILE: u8 = 1;

impl TarSplitWriter {
    pub fn new(level: i32) -> Result<Self> {
        let enc = zstd::stream::write::Encoder::new(Vec::new(), level)
            .map_err(|e| Error::io("starting the tar-split compressor", e))?;
        Ok(TarSplitWriter {
            enc,
            position: 0,
            uncompressed: 0,
        })
    }

    fn line(&mut self, mut v: serde_json::Value) -> Result<()> {
        v["position"] = self.position.into();
        let mut s = serde_json::to_vec(&v).map_err(|e| Error::bad_toc(e.to_string()))?;
        s.push(b'\n');
        self.enc
            .write_all(&s)
            .map_err(|e| Error::io("compressing tar-split", e))?;
        self.uncompressed += s.len() as u64;
        self.position += 1;
        Ok(())
    }

    /// Raw tar bytes that are not file payload (headers, padding, end of archive).
    pub fn segment(&mut self, raw: &[u8]) -> Result<()> {
        if raw.is_empty() {
            return Ok(());
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        // Field order follows Go's struct: type, payload, position.
        self.line(serde_json::json!({"type": SEGMENT, "payload": b64}))
    }

    /// A file entry: its name, payload size and crc64 (none for empty payloads).
    pub fn file(&mut self, name: &str, size: u64, crc: Option<[u8; 8]>) -> Result<()> {
        let mut v = serde_json::json!({"type": FILE, "name": name});
        if size > 0 {
            v["size"] = size.into();
        }
        v["payload"] = match crc {
            Some(c) => base64::engine::general_purpose::STANDARD.encode(c).into(),
            None => serde_json::Value::Null,
        };
        self.line(v)
    }

    /// The compressed stream and its uncompressed length.
    pub fn finish(self) -> Result<(Vec<u8>, u64)> {
        let data = self
            .enc
            .finish()
            .map_err(|e| Error::io("finishing tar-split", e))?;
        Ok((data, self.uncompressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_iso_matches_go() {
        // The CRC catalogue's check value for CRC-64/GO-ISO over "123456789".
        let mut c = Crc64::new();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.sum(), 0xb909_56c7_75a4_1001u64.to_be_bytes());
        c.reset();
        assert_eq!(c.sum(), [0; 8]);
    }

    #[test]
    fn writes_json_lines_with_positions() {
        let mut w = TarSplitWriter::new(3).unwrap();
        w.segment(b"hdr").unwrap();
        w.file("a", 0, None).unwrap();
        w.file("b", 5, Some([1; 8])).unwrap();
        let (data, n) = w.finish().unwrap();
        let text = zstd::stream::decode_all(&data[..]).unwrap();
        assert_eq!(text.len() as u64, n);
        let lines: Vec<serde_json::Value> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines[0]["type"], 2);
        assert_eq!(lines[0]["payload"], "aGRy");
        assert_eq!(lines[1]["payload"], serde_json::Value::Null);
        assert_eq!(lines[2]["size"], 5);
        assert_eq!(lines[2]["position"], 2);
    }
}
