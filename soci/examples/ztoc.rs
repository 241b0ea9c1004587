//! zTOCs by hand, for checking them against soci's own tools:
//!
//!   ztoc build LAYER.tar.gz OUT.ztoc [SPAN_SIZE] [BUILD_TOOL]
//!   ztoc read ZTOC LAYER.tar.gz OUTDIR    every regular file, through the zTOC's spans
//!   ztoc list ZTOC                        its spans (`span ID COMPRESSED_START COMPRESSED_END
//!                                         UNCOMPRESSED_START UNCOMPRESSED_END`) and entries
//!                                         (`entry KIND OFFSET SIZE NAME`), one a line
//!
//! `build` defaults to soci's span size (4 MiB) and build tool string, so that its output
//! can be compared byte for byte with `soci create`'s (in UTC).

use std::io::Write;

use soci::layout::Layout;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["build", layer, out, ref rest @ ..] => {
            let span = rest
                .first()
                .map_or(Ok(soci::ztoc_builder::DEFAULT_SPAN_SIZE), |s| s.parse())?;
            let tool = rest.get(1).copied().unwrap_or("AWS SOCI CLI v0.2");
            let started = std::time::Instant::now();
            let z = soci::ztoc_builder::build_ztoc(&std::fs::File::open(layer)?, span, tool)?;
            let bytes = soci::ztoc::encode(&z);
            std::fs::write(out, &bytes)?;
            eprintln!(
                "{} entries, {} spans, {} bytes, {:.3} s",
                z.files.len(),
                z.span_digests.len(),
                bytes.len(),
                started.elapsed().as_secs_f64()
            );
        }
        ["read", ztoc, layer, outdir] => {
            let layout = Layout::check(soci::ztoc::decode(&std::fs::read(ztoc)?)?)?;
            let gz = std::fs::read(layer)?;
            let mut spans = Vec::with_capacity(layout.spans.len());
            for (i, s) in layout.spans.iter().enumerate() {
                let bytes = gz
                    .get(s.compressed.start as usize..s.compressed.end as usize)
                    .ok_or("the layer is shorter than the zTOC says")?;
                spans.push(layout.inflate_span(i, bytes)?);
            }
            let mut files = 0;
            for (i, f) in layout.files.iter().enumerate() {
                if f.kind != "reg" {
                    continue;
                }
                let name = String::from_utf8_lossy(&f.name).into_owned();
                let path = std::path::Path::new(outdir).join(name.trim_start_matches('/'));
                std::fs::create_dir_all(path.parent().ok_or("no parent")?)?;
                let mut out = std::fs::File::create(&path)?;
                for p in layout.pieces(i) {
                    out.write_all(
                        &spans[p.span][p.span_offset as usize..(p.span_offset + p.len) as usize],
                    )?;
                }
                files += 1;
            }
            eprintln!("{files} files from {} spans", layout.spans.len());
        }
        ["list", ztoc] => {
            let layout = Layout::check(soci::ztoc::decode(&std::fs::read(ztoc)?)?)?;
            let mut out = std::io::stdout().lock();
            for (i, s) in layout.spans.iter().enumerate() {
                writeln!(
                    out,
                    "span {i} {} {} {} {}",
                    s.compressed.start, s.compressed.end, s.uncompressed.start, s.uncompressed.end
                )?;
            }
            for f in &layout.files {
                writeln!(
                    out,
                    "entry {} {} {} {}",
                    f.kind,
                    f.uncompressed_offset,
                    f.uncompressed_size,
                    String::from_utf8_lossy(&f.name)
                )?;
            }
        }
        _ => {
            return Err(
                "usage: ztoc build LAYER OUT [SPAN] [TOOL] | ztoc read ZTOC LAYER OUTDIR \
                 | ztoc list ZTOC"
                    .into(),
            );
        }
    }
    Ok(())
}
