//! Content digests as OCI writes them (`sha256:<hex>`, `sha512:<hex>`): one type, one parser.
//!
//! [`Digest`] names any blob, manifest or TOC. [`Sha256Sum`] is the value of a sha256 digest
//! where a format fixes the algorithm (every chunk of an eStargz or zstd:chunked layer, a TOC,
//! a zTOC, a cache key): 32 bytes, so an index of 100k chunks does not pay for sha512's 64.
//! Both read and write the same text through [`Digest`]'s parser.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256, Sha512};

use crate::error::Error;

/// A content digest: an algorithm we can verify and its hash.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(HashValue);

/// sha512's rarer hash is boxed so that a digest stays 40 bytes, which errors and
/// descriptors carry by value.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum HashValue {
    Sha256([u8; 32]),
    Sha512(Box<[u8; 64]>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Bytes in a hash of this algorithm.
    fn len(self) -> usize {
        match self {
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {input:?}: {reason}")]
pub struct DigestParseError {
    pub input: String,
    pub reason: &'static str,
}

impl Digest {
    /// The sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Self {
        Sha256Sum::of(data).into()
    }

    /// The digest a sha256 hasher has taken in (data hashed as it streams past).
    pub fn from_sha256(hasher: Sha256) -> Self {
        Digest(HashValue::Sha256(hasher.finalize().into()))
    }

    /// The digest of `data` computed with this digest's algorithm.
    pub fn compute_like(&self, data: &[u8]) -> Self {
        let mut hasher = Hasher::new(self.algorithm());
        hasher.update(data);
        hasher.finish()
    }

    /// True when `data` hashes to this digest.
    pub fn matches(&self, data: &[u8]) -> bool {
        self.compute_like(data) == *self
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.0 {
            HashValue::Sha256(_) => Algorithm::Sha256,
            HashValue::Sha512(_) => Algorithm::Sha512,
        }
    }

    /// The hash itself.
    pub fn hash(&self) -> &[u8] {
        match &self.0 {
            HashValue::Sha256(bytes) => bytes,
            HashValue::Sha512(bytes) => &bytes[..],
        }
    }

    /// The hash in lowercase hex, as the text form writes it after the colon.
    pub fn hex(&self) -> String {
        hex(self.hash())
    }
}

/// Incremental hashing for data that arrives in pieces (uploads, streamed blobs), with
/// the algorithm of the digest it is to be checked against.
pub enum Hasher {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest::from_sha256(h),
            Hasher::Sha512(h) => Digest(HashValue::Sha512(Box::new(h.finalize().into()))),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// `N` bytes from `2 * N` lowercase hex digits.
fn decode_hex<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    let nibble = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// The one parser of the text form. Lowercase hex only, as OCI's grammar for sha256 and
/// sha512 (and containerd's go-digest) require.
impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| DigestParseError {
            input: s.chars().take(200).collect(),
            reason,
        };
        let (name, hex) = s.split_once(':').ok_or_else(|| err("missing ':'"))?;
        let algorithm = match name {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(err("unsupported algorithm (sha256 and sha512 are)")),
        };
        if hex.len() != algorithm.len() * 2 {
            return Err(err("wrong length for the algorithm"));
        }
        let bad_hex = || err("not lowercase hex");
        let hex = hex.as_bytes();
        Ok(Digest(match algorithm {
            Algorithm::Sha256 => HashValue::Sha256(decode_hex(hex).ok_or_else(bad_hex)?),
            Algorithm::Sha512 => HashValue::Sha512(Box::new(decode_hex(hex).ok_or_else(bad_hex)?)),
        }))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm().name(), self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The value of a sha256 digest, where the format allows no other algorithm.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Sha256Sum(pub [u8; 32]);

impl Sha256Sum {
    /// The sha256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Sha256Sum(Sha256::digest(data).into())
    }

    pub(crate) fn from_hasher(h: Sha256) -> Self {
        Sha256Sum(h.finalize().into())
    }

    /// The sha256 of `len` zero bytes, without allocating them all.
    pub fn of_zeros(len: u64) -> Self {
        let block = [0u8; 8192];
        let mut h = Sha256::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            h.update(&block[..n]);
            left -= n as u64;
        }
        Self::from_hasher(h)
    }

    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

impl From<Sha256Sum> for Digest {
    fn from(sum: Sha256Sum) -> Self {
        Digest(HashValue::Sha256(sum.0))
    }
}

/// A sha512 digest has no sha256 value and is refused as a layer format would refuse it.
impl TryFrom<&Digest> for Sha256Sum {
    type Error = Error;

    fn try_from(d: &Digest) -> Result<Self, Error> {
        match d.0 {
            HashValue::Sha256(bytes) => Ok(Sha256Sum(bytes)),
            HashValue::Sha512(_) => {
                Err(Error::BadDigest(d.to_string().chars().take(100).collect()))
            }
        }
    }
}

impl fmt::Display for Sha256Sum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Sha256Sum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Parsed by [`Digest`]'s parser; anything but sha256 is refused.
impl FromStr for Sha256Sum {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let digest: Digest = s
            .parse()
            .map_err(|_| Error::BadDigest(s.chars().take(100).collect()))?;
        Sha256Sum::try_from(&digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_round_trips_and_verifies() {
        let d = Digest::sha256_of(b"hello");
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert!(d.matches(b"hello"));
        assert!(!d.matches(b"hellO"));
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(b"he");
        h.update(b"llo");
        assert_eq!(h.finish(), d);
        assert_eq!(d.compute_like(b"x").algorithm(), Algorithm::Sha256);

        let d512: Digest = format!("sha512:{}", "0".repeat(128)).parse().unwrap();
        assert_eq!(d512.to_string().parse::<Digest>().unwrap(), d512);
        assert!(!d512.matches(b"x"));
        let x512 = d512.compute_like(b"x");
        assert_eq!(x512.hex().len(), 128);
        assert!(x512.matches(b"x"));
        assert_eq!(serde_json::to_string(&x512).unwrap(), format!("\"{x512}\""));
    }

    #[test]
    fn malformed_digests_are_refused() {
        for bad in [
            "sha256",
            "md5:abcd",
            "sha256:abc",
            "sha256:zz",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "sha512:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} parsed");
            assert!(bad.parse::<Sha256Sum>().is_err(), "{bad} parsed");
        }
        let g = format!("sha256:{}", "g".repeat(64));
        assert!(g.parse::<Sha256Sum>().is_err());
        assert!(serde_json::from_str::<Digest>("\"sha256:00\"").is_err());
    }

    #[test]
    fn a_digest_stays_small() {
        assert_eq!(std::mem::size_of::<Digest>(), 40);
        assert_eq!(std::mem::size_of::<Sha256Sum>(), 32);
    }

    #[test]
    fn a_sha256_sum_is_a_sha256_digest() {
        let sum = Sha256Sum::of(b"abc");
        assert_eq!(
            sum.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sum.to_string().parse::<Sha256Sum>().unwrap(), sum);
        let digest = Digest::from(sum);
        assert_eq!(digest, Digest::sha256_of(b"abc"));
        assert_eq!(digest.to_string(), sum.to_string());
        assert_eq!(Sha256Sum::try_from(&digest).unwrap(), sum);
        let d512 = Digest::sha256_of(b"abc");
        let d512 = Hasher::new(Algorithm::Sha512)
            .finish()
            .compute_like(d512.hash());
        assert!(Sha256Sum::try_from(&d512).is_err());
        assert_eq!(Sha256Sum::of_zeros(10_000), Sha256Sum::of(&[0u8; 10_000]));
    }
}
