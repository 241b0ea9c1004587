//! convert-bench: converts one generated ~500 MB layer to eStargz with our converter and
//! with stargz-snapshotter's `ctr-remote`, alternating them in one run so both see the
//! same machine noise, and reports times, throughputs and output sizes; then measures
//! TOC parsing and index memory for a 100,000-entry layer.
//!
//! Needs root (it starts a private containerd for ctr-remote), `ctr-remote` (Debian
//! stargz-snapshotter), containerd and the release `lazysnap` binary:
//!
//! ```text
//! CARGO_TARGET_DIR=target-bench cargo build --release -p daemon --bin lazysnap -p bench --bin convert-bench
//! target-bench/release/convert-bench
//! ```
//!
//! Prints a Markdown report and writes it to bench/results/convert.md (`--out`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bench::layergen::{self, TarStats};
use bench::stats::{Samples, mb_per_s};
use clap::Parser;
use estargz::{Index, Layer, OpenOptions, OutputFormat, VecBlob, WriterOptions};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use testkit::containerd::Containerd;
use testkit::ctr_remote::{content_get, image_digest};
use testkit::image::{ImageBuilder, MEDIA_TYPE_LAYER_GZIP};
use testkit::process::run_with_timeout;

/// A 500 MB conversion takes tens of seconds; this only bounds a hang on a loaded box.
const RUN_TIMEOUT: Duration = Duration::from_secs(30 * 60);
const SRC_REF: &str = "bench.local/layer:v1";

#[derive(Parser, Debug)]
#[command(about = "eStargz conversion: lazysnap's converter against ctr-remote")]
struct Args {
    /// Payload of the generated layer's regular files, in MB (10^6 bytes).
    #[arg(long, default_value_t = 500)]
    size_mb: u64,
    /// Seed of the generated layer: the same seed gives the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Timed conversions per converter.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// gzip level, for both converters.
    #[arg(long, default_value_t = 9)]
    level: i32,
    /// Chunk size in bytes, for both converters.
    #[arg(long, default_value_t = 4 << 20)]
    chunk_size: u64,
    /// Entries of the layer for the TOC parse and index memory measurement.
    #[arg(long, default_value_t = 100_000)]
    entries: u64,
    /// Timed TOC parses.
    #[arg(long, default_value_t = 7)]
    toc_runs: usize,
    /// Only the TOC measurement (no containerd, no ctr-remote).
    #[arg(long)]
    toc_only: bool,
    /// Keep inputs here (and reuse a generated layer from an earlier run); default: a
    /// temp dir removed at the end.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// The `lazysnap` binary; default: next to this one.
    #[arg(long)]
    lazysnap: Option<PathBuf>,
    /// Where the Markdown report goes.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results/convert.md"))]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load_before = loadavg();
    let temp;
    let work = match &args.workdir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            // Not /tmp: on some machines it is a small tmpfs; the layout and outputs
            // take a few GB.
            temp = tempfile::Builder::new()
                .prefix("convert-bench")
                .tempdir_in(std::env::temp_dir())?;
            temp.path().to_path_buf()
        }
    };
    let mut report = String::new();
    report.push_str("# eStargz conversion: lazysnap vs ctr-remote\n\n");
    report.push_str(&machine_line(&load_before));
    if !args.toc_only {
        report.push_str(&conversion(&args, &work)?);
    }
    report.push_str(&toc_measurement(&args)?);
    report.push_str(&format!(
        "\nLoad average (1/5/15 min) at start: {load_before}; at end: {}.\n",
        loadavg()
    ));
    print!("{report}");
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, &report)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("report written to {}", args.out.display());
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn machine_line(load: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let argv: Vec<String> = std::env::args().collect();
    format!(
        "Command: `{}` (niceness {}, inherited by containerd, ctr-remote and lazysnap).\n\n\
         Machine: {cores} cores ({cpu}), shared: load average at start {load}. The \
         converters run alternately, so they share whatever else runs.\n\n",
        argv.join(" "),
        niceness()
    )
}

/// This process's nice value (field 19 of /proc/self/stat).
fn niceness() -> String {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses, start at field 3.
            let rest = s.rsplit_once(')')?.1.to_string();
            rest.split_whitespace().nth(16).map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The generated input layer: a gzip tar file and what is known about it.
struct Input {
    gz: PathBuf,
    diff_id: String,
    stats: TarStats,
    gz_bytes: u64,
    generate_time: Option<Duration>,
}

/// Hashes what passes through (the tar's DiffID while it is gzipped).
struct HashTee<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashTee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Generates the layer (gzip level 6, as `docker build` pushes) or reuses one that an
/// earlier run with the same seed and size left in the work dir.
fn input_layer(work: &Path, seed: u64, bytes: u64) -> anyhow::Result<Input> {
    let gz = work.join(format!("layer-s{seed}-{bytes}.tar.gz"));
    let meta = gz.with_extension("json");
    if let (Ok(m), Ok(md)) = (std::fs::read(&meta), std::fs::metadata(&gz)) {
        let v: Value = serde_json::from_slice(&m)?;
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        if n("gz_bytes") == md.len() {
            return Ok(Input {
                diff_id: v["diff_id"].as_str().unwrap_or_default().to_string(),
                stats: TarStats {
                    tar_bytes: n("tar_bytes"),
                    entries: n("entries"),
                    files: n("files"),
                    payload_bytes: n("payload_bytes"),
                    multi_chunk_files: n("multi_chunk_files"),
                },
                gz_bytes: md.len(),
                gz,
                generate_time: None,
            });
        }
    }
    eprintln!("generating a {bytes}-byte layer from seed {seed}...");
    let start = Instant::now();
    let file = File::create(&gz).with_context(|| format!("creating {}", gz.display()))?;
    let enc = flate2::GzBuilder::new()
        .mtime(0)
        .write(BufWriter::new(file), flate2::Compression::new(6));
    let mut tee = HashTee {
        inner: enc,
        hasher: Sha256::new(),
    };
    let stats = layergen::write_tree_tar(&mut tee, seed, bytes)?;
    let diff_id = format!("sha256:{:x}", tee.hasher.finalize());
    let file = tee.inner.finish()?.into_inner()?;
    file.sync_all()?;
    let gz_bytes = std::fs::metadata(&gz)?.len();
    std::fs::write(
        &meta,
        serde_json::to_vec(&serde_json::json!({
            "diff_id": diff_id, "gz_bytes": gz_bytes, "tar_bytes": stats.tar_bytes,
            "entries": stats.entries, "files": stats.files,
            "payload_bytes": stats.payload_bytes, "multi_chunk_files": stats.multi_chunk_files,
        }))?,
    )?;
    Ok(Input {
        gz,
        diff_id,
        stats,
        gz_bytes,
        generate_time: Some(start.elapsed()),
    })
}

/// Writes the one-layer image as an OCI layout (for `lazysnap convert`) and as an OCI
/// archive (for `ctr image import`).
fn write_image(input: &Input, layout: &Path, archive: &Path) -> anyhow::Result<()> {
    let data = std::fs::read(&input.gz)?;
    let layer = testkit::image::Layer::precompressed(data, MEDIA_TYPE_LAYER_GZIP, &input.diff_id);
    let image = ImageBuilder::new().layer(layer).build()?;
    image.write_oci_layout(layout, Some("v1"))?;
    let mut tar = tar::Builder::new(BufWriter::new(File::create(archive)?));
    for name in ["oci-layout", "index.json"] {
        tar.append_path_with_name(layout.join(name), name)?;
    }
    for blob in image.blobs().chain(std::iter::once(&image.manifest)) {
        let name = format!("blobs/sha256/{}", blob.hex());
        tar.append_path_with_name(layout.join(&name), &name)?;
    }
    tar.into_inner()?.into_inner()?.sync_all()?;
    Ok(())
}

/// The converters compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Writer,
    Cli,
    CtrRemote,
}

const TOOLS: [Tool; 3] = [Tool::Writer, Tool::CtrRemote, Tool::Cli];

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Writer => "lazysnap: `estargz::convert`",
            Tool::Cli => "lazysnap: `lazysnap convert` oci→oci",
            Tool::CtrRemote => "ctr-remote `image convert --oci --estargz`",
        }
    }

    fn covers(self) -> &'static str {
        match self {
            Tool::Writer => {
                "in process: reads the gzip layer file, gunzips, converts, writes and fsyncs \
                 the eStargz blob file"
            }
            Tool::Cli => {
                "the whole CLI process: reads the OCI layout, converts via a temp file \
                 (fsync, rename into blobs/), writes config, manifest and index"
            }
            Tool::CtrRemote => {
                "the whole ctr-remote process: reads the layer from containerd's content \
                 store, gunzips it into the store, converts, writes the blob, config and \
                 manifest into the store and creates the image"
            }
        }
    }
}

/// One timed conversion: its time and the layer blob it produced.
struct Run {
    time: Duration,
    size: u64,
    digest: String,
}

fn run_checked(cmd: Command) -> anyhow::Result<String> {
    let what = format!("{cmd:?}");
    let out = run_with_timeout(cmd, RUN_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes dirty pages back before a timed run, so no run pays for the previous one's
/// writeback.
fn sync_disks() -> anyhow::Result<()> {
    run_checked(Command::new("sync")).map(|_| ())
}

fn writer_options(args: &Args) -> WriterOptions {
    WriterOptions {
        format: OutputFormat::Estargz,
        chunk_size: args.chunk_size,
        compression_level: Some(args.level),
        prioritized_files: Vec::new(),
        prefetch_ranges: Default::default(),
        threads: 0,
    }
}

fn run_writer(args: &Args, input: &Input, out: &Path) -> anyhow::Result<(Run, BTreeAnn)> {
    let opts = writer_options(args);
    let start = Instant::now();
    let src = File::open(&input.gz)?;
    let mut dst = BufWriter::with_capacity(1 << 20, File::create(out)?);
    let res = estargz::convert(src, &mut dst, &opts).context("estargz::convert")?;
    dst.into_inner()?.sync_all()?;
    let time = start.elapsed();
    Ok((
        Run {
            time,
            size: res.blob_size,
            digest: res.blob_digest.to_string(),
        },
        res.annotations,
    ))
}

type BTreeAnn = std::collections::BTreeMap<String, String>;

/// The first layer descriptor of the image `index.json` of an OCI layout names.
fn layout_layer(dir: &Path) -> anyhow::Result<Value> {
    let read = |digest: &str| -> anyhow::Result<Value> {
        let hex = digest.trim_start_matches("sha256:");
        let path = dir.join("blobs/sha256").join(hex);
        Ok(serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?)
    };
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let mut m = read(
        index["manifests"][0]["digest"]
            .as_str()
            .context("no manifest")?,
    )?;
    if m.get("manifests").is_some() {
        m = read(
            m["manifests"][0]["digest"]
                .as_str()
                .context("empty index")?,
        )?;
    }
    Ok(m["layers"][0].clone())
}

fn run_cli(args: &Args, lazysnap: &Path, src: &Path, dst: &Path) -> anyhow::Result<Run> {
    let mut cmd = Command::new(lazysnap);
    cmd.arg("convert")
        .arg("--estargz")
        .args(["--compression-level", &args.level.to_string()])
        .args(["--chunk-size", &args.chunk_size.to_string()])
        .arg("--no-progress-bars")
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("oci:{}:v1", dst.display()));
    let start = Instant::now();
    run_checked(cmd)?;
    let time = start.elapsed();
    let layer = layout_layer(dst)?;
    Ok(Run {
        time,
        size: layer["size"].as_u64().context("layer size")?,
        digest: layer["digest"]
            .as_str()
            .context("layer digest")?
            .to_string(),
    })
}

/// The first layer descriptor of image `reference` in containerd's content store.
fn containerd_layer(c: &Containerd, reference: &str) -> anyhow::Result<Value> {
    let get =
        |d: &str| -> anyhow::Result<Value> { Ok(serde_json::from_slice(&content_get(c, d)?)?) };
    let mut m = get(&image_digest(c, reference)?)?;
    if m.get("manifests").is_some() {
        m = get(m["manifests"][0]["digest"]
            .as_str()
            .context("empty index")?)?;
    }
    Ok(m["layers"][0].clone())
}

fn run_ctr_remote(args: &Args, c: &Containerd, dst: &str) -> anyhow::Result<(Run, Value)> {
    let binary = testkit::require_program("ctr-remote", "stargz-snapshotter")?;
    let mut cmd = Command::new(binary);
    cmd.arg("--address")
        .arg(c.address())
        .arg("--namespace")
        .arg(c.namespace())
        .args(["image", "convert", "--oci", "--estargz"])
        .args(["--estargz-compression-level", &args.level.to_string()])
        .args(["--estargz-chunk-size", &args.chunk_size.to_string()])
        .args([SRC_REF, dst]);
    let start = Instant::now();
    run_checked(cmd)?;
    let time = start.elapsed();
    let layer = containerd_layer(c, dst)?;
    Ok((
        Run {
            time,
            size: layer["size"].as_u64().context("layer size")?,
            digest: layer["digest"]
                .as_str()
                .context("layer digest")?
                .to_string(),
        },
        layer,
    ))
}

/// Opens a converted blob with our reader, checking its TOC digest: both converters'
/// outputs must be valid eStargz. Returns the number of index entries.
fn verify_blob(blob: Vec<u8>, toc_digest: Option<&str>) -> anyhow::Result<usize> {
    let opts = OpenOptions {
        expected_toc_digest: toc_digest
            .map(|d| {
                d.parse()
                    .map_err(|e| anyhow::anyhow!("TOC digest {d}: {e}"))
            })
            .transpose()?,
        ..OpenOptions::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let layer = rt.block_on(Layer::open(Arc::new(VecBlob::new(blob)), &opts))?;
    Ok(layer.index().len())
}

#[derive(Default)]
struct Results {
    times: Samples,
    sizes: Vec<u64>,
    digests: Vec<String>,
}

impl Results {
    fn add(&mut self, r: Run) {
        self.times.push(r.time);
        self.sizes.push(r.size);
        self.digests.push(r.digest);
    }
    fn size(&self) -> u64 {
        self.sizes.first().copied().unwrap_or(0)
    }
}

fn conversion(args: &Args, work: &Path) -> anyhow::Result<String> {
    if !testkit::is_root() {
        bail!("convert-bench starts its own containerd for ctr-remote: run it as root");
    }
    testkit::require_program("ctr-remote", "stargz-snapshotter")?;
    let lazysnap = match &args.lazysnap {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory of this binary")?
            .join("lazysnap"),
    };
    if !lazysnap.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p daemon --bin lazysnap` \
             (same CARGO_TARGET_DIR) or pass --lazysnap",
            lazysnap.display()
        );
    }
    let input = input_layer(work, args.seed, args.size_mb * 1_000_000)?;
    let tar_bytes = input.stats.tar_bytes;
    let layout = work.join("src-layout");
    let archive = work.join("src-layout.tar");
    let _ = std::fs::remove_dir_all(&layout);
    write_image(&input, &layout, &archive)?;

    let containerd = Containerd::start()?;
    containerd.ctr_timeout(
        [
            "image",
            "import",
            "--no-unpack",
            "--base-name",
            "bench.local/layer",
            archive.to_str().context("non-UTF-8 work dir")?,
        ],
        RUN_TIMEOUT,
    )?;
    image_digest(&containerd, SRC_REF).context("the imported image")?;

    let mut results: Vec<(Tool, Results)> =
        TOOLS.iter().map(|&t| (t, Results::default())).collect();
    let ours_out = work.join("ours.esgz");
    let mut ours_annotations = BTreeAnn::new();
    let mut theirs_layer = Value::Null;
    for rep in 0..args.reps {
        // Rotate the order each repetition, so no converter always runs first.
        for k in 0..TOOLS.len() {
            let tool = TOOLS[(rep + k) % TOOLS.len()];
            sync_disks()?;
            eprintln!("rep {}: {} (load {})", rep + 1, tool.name(), loadavg());
            let run = match tool {
                Tool::Writer => {
                    let (run, ann) = run_writer(args, &input, &ours_out)?;
                    ours_annotations = ann;
                    run
                }
                Tool::Cli => {
                    let dst = work.join(format!("cli-dst-{rep}"));
                    let _ = std::fs::remove_dir_all(&dst);
                    let run = run_cli(args, &lazysnap, &layout, &dst)?;
                    std::fs::remove_dir_all(&dst)?;
                    run
                }
                Tool::CtrRemote => {
                    let dst = format!("bench.local/layer:esgz-{rep}");
                    let (run, layer) = run_ctr_remote(args, &containerd, &dst)?;
                    theirs_layer = layer;
                    // Drop the result (and, through GC, its blobs) so the next
                    // repetition writes everything anew.
                    if rep + 1 < args.reps {
                        containerd.ctr(["image", "rm", "--sync", dst.as_str()])?;
                    }
                    run
                }
            };
            eprintln!(
                "  {:.2}s, {} bytes, {:.1} MB/s",
                run.time.as_secs_f64(),
                run.size,
                mb_per_s(tar_bytes, run.time)
            );
            results
                .iter_mut()
                .find(|(t, _)| *t == tool)
                .context("tool")?
                .1
                .add(run);
        }
    }

    // Both outputs must be valid eStargz whose TOC digests match their annotations.
    let ours_entries = verify_blob(
        std::fs::read(&ours_out)?,
        ours_annotations
            .get(estargz::TOC_DIGEST_ANNOTATION)
            .map(String::as_str),
    )
    .context("our output does not open")?;
    let theirs_digest = theirs_layer["digest"]
        .as_str()
        .context("ctr-remote layer")?;
    let theirs_entries = verify_blob(
        content_get(&containerd, theirs_digest)?,
        theirs_layer["annotations"][estargz::TOC_DIGEST_ANNOTATION].as_str(),
    )
    .context("ctr-remote's output does not open with our reader")?;

    let get = |t: Tool| results.iter().find(|(x, _)| *x == t).map(|(_, r)| r);
    let theirs = get(Tool::CtrRemote).context("ctr-remote results")?;
    let writer = get(Tool::Writer).context("writer results")?;
    let cli = get(Tool::Cli).context("cli results")?;
    let theirs_tp = mb_per_s(tar_bytes, theirs.times.median());

    let mut md = String::new();
    md.push_str(&format!(
        "## Converting one {:.0} MB layer\n\n\
         Layer: generated from seed {} (`bench::layergen`): {} tar entries, {} regular files \
         ({} over 4 MiB), {} bytes of tar ({:.1} MB) = the uncompressed size that \
         throughputs are computed from; input blob gzip level 6, {} bytes{}.\n\n\
         Both converters: eStargz, gzip level {}, chunk size {} bytes, all cores. {} timed \
         runs each, alternated in one run (order rotated each repetition, `sync` before each \
         run). Inputs and content store in the page cache for both.\n\n",
        tar_bytes as f64 / 1e6,
        args.seed,
        input.stats.entries,
        input.stats.files,
        input.stats.multi_chunk_files,
        tar_bytes,
        tar_bytes as f64 / 1e6,
        input.gz_bytes,
        input
            .generate_time
            .map(|t| format!(" (generated in {:.1}s)", t.as_secs_f64()))
            .unwrap_or_default(),
        args.level,
        args.chunk_size,
        args.reps,
    ));
    md.push_str(
        "| converter | median s | min–max s | MB/s (median) | output bytes | \
         throughput vs ctr-remote | size vs ctr-remote |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (tool, r) in [
        (Tool::Writer, writer),
        (Tool::Cli, cli),
        (Tool::CtrRemote, theirs),
    ] {
        let tp = mb_per_s(tar_bytes, r.times.median());
        md.push_str(&format!(
            "| {} | {:.2} | {:.2}–{:.2} | {:.1} | {} | {:.2}x | {:+.2}% |\n",
            tool.name(),
            r.times.median().as_secs_f64(),
            r.times.min().as_secs_f64(),
            r.times.max().as_secs_f64(),
            tp,
            r.size(),
            tp / theirs_tp,
            (r.size() as f64 / theirs.size() as f64 - 1.0) * 100.0,
        ));
    }
    md.push_str("\nWhat each time covers (wall clock, nothing subtracted):\n\n");
    for tool in TOOLS {
        md.push_str(&format!("- {}: {}.\n", tool.name(), tool.covers()));
    }
    let same = |r: &Results| r.digests.windows(2).all(|w| w[0] == w[1]);
    md.push_str(&format!(
        "\nChecks: our blob is the same in every run ({}) and the CLI writes the same blob \
         ({}); both outputs open with our reader with their TOC digest verified ({} index \
         entries ours, {} ctr-remote's).\n",
        if same(writer) { "yes" } else { "NO" },
        if writer.digests.first() == cli.digests.first() {
            "yes"
        } else {
            "NO"
        },
        ours_entries,
        theirs_entries,
    ));
    let ratio_writer = mb_per_s(tar_bytes, writer.times.median()) / theirs_tp;
    let ratio_cli = mb_per_s(tar_bytes, cli.times.median()) / theirs_tp;
    let size_ratio = writer.size() as f64 / theirs.size() as f64;
    md.push_str(&format!(
        "\nGoals (issue 3, item 6): throughput ≥ 1.5x ctr-remote's: {} ({:.2}x writer, \
         {:.2}x CLI); output ≤ 2% larger: {} ({:+.2}%).\n\n",
        if ratio_writer >= 1.5 && ratio_cli >= 1.5 {
            "**met**"
        } else {
            "**not met**"
        },
        ratio_writer,
        ratio_cli,
        if size_ratio <= 1.02 {
            "**met**"
        } else {
            "**not met**"
        },
        (size_ratio - 1.0) * 100.0,
    ));
    drop(containerd);
    Ok(md)
}

/// Converts a layer of `args.entries` entries, then times TOC parsing and index
/// building on it and reports the index's heap size.
fn toc_measurement(args: &Args) -> anyhow::Result<String> {
    eprintln!("TOC measurement: {} entries", args.entries);
    let mut tar = Vec::new();
    let stats = layergen::write_many_entries_tar(&mut tar, args.seed, args.entries)?;
    let mut blob = Vec::new();
    estargz::convert(tar.as_slice(), &mut blob, &writer_options(args))?;
    drop(tar);
    let blob = bytes::Bytes::from(blob);
    let tail_len = (blob.len() as u64).min(estargz::MAX_FOOTER_FETCH) as usize;
    let footer = estargz::parse_footer(&blob[blob.len() - tail_len..], blob.len() as u64)?;
    let toc_bytes = &blob
        [footer.toc_offset as usize..(footer.toc_offset + footer.toc_compressed_size) as usize];
    let toc_json_len = {
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(toc_bytes));
        let mut entries = a.entries()?;
        let e = entries.next().context("TOC tar has no entry")??;
        e.size()
    };
    let opts = OpenOptions::default();
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let (mut parse, mut build, mut open) =
        (Samples::default(), Samples::default(), Samples::default());
    let mut index: Option<Index> = None;
    let mut toc_entries = 0;
    for _ in 0..args.toc_runs {
        let t = Instant::now();
        let parsed = estargz::parse_toc(&footer, toc_bytes, &opts)?;
        parse.push(t.elapsed());
        toc_entries = parsed.toc.entries.len();
        let t = Instant::now();
        let idx = Index::from_toc(&parsed.toc, footer.payload_end, footer.format)?;
        build.push(t.elapsed());
        drop(parsed);
        index = Some(idx);
        let t = Instant::now();
        let layer = rt.block_on(Layer::open(Arc::new(VecBlob::new(blob.clone())), &opts))?;
        open.push(t.elapsed());
        drop(layer);
    }
    let index = index.context("no TOC run (--toc-runs 0)")?;
    let ms = |s: &Samples| {
        format!(
            "{:.1} | {:.1}–{:.1}",
            s.median().as_secs_f64() * 1e3,
            s.min().as_secs_f64() * 1e3,
            s.max().as_secs_f64() * 1e3
        )
    };
    let mut md = format!(
        "## TOC parse time and index memory: {}-entry layer\n\n\
         Layer: `bench::layergen::write_many_entries_tar` (seed {}): {} tar entries, {} \
         files, converted with the options above; TOC: {} entries, {} bytes of JSON, {} \
         bytes gzipped. Median of {} runs, release build.\n\n\
         | measure | median ms | min–max ms |\n|---|---:|---:|\n",
        stats.entries,
        args.seed,
        stats.entries,
        stats.files,
        toc_entries,
        toc_json_len,
        footer.toc_compressed_size,
        args.toc_runs,
    );
    md.push_str(&format!(
        "| `parse_toc` (gunzip, sha256, JSON → `Toc`) | {} |\n",
        ms(&parse)
    ));
    md.push_str(&format!("| `Index::from_toc` | {} |\n", ms(&build)));
    md.push_str(&format!(
        "| `Layer::open` on a `VecBlob` (footer, both of the above) | {} |\n",
        ms(&open)
    ));
    md.push_str(&format!(
        "\nIndex memory: {} nodes (root included), {} heap bytes ({:.1} MB), {:.1} bytes \
         per entry (`Index::heap_bytes`, `Index::bytes_per_entry`: nodes, chunks, xattrs \
         and the string arena).\n",
        index.len(),
        index.heap_bytes(),
        index.heap_bytes() as f64 / 1e6,
        index.bytes_per_entry(),
    ));
    Ok(md)
}
