//! The cold-start mode: every image in every form prepared, the link shaped and measured,
//! then the repetitions, the modes alternating; writes the reports.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bench::cold::check_interrupted;
use bench::cold::images::ImageKind;
use bench::cold::link::Link;
use bench::cold::report::{self, Run};

use crate::forms::{Form, Mode};
use crate::{Bench, say};

/// The cold starts of every image, form and mode, `--reps` times; the link (when there
/// is one) is shaped once everything is pushed.
pub(crate) fn run(bench: &Bench, link: Option<&Link>) -> anyhow::Result<()> {
    let args = &bench.args;
    // Build, convert, optimize and push at full speed; only the runs see the link.
    let mut sizes = Vec::new();
    for &kind in &args.images {
        for &form in &args.forms {
            check_interrupted()?;
            say(&format!("preparing {} as {}", kind.name(), form.tag()));
            sizes.push(((kind, form), bench.prepare(kind, form)?));
        }
    }
    let mut conditions = match link {
        Some(link) => {
            let rate = (args.rate_mbit > 0.0).then_some(args.rate_mbit);
            link.shape(rate, Duration::from_secs_f64(args.delay_ms / 1000.0))?;
            format!(
                "emulated link: {} each way, {} ms one-way delay (TUN delay line, tc tbf)",
                rate.map_or("unlimited".to_string(), |r| format!("{r} Mbit/s")),
                args.delay_ms
            )
        }
        None => "no emulated link (registry reached directly)".to_string(),
    };
    say(&conditions);
    // The floor's link: measured once, as the runs will see it.
    let link_rate = match bench.measure_link() {
        Ok(l) => {
            say(&format!(
                "the link measured: {:.2} MB/s, round trip {:.1} ms",
                l.bytes_per_s / 1e6,
                l.rtt.as_secs_f64() * 1e3
            ));
            let _ = write!(
                conditions,
                " (measured: {:.2} MB/s, {:.1} ms round trip)",
                l.bytes_per_s / 1e6,
                l.rtt.as_secs_f64() * 1e3
            );
            Some(l)
        }
        Err(e) => {
            say(&format!(
                "the link could not be measured, so no floor: {e:#}"
            ));
            None
        }
    };

    let reps_of = |kind: ImageKind| match kind {
        ImageKind::RandomPart | ImageKind::ReadAll => args.big_reps.unwrap_or(args.reps),
        _ => args.reps,
    };
    // Per repetition of an image: gzip once (the full pull), each lazy form once per mode.
    let lazysnap_runs = args.modes.iter().filter(|&&m| m == Mode::Lazysnap).count();
    let per_rep: usize = args
        .forms
        .iter()
        .map(|&f| match f {
            Form::Gzip => 1,
            f if f.lazysnap_only() => lazysnap_runs,
            _ => args.modes.len(),
        })
        .sum();
    let total: usize = args.images.iter().map(|&k| reps_of(k)).sum::<usize>() * per_rep;
    let mut runs: Vec<Run> = Vec::new();
    let began = Instant::now();
    let out = args.out();
    let out_csv = out.with_extension("csv");
    if let Some(parent) = out_csv.parent() {
        std::fs::create_dir_all(parent)?;
    }
    for rep in 1..=args.reps.max(args.big_reps.unwrap_or(0)) {
        for &kind in args.images.iter().filter(|&&k| rep <= reps_of(k)) {
            // The modes alternate within a repetition, first one then the other first, so
            // that drift (and whatever a run leaves behind) hits both alike.
            let mut modes: Vec<Option<Mode>> = args.modes.iter().copied().map(Some).collect();
            if rep % 2 == 0 {
                modes.reverse();
            }
            let runs_of = |form: Form| match form {
                Form::Gzip => vec![None],
                f if f.lazysnap_only() => vec![Some(Mode::Lazysnap)]
                    .into_iter()
                    .filter(|m| modes.contains(m))
                    .collect(),
                _ => modes.clone(),
            };
            for (form, mode) in args
                .forms
                .iter()
                .flat_map(|&f| runs_of(f).into_iter().map(move |m| (f, m)))
            {
                check_interrupted()?;
                let n = runs.len() + 1;
                let eta = if runs.is_empty() {
                    String::new()
                } else {
                    let per = began.elapsed() / runs.len() as u32;
                    format!(
                        ", about {:.0} s left",
                        (per * (total - runs.len()) as u32).as_secs_f64()
                    )
                };
                let mode_name = mode.map_or(report::OVERLAYFS, Mode::name);
                say(&format!(
                    "[{n}/{total}] {} {} {mode_name} rep {rep}{eta}",
                    kind.name(),
                    form.tag()
                ));
                let mut r = bench.measure(kind, form, mode, rep)?;
                r.image_bytes = sizes
                    .iter()
                    .find(|(k, _)| *k == (kind, form))
                    .map_or(0, |(_, s)| *s);
                say(&format!(
                    "[{n}/{total}] {} {} {}: pull {:.2} s, create {:.2} s, first line {:.2} s, exit {:.2} s, cold start {:.2} s, {:.1} MB served, {} range requests{}; last line: {}",
                    r.image,
                    r.form,
                    r.mode,
                    r.pull.as_secs_f64(),
                    r.create.as_secs_f64(),
                    r.first_line.as_secs_f64(),
                    r.run.as_secs_f64(),
                    r.total().as_secs_f64(),
                    r.bytes_served as f64 / 1e6,
                    r.range_requests,
                    r.lazy_layers.map_or(String::new(), |(l, n)| format!(
                        ", {l}/{n} layers lazy{}",
                        if l == 0 {
                            " (the snapshotter declined them: a full pull)"
                        } else {
                            ""
                        }
                    )),
                    r.last_line
                ));
                runs.push(r);
                // Written after every run, so an interrupted bench keeps what it measured.
                std::fs::write(&out_csv, report::csv(&runs, link_rate.as_ref()))?;
            }
        }
    }
    let command: Vec<String> = std::env::args().collect();
    let heading = format!(
        "# Cold starts: overlayfs full pull vs lazysnap vs stargz-snapshotter\n\n{conditions}; {} repetitions ({} of the 1 GiB images); \
         medians (min-max) in seconds. Cold start = pull + create + run to exit. Each run on a \
         fresh containerd and snapshotter daemon (empty caches), page cache dropped; lazysnap \
         and stargz-snapshotter alternate within each repetition, both on their default \
         config{}, both pulled by `lazysnap rpull`. Made by:\n\n```sh\n{}\n```",
        args.reps,
        args.big_reps.unwrap_or(args.reps),
        if args.no_background_fetch {
            " (but lazysnapd's background fetch off: --no-background-fetch)"
        } else {
            ""
        },
        command.join(" ")
    );
    std::fs::write(
        out.with_extension("md"),
        report::markdown(&runs, &heading, link_rate.as_ref()),
    )?;
    std::fs::write(
        out.with_extension("svg"),
        report::svg(
            &runs,
            &format!("Cold start per image and mode ({conditions})"),
        ),
    )?;
    say(&format!("wrote {}.{{md,csv,svg}}", out.display()));
    if let Some(link) = link {
        let dropped = link.dropped.load(std::sync::atomic::Ordering::Relaxed);
        if dropped > 0 {
            say(&format!("the delay line dropped {dropped} packets"));
        }
    }
    Ok(())
}
