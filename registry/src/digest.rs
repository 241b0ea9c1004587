//! Content digests (`sha256:<hex>`, `sha512:<hex>`) and their verification.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256, Sha512};

/// A content digest as OCI writes it: `algorithm:hex`. Only algorithms we can verify parse.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
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

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
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
        Self {
            algorithm: Algorithm::Sha256,
            hex: hex(&Sha256::digest(data)),
        }
    }

    /// The digest a sha256 hasher has taken in (data hashed as it streams past).
    pub fn from_sha256(hasher: Sha256) -> Self {
        Self {
            algorithm: Algorithm::Sha256,
            hex: hex(&hasher.finalize()),
        }
    }

    /// The digest of `data` computed with this digest's algorithm.
    pub fn compute_like(&self, data: &[u8]) -> Self {
        let hex = match self.algorithm {
            Algorithm::Sha256 => hex(&Sha256::digest(data)),
            Algorithm::Sha512 => hex(&Sha512::digest(data)),
        };
        Self {
            algorithm: self.algorithm,
            hex,
        }
    }

    /// True when `data` hashes to this digest.
    pub fn matches(&self, data: &[u8]) -> bool {
        self.compute_like(data) == *self
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn hex(&self) -> &str {
        &self.hex
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
            Hasher::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex(&h.finalize()),
            },
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

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| DigestParseError {
            input: s.to_string(),
            reason,
        };
        let (alg, hex) = s.split_once(':').ok_or_else(|| err("missing ':'"))?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(err("unsupported algorithm (sha256 and sha512 are)")),
        };
        if hex.len() != algorithm.hex_len() {
            return Err(err("wrong length for the algorithm"));
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err("not lowercase hex"));
        }
        Ok(Self {
            algorithm,
            hex: hex.to_string(),
        })
    }
}

/// A chunk or TOC digest of the layer formats (always sha256) as a content digest.
impl From<estargz::Digest> for Digest {
    fn from(d: estargz::Digest) -> Self {
        Self {
            algorithm: Algorithm::Sha256,
            hex: d.hex(),
        }
    }
}

/// The layer formats' form of a sha256 content digest, taken from its hex without going
/// through text; a sha512 digest has none and is refused as parsing its text would be.
impl TryFrom<&Digest> for estargz::Digest {
    type Error = estargz::Error;

    fn try_from(d: &Digest) -> std::result::Result<Self, Self::Error> {
        if d.algorithm != Algorithm::Sha256 {
            return Err(estargz::Error::BadDigest(
                d.to_string().chars().take(100).collect(),
            ));
        }
        // The hex was checked to be 64 lowercase digits when the digest was made.
        let nibble = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(d.hex.as_bytes().chunks_exact(2)) {
            *byte = (nibble(pair[0]) << 4) | nibble(pair[1]);
        }
        Ok(estargz::Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_verifies() {
        let d = Digest::sha256_of(b"hello");
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let parsed: Digest = d.to_string().parse().unwrap();
        assert_eq!(parsed, d);
        assert!(d.matches(b"hello"));
        assert!(!d.matches(b"hellO"));
        let mut h = Hasher::new(Algorithm::Sha256);
        h.update(b"he");
        h.update(b"llo");
        assert_eq!(h.finish(), d);
        let layer = estargz::Digest::try_from(&d).unwrap();
        assert_eq!(layer, estargz::Digest::of(b"hello"));
        assert_eq!(Digest::from(layer), d);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "sha256",
            "md5:abcd",
            "sha256:abc",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} parsed");
        }
        let sha512 = Digest::sha256_of(b"x").compute_like(b"x");
        assert_eq!(sha512.algorithm(), Algorithm::Sha256);
        let d512: Digest = format!("sha512:{}", "0".repeat(128)).parse().unwrap();
        assert!(!d512.matches(b"x"));
        assert_eq!(d512.compute_like(b"x").hex().len(), 128);
        assert!(estargz::Digest::try_from(&d512).is_err());
    }
}
