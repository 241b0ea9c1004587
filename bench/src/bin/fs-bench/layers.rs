//! The generated layers: random bytes and a Debian-like tree from the seed, tarred by
//! GNU tar, extracted for the baselines and converted for us.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use estargz::OutputFormat;
use sha2::{Digest as _, Sha256};

use crate::Bench;
use crate::tools::run_ok;

/// SplitMix64: tiny and fully specified, so a seed names the same bytes forever.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for piece in buf.chunks_mut(8) {
            let b = self.next_u64().to_le_bytes();
            piece.copy_from_slice(&b[..piece.len()]);
        }
    }
}

/// A converted layer and the tree GNU tar extracts from the same tar.
pub(crate) struct Prepared {
    /// eStargz blob, and zstd:chunked blob when made.
    pub(crate) estargz: PathBuf,
    pub(crate) zstd: Option<PathBuf>,
    /// The tree `tar -x` produced (the baseline's bytes).
    pub(crate) extracted: PathBuf,
    /// sha256 of the big file (big layer only).
    pub(crate) sha256: Option<String>,
}

/// Tars `src` (GNU tar, posix format as image builders write), extracts it to
/// `extracted` (the baseline), converts it, and removes the source tree and the tar.
fn tar_convert_extract(
    src: &Path,
    dir: &Path,
    formats: &[OutputFormat],
) -> anyhow::Result<(Vec<PathBuf>, PathBuf)> {
    let tar = dir.join("layer.tar");
    run_ok(
        Command::new("tar")
            // Fixed mtimes, so that the seed alone names the blobs.
            .args([
                "--format=posix",
                "--numeric-owner",
                "--sort=name",
                "--mtime=@1577836800",
                "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
                "-C",
            ])
            .arg(src)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    )?;
    std::fs::remove_dir_all(src)?;
    let extracted = dir.join("extracted");
    std::fs::create_dir_all(&extracted)?;
    run_ok(
        Command::new("tar")
            .args(["--numeric-owner", "-xpf"])
            .arg(&tar)
            .arg("-C")
            .arg(&extracted),
    )?;
    let mut blobs = Vec::new();
    for format in formats {
        let name = match format {
            OutputFormat::Estargz => "layer.estargz",
            _ => "layer.zstd-chunked",
        };
        let path = dir.join(name);
        let t = Instant::now();
        let input = std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(&tar).with_context(|| format!("opening {}", tar.display()))?,
        );
        let output = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path)?);
        let opts = estargz::WriterOptions {
            format: *format,
            ..Default::default()
        };
        let out = estargz::convert(input, output, &opts)
            .with_context(|| format!("converting {} to {format:?}", tar.display()))?;
        eprintln!(
            "  {format:?}: {} bytes in {:.1} s",
            out.blob_size,
            t.elapsed().as_secs_f64()
        );
        blobs.push(path);
    }
    std::fs::remove_file(&tar)?;
    Ok((blobs, extracted))
}

impl Bench<'_> {
    pub(crate) fn prepare_big(&self) -> anyhow::Result<Prepared> {
        let size = self.args.big_mib << 20;
        eprintln!("generating the big layer ({} MiB)", self.args.big_mib);
        let dir = self.work.join("big");
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("data"))?;
        let mut rng = Rng(self.args.seed);
        let mut f = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(src.join("data/big.bin"))?,
        );
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            hasher.update(&buf[..n]);
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let (blobs, extracted) = tar_convert_extract(
            &src,
            &dir,
            &[OutputFormat::Estargz, OutputFormat::ZstdChunked],
        )?;
        Ok(Prepared {
            estargz: blobs[0].clone(),
            zstd: Some(blobs[1].clone()),
            extracted,
            sha256: Some(format!("{:x}", hasher.finalize())),
        })
    }

    /// A Debian-like tree of `entries` entries: directories of 50-200 entries, files
    /// from empty to 64 KiB (log-uniform, so most are a few KiB as in /usr), text-like
    /// and random contents, and some symlinks.
    pub(crate) fn prepare_small(&self) -> anyhow::Result<Prepared> {
        let total = self.args.entries;
        eprintln!("generating the small-files layer ({total} entries)");
        let dir = self.work.join("small");
        let src = dir.join("src");
        std::fs::create_dir_all(&src)?;
        let mut rng = Rng(self.args.seed ^ 0x5111_a11f_11e5);
        const WORDS: &[&str] = &[
            "import",
            "def",
            "return",
            "self",
            "static",
            "const",
            "int",
            "if",
            "else",
            "struct",
            "usr",
            "lib",
            "python3",
            "debian",
            "copyright",
            "license",
            "the",
        ];
        let mut made = 1; // the root
        let mut dirs: Vec<PathBuf> = vec![src.clone()];
        let mut d = 0usize;
        let mut content = Vec::new();
        while made < total {
            // A new directory under a random existing one, then its entries.
            let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
            let here = parent.join(format!("d{d}"));
            d += 1;
            std::fs::create_dir(&here)?;
            dirs.push(here.clone());
            made += 1;
            let n = (50 + rng.below(150) as usize).min(total - made);
            for i in 0..n {
                let roll = rng.below(100);
                let path = here.join(format!("f{i}.{}", ["py", "so", "h", "txt"][i % 4]));
                if roll < 5 && i > 0 {
                    std::os::unix::fs::symlink(format!("f{}.py", (i - 1) & !3), &path)?;
                } else {
                    let size = log_uniform(&mut rng, 64 << 10);
                    content.clear();
                    if roll < 60 {
                        while content.len() < size {
                            let w = WORDS[rng.below(WORDS.len() as u64) as usize];
                            content.extend_from_slice(w.as_bytes());
                            content.push(if rng.below(8) == 0 { b'\n' } else { b' ' });
                        }
                        content.truncate(size);
                    } else {
                        content.resize(size, 0);
                        rng.fill(&mut content);
                    }
                    std::fs::write(&path, &content)?;
                }
                made += 1;
            }
        }
        let (blobs, extracted) = tar_convert_extract(&src, &dir, &[OutputFormat::Estargz])?;
        Ok(Prepared {
            estargz: blobs[0].clone(),
            zstd: None,
            extracted,
            sha256: None,
        })
    }
}

/// Log-uniform in `0..=hi`, with a tenth of the files empty.
fn log_uniform(rng: &mut Rng, hi: u64) -> usize {
    if rng.below(10) == 0 {
        return 0;
    }
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ((hi as f64).ln() * u).exp() as usize
}
