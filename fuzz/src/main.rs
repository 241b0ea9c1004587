//! A stable-Rust fuzzer for estargz's parsers (cargo-fuzz needs nightly, which this
//! project's machines lack): random mutations of a committed seed corpus, in-process,
//! for a bounded time. No coverage feedback; an input that yields a new outcome label
//! (an error kind or success) joins the in-memory corpus instead.
//!
//! ```text
//! cargo run --release -- seed                  # (re)write corpus/<target>/seed-*
//! cargo run --release -- run TARGET SECONDS    # fuzz; crashes go to artifacts/TARGET/
//! cargo run --release -- replay TARGET FILE    # run one input
//! ```

mod targets;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// xorshift64*: reproducible from the seed printed at start.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Tokens worth splicing in: format magics, JSON pieces, tar fields.
const DICT: &[&[u8]] = &[
    b"STARGZ",
    b"GNUlInUx",
    b"GnUlInUx",
    b"SG",
    b"\x50\x2a\x4d\x18",
    b"\x1f\x8b\x08",
    b"\x28\xb5\x2f\xfd",
    b"\"reg\"",
    b"\"chunk\"",
    b"\"hardlink\"",
    b"\"symlink\"",
    b"\"dir\"",
    b"\"zeros\"",
    b"\"../x\"",
    b"\"/\"",
    b"\"\"",
    b"-1",
    b"0",
    b"9223372036854775807",
    b"18446744073709551615",
    b"4294967296",
    b"1e999",
    b"ffffffffffffffff",
    b"0000000000000000",
    b"ustar\x0000",
    b"ustar  \x00",
    b"././@LongLink",
    b"PaxHeader",
    b"SCHILY.xattr.",
    b"30 path=",
    b"stargz.index.json",
    b".prefetch.landmark",
];

fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut d = input.to_vec();
    let ops = 1 + rng.below(6);
    for _ in 0..ops {
        let len = d.len();
        match rng.below(11) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                d[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                d[i] = [0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'/', b'"'][rng.below(8)];
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                d.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                d.drain(i..i + n);
            }
            5 if len > 0 => {
                // Duplicate a range somewhere else.
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let piece = d[i..i + n].to_vec();
                let at = rng.below(len + 1);
                d.splice(at..at, piece);
            }
            6 => {
                let tok = DICT[rng.below(DICT.len())];
                let i = rng.below(len + 1);
                if rng.below(2) == 0 || i + tok.len() > len {
                    d.splice(i..i, tok.iter().copied());
                } else {
                    d[i..i + tok.len()].copy_from_slice(tok);
                }
            }
            7 if !corpus.is_empty() => {
                // Splice with another input: head of this, tail of that.
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                d.truncate(cut);
                d.extend_from_slice(&other[from..]);
            }
            8 if len > 0 => {
                d.truncate(rng.below(len));
            }
            9 if len >= 8 => {
                // An interesting little-endian integer at a random place.
                let i = rng.below(len - 7);
                let v: u64 = [0, 1, u64::MAX, i64::MAX as u64, 1 << 32, len as u64][rng.below(6)];
                d[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ if len > 0 => {
                // ASCII digit runs: JSON numbers, tar octal fields, footer hex.
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(12));
                for b in &mut d[i..i + n] {
                    *b = b"0123456789abcdef"[rng.below(16)];
                }
            }
            _ => {}
        }
    }
    d.truncate(1 << 20);
    d
}

fn read_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fuzzes `target` for `duration`; returns the number of executions, or the path of
/// the crashing input.
pub fn fuzz(target: &str, duration: Duration, seed: u64) -> Result<(u64, usize), PathBuf> {
    let mut corpus = read_corpus(&crate_dir().join("corpus").join(target));
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let mut seen: HashSet<String> = HashSet::new();
    for c in &corpus {
        seen.insert(targets::run(target, c));
    }
    // Panics are caught and reported with their input; keep the default hook quiet.
    std::panic::set_hook(Box::new(|_| {}));
    let mut rng = Rng(seed | 1);
    let start = Instant::now();
    let mut execs = 0u64;
    while start.elapsed() < duration {
        let base = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, base, &corpus);
        execs += 1;
        match std::panic::catch_unwind(|| targets::run(target, &input)) {
            Ok(outcome) => {
                if seen.insert(outcome) && corpus.len() < 4096 {
                    corpus.push(input);
                }
            }
            Err(panic) => {
                let _ = std::panic::take_hook();
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let dir = crate_dir().join("artifacts").join(target);
                let _ = std::fs::create_dir_all(&dir);
                let path = dir.join(format!("crash-{execs}-{seed:x}"));
                let _ = std::fs::write(&path, &input);
                eprintln!("{target}: panic after {execs} executions: {msg}");
                return Err(path);
            }
        }
    }
    let _ = std::panic::take_hook();
    Ok((execs, seen.len()))
}

/// Writes the seed corpus: small valid inputs of every kind the targets take.
fn write_seeds() -> std::io::Result<()> {
    let root = crate_dir().join("corpus");
    let tar = seed_tar()?;
    let mut layers = Vec::new();
    for format in [
        estargz::OutputFormat::Estargz,
        estargz::OutputFormat::ZstdChunked,
        estargz::OutputFormat::StargzZstdChunked,
    ] {
        let mut out = Vec::new();
        let opts = estargz::WriterOptions {
            format,
            chunk_size: 64,
            threads: 1,
            ..Default::default()
        };
        estargz::convert(&tar[..], &mut out, &opts).map_err(std::io::Error::other)?;
        layers.push((format!("{format:?}").to_lowercase(), out));
    }
    let write = |target: &str, name: &str, data: &[u8]| -> std::io::Result<()> {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::File::create(dir.join(format!("seed-{name}")))?.write_all(data)
    };
    write("tar", "plain", &[&[0u8][..], &tar].concat())?;
    write("tar", "zstd", &[&[1u8][..], &tar].concat())?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar)?;
    write("tar", "gzip", &[&[2u8][..], &gz.finish()?].concat())?;
    for (i, (name, blob)) in layers.iter().enumerate() {
        write("layer", name, blob)?;
        let tail = &blob[blob.len().saturating_sub(72)..];
        write("footer", name, tail)?;
        let f = estargz::parse_footer(tail, blob.len() as u64).map_err(std::io::Error::other)?;
        let toc_bytes =
            &blob[f.toc_offset as usize..(f.toc_offset + f.toc_compressed_size) as usize];
        let parsed = estargz::parse_toc(&f, toc_bytes, &Default::default())
            .map_err(std::io::Error::other)?;
        let json = serde_json::to_vec(&parsed.toc).map_err(std::io::Error::other)?;
        let format_byte = [0u8, 2, 3][i];
        let mut input = vec![format_byte];
        input.extend_from_slice(&f.payload_end.to_le_bytes());
        input.extend_from_slice(&json);
        write("toc", name, &input)?;
    }
    Ok(())
}

/// A small tar with one entry of each kind, a long name and an xattr.
fn seed_tar() -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "d/", std::io::empty())?;
    b.append_pax_extensions([("SCHILY.xattr.user.k", &b"v"[..])])?;
    let content: Vec<u8> = (0..200u8).collect();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(content.len() as u64);
    b.append_data(&mut h, "d/f", &content[..])?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "d/s", "f")?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "d/h", "d/f")?;
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o600);
    h.set_size(3);
    b.append_data(&mut h, format!("d/{}", "n".repeat(120)), &b"abc"[..])?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Fifo);
    h.set_size(0);
    b.append_data(&mut h, "d/p", std::io::empty())?;
    b.into_inner()
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    match (arg(0), arg(1), arg(2)) {
        (Some("seed"), _, _) => match write_seeds() {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("writing seeds: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        (Some("run"), Some(target), Some(secs)) if targets::TARGETS.contains(&target) => {
            let Ok(secs) = secs.parse::<u64>() else {
                eprintln!("SECONDS must be a number");
                return std::process::ExitCode::FAILURE;
            };
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64);
            eprintln!("{target}: fuzzing for {secs}s, rng seed {seed:#x}");
            match fuzz(target, Duration::from_secs(secs), seed) {
                Ok((execs, outcomes)) => {
                    println!(
                        "{target}: {execs} executions in {secs}s, {outcomes} distinct outcomes, no crash"
                    );
                    std::process::ExitCode::SUCCESS
                }
                Err(path) => {
                    eprintln!("crashing input saved to {}", path.display());
                    std::process::ExitCode::FAILURE
                }
            }
        }
        (Some("replay"), Some(target), Some(file)) if targets::TARGETS.contains(&target) => {
            match std::fs::read(file) {
                Ok(data) => {
                    println!("{}", targets::run(target, &data));
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("reading {file}: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        _ => {
            eprintln!(
                "usage: lazysnap-fuzz seed | run TARGET SECONDS | replay TARGET FILE\ntargets: {}",
                targets::TARGETS.join(", ")
            );
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short run of every target over the committed corpus: CI catches regressions
    /// that the long runs found once. The seeds themselves must all be accepted.
    #[test]
    fn every_target_survives_a_short_run() {
        for target in targets::TARGETS {
            let dir = crate_dir().join("corpus").join(target);
            let mut seeds = 0;
            for e in std::fs::read_dir(&dir).expect("corpus dir") {
                let path = e.expect("dir entry").path();
                let outcome = targets::run(target, &std::fs::read(&path).expect("read"));
                // Valid seeds must be accepted; regression inputs only must not panic.
                if path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
                {
                    assert!(
                        outcome.starts_with("ok:"),
                        "{} rejected: {outcome}",
                        path.display()
                    );
                    seeds += 1;
                }
            }
            assert!(seeds > 0, "no seeds for {target}");
            if let Err(p) = fuzz(target, Duration::from_secs(3), 0x5eed) {
                panic!("{target} crashed; input in {}", p.display());
            }
        }
    }
}
