//! What a run of lazysnap-bench writes: every run as CSV, medians (with min-max) as a
//! Markdown table with the ratios the issue's targets are stated in (to the full pull and
//! lazysnap / stargz-snapshotter), a summary table of the three side by side, and an SVG
//! chart of cold-start time per image, form and mode, stacked by phase. Where lazysnap ran
//! a form, its access log gives the floor ([`super::floor`]): each run's time against it.

use std::fmt::Write as _;
use std::time::Duration;

use super::floor::{self, FloorBytes, LinkRate};
use super::memory::Memory;
use crate::stats::Samples;

/// One measured cold start.
#[derive(Clone, Debug)]
pub struct Run {
    pub image: String,
    /// `gzip`, `esgz`, `esgz-opt`, `zstd`, `esgz-ctr`, `esgz-ctr-opt`, `zstd-ctr`.
    pub form: String,
    /// [`OVERLAYFS`] (full pull), [`LAZYSNAP`] or [`STARGZ`].
    pub mode: String,
    pub rep: usize,
    pub pull: Duration,
    pub create: Duration,
    /// From the task's start to its first output line.
    pub first_line: Duration,
    /// From the task's start to its exit.
    pub run: Duration,
    /// Bytes the registry sent from the pull's start to the container's exit.
    pub bytes_served: u64,
    /// Sum of the layers' compressed sizes in this form.
    pub image_bytes: u64,
    /// Range requests for the image's layers: lazysnapd's count, the registry's 206
    /// answers for the peer (0 for the full pull).
    pub range_requests: u64,
    /// Layers mounted lazily, of all (`None` for the full pull).
    pub lazy_layers: Option<(usize, usize)>,
    pub last_line: String,
    /// lazysnap's runs: what a perfect lazy snapshotter would have fetched for this run
    /// (from lazysnapd's access log and the form's TOCs); `None` for the other modes.
    pub floor: Option<FloorBytes>,
    /// The lazy snapshotter daemon's memory right after the container's exit (lazysnapd
    /// with its fd holder; the peer); `None` for the full pull.
    pub daemon_memory: Option<Memory>,
    /// The daemon's resident memory a few seconds after the exit, with nothing to do.
    pub daemon_settled_rss: Option<u64>,
}

/// The modes: the full pull onto overlayfs, and the two lazy snapshotters.
pub const OVERLAYFS: &str = "overlayfs";
pub const LAZYSNAP: &str = "lazysnap";
pub const STARGZ: &str = "stargz-snapshotter";

impl Run {
    /// Cold start: pull, create, and run to the container's exit.
    pub fn total(&self) -> Duration {
        self.pull + self.create + self.run
    }
}

pub const CSV_HEADER: &str = "image,form,mode,rep,pull_s,create_s,first_line_s,run_s,total_s,bytes_served,image_bytes,range_requests,lazy_layers,layers,last_line,floor_read_bytes,floor_bytes,floor_s,vs_floor,daemon_rss_bytes,daemon_peak_bytes,daemon_settled_rss_bytes";

/// One run as a CSV line. `floor_s` is the floor of the run's image and form (the median
/// over lazysnap's runs of it): the last columns are empty without one. The run's own
/// floor bytes (lazysnap's runs only): the chunks its reads touched, and all counted.
pub fn csv_line(r: &Run, floor_s: Option<f64>) -> String {
    let (lazy, layers) = r
        .lazy_layers
        .map_or((String::new(), String::new()), |(l, n)| {
            (l.to_string(), n.to_string())
        });
    let (read, counted) = r.floor.map_or((String::new(), String::new()), |f| {
        (f.chunks.to_string(), f.total().to_string())
    });
    let (floor_s, vs) = floor_s.map_or((String::new(), String::new()), |f| {
        (
            format!("{f:.3}"),
            format!("{:.3}", r.total().as_secs_f64() / f.max(1e-9)),
        )
    });
    let (rss, peak) = r.daemon_memory.map_or((String::new(), String::new()), |m| {
        (m.rss.to_string(), m.peak.to_string())
    });
    let settled = r
        .daemon_settled_rss
        .map_or(String::new(), |b| b.to_string());
    format!(
        "{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{},{},{},\"{}\",{read},{counted},{floor_s},{vs},{rss},{peak},{settled}",
        r.image,
        r.form,
        r.mode,
        r.rep,
        r.pull.as_secs_f64(),
        r.create.as_secs_f64(),
        r.first_line.as_secs_f64(),
        r.run.as_secs_f64(),
        r.total().as_secs_f64(),
        r.bytes_served,
        r.image_bytes,
        r.range_requests,
        lazy,
        layers,
        r.last_line.replace('"', "'")
    )
}

/// Every run, with the floor of its image and form where lazysnap's runs of it give one.
pub fn csv(runs: &[Run], link: Option<&LinkRate>) -> String {
    let groups = groups(runs);
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for r in runs {
        let f = link.and_then(|l| floor_secs(&groups, &r.image, &r.form, l));
        out.push_str(&csv_line(r, f));
        out.push('\n');
    }
    out
}

/// The floor's bytes of an image and form: the median over lazysnap's runs of it.
fn floor_bytes_of(groups: &[Group], image: &str, form: &str) -> Option<u64> {
    let g = groups
        .iter()
        .find(|g| g.image == image && g.form == form && g.mode == LAZYSNAP)?;
    median(&g.floor_bytes)
}

/// The floor in seconds of an image and form on `link` (see [`super::floor`]).
pub fn floor_secs(groups: &[Group], image: &str, form: &str, link: &LinkRate) -> Option<f64> {
    floor_bytes_of(groups, image, form).map(|b| floor::floor_secs(b, link))
}

fn median(v: &[u64]) -> Option<u64> {
    let mut b = v.to_vec();
    b.sort_unstable();
    match b.len() {
        0 => None,
        n if n % 2 == 1 => Some(b[n / 2]),
        n => Some((b[n / 2 - 1] + b[n / 2]) / 2),
    }
}

/// The runs of one image in one form and mode, summarised.
pub struct Group {
    pub image: String,
    pub form: String,
    pub mode: String,
    pub pull: Samples,
    pub create: Samples,
    pub first_line: Samples,
    pub run: Samples,
    pub total: Samples,
    pub bytes: Vec<u64>,
    pub image_bytes: u64,
    /// Per run: layers mounted lazily, of all.
    pub lazy_layers: Vec<(usize, usize)>,
    /// Per lazysnap run: the floor's bytes ([`FloorBytes::total`]).
    pub floor_bytes: Vec<u64>,
    /// Per lazy run: the daemon's resident and peak memory, bytes.
    pub daemon_rss: Vec<u64>,
    pub daemon_peak: Vec<u64>,
    /// Per lazy run: the daemon's resident memory a few seconds later, bytes.
    pub daemon_settled: Vec<u64>,
}

impl Group {
    pub fn median_bytes(&self) -> u64 {
        median(&self.bytes).unwrap_or(0)
    }

    /// "41 (57); 30": the daemon's median resident memory after the exit, its median
    /// peak, and its median resident memory a few seconds later, in MB; "-" without.
    fn memory_summary(&self) -> String {
        let settled =
            median(&self.daemon_settled).map_or(String::new(), |s| format!("; {}", mb0(s)));
        match (median(&self.daemon_rss), median(&self.daemon_peak)) {
            (Some(rss), Some(peak)) => format!("{} ({}){settled}", mb0(rss), mb0(peak)),
            _ => "-".to_string(),
        }
    }

    /// "4/4", or "0/4 (full pull)" when the snapshotter mounted none lazily (the fewest
    /// over the runs); empty for the full pull.
    pub fn lazy_summary(&self) -> String {
        match self.lazy_layers.iter().min() {
            None => String::new(),
            Some(&(0, n)) => format!("0/{n} (full pull)"),
            Some(&(l, n)) => format!("{l}/{n}"),
        }
    }

    /// True when no layer of any run was mounted lazily: the snapshotter fell back to
    /// downloading and unpacking the image.
    pub fn fell_back(&self) -> bool {
        !self.lazy_layers.is_empty() && self.lazy_layers.iter().all(|&(l, _)| l == 0)
    }
}

/// Groups in the order first seen (images, then forms and modes as run).
pub fn groups(runs: &[Run]) -> Vec<Group> {
    let mut out: Vec<Group> = Vec::new();
    for r in runs {
        let i = match out
            .iter()
            .position(|g| g.image == r.image && g.form == r.form && g.mode == r.mode)
        {
            Some(i) => i,
            None => {
                out.push(Group {
                    image: r.image.clone(),
                    form: r.form.clone(),
                    mode: r.mode.clone(),
                    pull: Samples::default(),
                    create: Samples::default(),
                    first_line: Samples::default(),
                    run: Samples::default(),
                    total: Samples::default(),
                    bytes: Vec::new(),
                    image_bytes: r.image_bytes,
                    lazy_layers: Vec::new(),
                    floor_bytes: Vec::new(),
                    daemon_rss: Vec::new(),
                    daemon_settled: Vec::new(),
                    daemon_peak: Vec::new(),
                });
                out.len() - 1
            }
        };
        let g = &mut out[i];
        g.pull.push(r.pull);
        g.create.push(r.create);
        g.first_line.push(r.first_line);
        g.run.push(r.run);
        g.total.push(r.total());
        g.bytes.push(r.bytes_served);
        g.lazy_layers.extend(r.lazy_layers);
        g.floor_bytes.extend(r.floor.map(|f| f.total()));
        g.daemon_rss.extend(r.daemon_memory.map(|m| m.rss));
        g.daemon_peak.extend(r.daemon_memory.map(|m| m.peak));
        g.daemon_settled.extend(r.daemon_settled_rss);
    }
    out
}

/// The group of the same image and form run by `mode`.
fn peer_of<'a>(groups: &'a [Group], g: &Group, mode: &str) -> Option<&'a Group> {
    groups
        .iter()
        .find(|b| b.image == g.image && b.form == g.form && b.mode == mode)
}

/// `a / b` of the median cold starts, as "0.62x".
fn time_ratio(a: &Group, b: &Group) -> String {
    format!(
        "{:.2}x",
        a.total.median().as_secs_f64() / b.total.median().as_secs_f64().max(1e-9)
    )
}

/// `a / b` of the median bytes served, as "0.62x".
fn bytes_ratio(a: &Group, b: &Group) -> String {
    format!(
        "{:.2}x",
        a.median_bytes() as f64 / b.median_bytes().max(1) as f64
    )
}

fn secs(s: &Samples) -> String {
    if s.0.len() > 1 {
        format!(
            "{:.2} ({:.2}-{:.2})",
            s.median().as_secs_f64(),
            s.min().as_secs_f64(),
            s.max().as_secs_f64()
        )
    } else {
        format!("{:.2}", s.median().as_secs_f64())
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

fn mb0(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / 1e6)
}

/// The Markdown tables. The first: every image, form and mode, medians (min-max) in
/// seconds; the cold start against the same image's overlayfs full pull and, for
/// lazysnap, against stargz-snapshotter on the same form; bytes served as a share of the
/// gzip image's size. The second: per image and lazy form, the three side by side with
/// lazysnap / stargz-snapshotter for time and bytes. Both have the floor of the image and
/// form (from lazysnap's runs of it, on `link`) and each cold start against it.
pub fn markdown(runs: &[Run], heading: &str, link: Option<&LinkRate>) -> String {
    let groups = groups(runs);
    let mut out = String::new();
    let _ = writeln!(out, "{heading}\n");
    let floor_of = |g: &Group| link.and_then(|l| floor_secs(&groups, &g.image, &g.form, l));
    let _ = writeln!(
        out,
        "| image | form | mode | lazy layers | pull s | create s | first line s | run to exit s | cold start s | vs full pull | lazysnap / stargz-snapshotter | MB served | % of gzip image | floor s | vs floor | daemon RSS MB after the exit (peak); 3 s later |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for g in &groups {
        let base = groups
            .iter()
            .find(|b| b.image == g.image && b.mode == OVERLAYFS);
        let ratio = base.map_or("-".to_string(), |b| time_ratio(g, b));
        let vs_peer = match (g.mode.as_str(), peer_of(&groups, g, STARGZ)) {
            (LAZYSNAP, Some(p)) => {
                format!("{} (bytes {})", time_ratio(g, p), bytes_ratio(g, p))
            }
            _ => "-".to_string(),
        };
        let gzip_bytes = base.map_or(g.image_bytes, |b| b.image_bytes);
        let (floor_cell, vs_floor) = floor_of(g).map_or(("-".to_string(), "-".to_string()), |f| {
            (format!("{f:.2}"), vs_floor(g, f))
        });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}% | {floor_cell} | {vs_floor} | {} |",
            g.image,
            g.form,
            g.mode,
            if g.mode == OVERLAYFS {
                "-".to_string()
            } else {
                g.lazy_summary()
            },
            secs(&g.pull),
            secs(&g.create),
            secs(&g.first_line),
            secs(&g.run),
            secs(&g.total),
            ratio,
            vs_peer,
            mb(g.median_bytes()),
            100.0 * g.median_bytes() as f64 / gzip_bytes.max(1) as f64,
            g.memory_summary()
        );
    }
    out.push('\n');
    out.push_str(&summary(&groups, link));
    out.push_str(&soci_summary(&groups));
    out
}

/// The median cold start of `g` over the floor `f`, as "3.10x".
fn vs_floor(g: &Group, f: f64) -> String {
    format!("{:.2}x", g.total.median().as_secs_f64() / f.max(1e-9))
}

/// What the floor is, with the link it was measured on.
fn floor_note(link: &LinkRate) -> String {
    format!(
        "The floor is the cold start a perfect lazy snapshotter would need on this link: \
         {} round trips of {:.1} ms (a one-byte GET's request to first byte: the link and the \
         registry; manifest, then config and every TOC at once, then every chunk the \
         workload reads at once) plus the bytes it cannot avoid at {:.2} MB/s (both \
         measured over the link at the start of the run): manifest, config, every layer's \
         compressed TOC, and the compressed chunks the workload's reads touch (lazysnapd's \
         access log mapped through the form's TOCs; the median over lazysnap's runs, applied \
         to both snapshotters). Container create, start and the workload's own CPU time \
         count as zero, so no real run reaches 1.00x. \
         \"Floor + local run\" adds what the same container takes once every byte is on \
         local disk (the full pull's create and run to exit, page cache dropped, same run): \
         the cold start of a snapshotter that fetched at the floor first and then ran as \
         fast as overlayfs, overlapping nothing.",
        floor::ROUND_TRIPS,
        link.rtt.as_secs_f64() * 1e3,
        link.bytes_per_s / 1e6
    )
}

/// Per image and lazy form: full pull, stargz-snapshotter and lazysnap (median cold
/// start in seconds, MB served), lazysnap / stargz-snapshotter, and the floor (seconds,
/// MB counted) with each snapshotter against it.
fn summary(groups: &[Group], link: Option<&LinkRate>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Summary: lazysnap vs stargz-snapshotter vs full pull\n\n\
         Median cold start in seconds (MB served). A \"full pull\" note on a lazy mode: it \
         mounted no layer lazily and downloaded the image instead.\n"
    );
    if let Some(link) = link {
        let _ = writeln!(out, "{}\n", floor_note(link));
    }
    let _ = writeln!(
        out,
        "| image | form | full pull | stargz-snapshotter | lazysnap | lazysnap / stargz-snapshotter, time | bytes | floor s (MB) | lazysnap / floor | stargz-snapshotter / floor | floor + local run s | lazysnap / it | stargz-snapshotter / it | daemon RSS MB after the exit: lazysnap / stargz-snapshotter | 3 s later |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let cell = |g: Option<&Group>| {
        g.map_or("-".to_string(), |g| {
            format!(
                "{:.2} ({} MB){}",
                g.total.median().as_secs_f64(),
                mb(g.median_bytes()),
                if g.fell_back() { ", full pull" } else { "" }
            )
        })
    };
    for g in groups.iter().filter(|g| g.mode != OVERLAYFS) {
        // One row per image and form: on its lazysnap group, or the peer's if alone.
        if g.mode == STARGZ && peer_of(groups, g, LAZYSNAP).is_some() {
            continue;
        }
        let base = groups
            .iter()
            .find(|b| b.image == g.image && b.mode == OVERLAYFS);
        let ours = peer_of(groups, g, LAZYSNAP);
        let theirs = peer_of(groups, g, STARGZ);
        let (t, b) = match (ours, theirs) {
            (Some(o), Some(p)) => (time_ratio(o, p), bytes_ratio(o, p)),
            _ => ("-".to_string(), "-".to_string()),
        };
        let floor = link.and_then(|l| {
            let bytes = floor_bytes_of(groups, &g.image, &g.form)?;
            Some((floor::floor_secs(bytes, l), bytes))
        });
        let against = |f: f64| {
            (
                ours.map_or("-".to_string(), |o| vs_floor(o, f)),
                theirs.map_or("-".to_string(), |p| vs_floor(p, f)),
            )
        };
        let dash = || ("-".to_string(), "-".to_string(), "-".to_string());
        let (floor_cell, ours_floor, theirs_floor) = floor.map_or_else(dash, |(f, bytes)| {
            let (o, p) = against(f);
            (format!("{f:.2} ({})", mb(bytes)), o, p)
        });
        let local_run = base.map(|b| (b.create.median() + b.run.median()).as_secs_f64());
        let (with_run, ours_with_run, theirs_with_run) = match (floor, local_run) {
            (Some((f, _)), Some(r)) => {
                let (o, p) = against(f + r);
                (format!("{:.2}", f + r), o, p)
            }
            _ => dash(),
        };
        let side_by_side =
            |pick: fn(&Group) -> Option<u64>| match (ours.and_then(pick), theirs.and_then(pick)) {
                (Some(o), Some(p)) => format!(
                    "{} / {} ({:.2}x)",
                    mb0(o),
                    mb0(p),
                    o as f64 / p.max(1) as f64
                ),
                _ => "-".to_string(),
            };
        let memory = side_by_side(|g| median(&g.daemon_rss));
        let settled = side_by_side(|g| median(&g.daemon_settled));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {t} | {b} | {floor_cell} | {ours_floor} | {theirs_floor} | {with_run} | {ours_with_run} | {theirs_with_run} | {memory} | {settled} |",
            g.image,
            g.form,
            cell(base),
            cell(theirs),
            cell(ours)
        );
    }
    out
}

/// The SOCI forms (the gzip image with an index, pulled lazily by lazysnap) against the
/// full pull of the same image and lazysnap's own eStargz form of it; empty without them.
fn soci_summary(groups: &[Group]) -> String {
    let soci: Vec<&Group> = groups
        .iter()
        .filter(|g| g.form.starts_with("gzip-soci") && g.mode == LAZYSNAP)
        .collect();
    if soci.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n## SOCI: the gzip image indexed, pulled lazily by lazysnap\n\n\
         Median cold start in seconds (MB served); `gzip-soci` is indexed by `lazysnap \
         convert --soci`, `gzip-soci-ref` by soci's own code.\n\n\
         | image | form | SOCI | full pull | SOCI / full pull | lazysnap eStargz | SOCI / eStargz | bytes SOCI / eStargz |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let cell = |g: Option<&Group>| {
        g.map_or("-".to_string(), |g| {
            format!(
                "{:.2} ({} MB)",
                g.total.median().as_secs_f64(),
                mb(g.median_bytes())
            )
        })
    };
    for g in soci {
        let full = groups
            .iter()
            .find(|b| b.image == g.image && b.mode == OVERLAYFS);
        let esgz = groups
            .iter()
            .find(|b| b.image == g.image && b.form == "esgz" && b.mode == LAZYSNAP);
        let ratio = |b: Option<&Group>| b.map_or("-".to_string(), |b| time_ratio(g, b));
        let bytes = esgz.map_or("-".to_string(), |e| bytes_ratio(g, e));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {bytes} |",
            g.image,
            g.form,
            cell(Some(g)),
            cell(full),
            ratio(full),
            cell(esgz),
            ratio(esgz)
        );
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar per image, form and mode: pull, create, run to first line, rest of
/// the run (medians), grouped by image, a mark of the mode's colour before each bar, and
/// after it the total, the ratio to the full pull and, on lazysnap's bars, the ratio to
/// stargz-snapshotter's on the same form.
pub fn svg(runs: &[Run], title: &str) -> String {
    let groups = groups(runs);
    const PHASES: [(&str, &str); 4] = [
        ("pull", "#4e79a7"),
        ("create", "#f28e2b"),
        ("run to first line", "#59a14f"),
        ("rest of run to exit", "#b07aa1"),
    ];
    const MODES: [(&str, &str); 3] = [
        (OVERLAYFS, "#9c9c9c"),
        (STARGZ, "#edc948"),
        (LAZYSNAP, "#e15759"),
    ];
    let mode_colour = |mode: &str| {
        MODES
            .iter()
            .find(|(m, _)| *m == mode)
            .map_or("#000000", |(_, c)| *c)
    };
    let (left, bar_h, gap, width) = (300.0, 22.0, 8.0, 1180.0);
    let plot_w = width - left - 290.0;
    let max = groups
        .iter()
        .map(|g| g.total.median().as_secs_f64())
        .fold(0.0f64, f64::max)
        .max(0.001);
    let mut images: Vec<&str> = Vec::new();
    for g in &groups {
        if !images.contains(&g.image.as_str()) {
            images.push(&g.image);
        }
    }
    let rows = groups.len() as f64;
    let height = 90.0 + rows * (bar_h + gap) + images.len() as f64 * 24.0 + 60.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="24" font-size="16" font-weight="bold">{}</text>"#,
        escape(title)
    );
    // Legend.
    let mut x = 10.0;
    for (name, colour) in PHASES {
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="36" width="14" height="14" fill="{colour}"/><text x="{}" y="48">{name}</text>"#,
            x + 18.0
        );
        x += 30.0 + 8.0 * name.len() as f64;
    }
    let mut x = 10.0;
    for (name, colour) in MODES {
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="58" width="6" height="14" fill="{colour}"/><text x="{}" y="70">{name}</text>"#,
            x + 10.0
        );
        x += 30.0 + 8.0 * name.len() as f64;
    }
    let mut y = 90.0;
    for image in &images {
        let _ = writeln!(
            out,
            r#"<text x="10" y="{}" font-weight="bold">{}</text>"#,
            y + 14.0,
            escape(image)
        );
        y += 24.0;
        let base = groups
            .iter()
            .find(|b| b.image == *image && b.mode == "overlayfs")
            .map(|b| b.total.median().as_secs_f64());
        for g in groups.iter().filter(|g| g.image == *image) {
            let label = if g.fell_back() {
                format!("{} ({}, full pull)", g.form, g.mode)
            } else {
                format!("{} ({})", g.form, g.mode)
            };
            let _ = writeln!(
                out,
                r#"<text x="20" y="{}">{}</text><rect x="{}" y="{y}" width="6" height="{bar_h}" fill="{}"/>"#,
                y + 15.0,
                escape(&label),
                left - 10.0,
                mode_colour(&g.mode)
            );
            let first = g.first_line.median().as_secs_f64();
            let run = g.run.median().as_secs_f64();
            let parts = [
                g.pull.median().as_secs_f64(),
                g.create.median().as_secs_f64(),
                first.min(run),
                (run - first).max(0.0),
            ];
            let mut bx = left;
            for (value, (name, colour)) in parts.iter().zip(PHASES) {
                let w = value / max * plot_w;
                let _ = writeln!(
                    out,
                    r#"<rect x="{bx:.1}" y="{y}" width="{w:.1}" height="{bar_h}" fill="{colour}"><title>{name}: {value:.2} s</title></rect>"#
                );
                bx += w;
            }
            let total = g.total.median().as_secs_f64();
            let mut ratio = base.map_or(String::new(), |b| {
                format!("  {:.2}x full pull", total / b.max(1e-9))
            });
            if g.mode == LAZYSNAP
                && let Some(p) = peer_of(&groups, g, STARGZ)
            {
                let _ = write!(ratio, ", {} stargz", time_ratio(g, p));
            }
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{}">{total:.1} s{ratio}</text>"#,
                bx + 6.0,
                y + 15.0
            );
            y += bar_h + gap;
        }
    }
    // Axis with ticks at round seconds.
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]
        .into_iter()
        .find(|s| max / s <= 8.0)
        .unwrap_or(600.0);
    let axis_y = y + 6.0;
    let _ = writeln!(
        out,
        r#"<line x1="{left}" y1="{axis_y}" x2="{}" y2="{axis_y}" stroke="black"/>"#,
        left + plot_w
    );
    let mut t = 0.0;
    while t <= max + 1e-9 {
        let tx = left + t / max * plot_w;
        let _ = writeln!(
            out,
            r#"<line x1="{tx:.1}" y1="{axis_y}" x2="{tx:.1}" y2="{}" stroke="black"/><text x="{tx:.1}" y="{}" text-anchor="middle">{t}</text>"#,
            axis_y + 5.0,
            axis_y + 19.0
        );
        t += step;
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds (median; cold start = pull + create + run to exit)</text>"#,
        left + plot_w / 2.0,
        axis_y + 38.0
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(form: &str, mode: &str, total_ms: u64, bytes: u64) -> Run {
        let lazy_layers = (mode != OVERLAYFS).then_some((2, 2));
        Run {
            image: "img".into(),
            form: form.into(),
            mode: mode.into(),
            rep: 1,
            pull: Duration::from_millis(total_ms / 2),
            create: Duration::ZERO,
            first_line: Duration::from_millis(total_ms / 4),
            run: Duration::from_millis(total_ms / 2),
            bytes_served: bytes,
            image_bytes: 1000,
            range_requests: 0,
            lazy_layers,
            last_line: "ok".into(),
            floor: None,
            daemon_memory: None,
            daemon_settled_rss: None,
        }
    }

    #[test]
    fn soci_forms_are_set_against_the_full_pull_and_estargz() {
        let runs = vec![
            run("gzip", OVERLAYFS, 10_000, 1000),
            run("esgz", LAZYSNAP, 2_000, 100),
            run("gzip-soci", LAZYSNAP, 3_000, 200),
        ];
        let md = markdown(&runs, "# t", None);
        let row = md
            .lines()
            .find(|l| l.starts_with("| img | gzip-soci | 3.00"))
            .unwrap_or_else(|| panic!("{md}"));
        assert!(
            row.contains("| 1.50x |") && row.contains("| 2.00x |"),
            "{row}"
        );
        assert!(!markdown(&runs[..2], "# t", None).contains("## SOCI"));
    }

    #[test]
    fn table_has_ratios_against_the_full_pull() {
        let runs = [
            run("gzip", "overlayfs", 10_000, 1000),
            run("esgz", "lazysnap", 2_000, 100),
        ];
        let md = markdown(&runs, "# t", None);
        assert!(md.contains("| img | esgz | lazysnap | 2/2 |"), "{md}");
        assert!(md.contains("0.20x"), "{md}");
        assert!(md.contains("10.0% |"), "{md}");
        let chart = svg(&runs, "t");
        assert!(chart.starts_with("<svg") && chart.contains("0.20x"));
        assert_eq!(csv(&runs, None).lines().count(), 3);
    }

    #[test]
    fn lazysnap_is_set_against_stargz_snapshotter_on_the_same_form() {
        let mut fallback = run("zstd", STARGZ, 8_000, 1000);
        fallback.lazy_layers = Some((0, 2));
        let with_memory = |mut r: Run, rss: u64, peak: u64| {
            r.daemon_memory = Some(Memory { rss, peak });
            r.daemon_settled_rss = Some(rss / 2);
            r
        };
        let runs = [
            run("gzip", OVERLAYFS, 10_000, 1000),
            with_memory(run("esgz", LAZYSNAP, 2_000, 100), 40_000_000, 45_000_000),
            with_memory(run("esgz", STARGZ, 4_000, 400), 50_000_000, 61_000_000),
            run("zstd", LAZYSNAP, 3_000, 150),
            fallback,
        ];
        let md = markdown(&runs, "# t", None);
        // Rows are per mode, not merged per form.
        assert!(
            md.contains("| img | esgz | stargz-snapshotter | 2/2 |"),
            "{md}"
        );
        // lazysnap / stargz: time 2/4, bytes 100/400.
        assert!(md.contains("0.50x (bytes 0.25x)"), "{md}");
        assert!(
            md.contains(
                "| img | esgz | 10.00 (0.0 MB) | 4.00 (0.0 MB) | 2.00 (0.0 MB) | 0.50x | 0.25x | - | - | - | - | - | - | 40 / 50 (0.80x) | 20 / 25 (0.80x) |"
            ),
            "{md}"
        );
        // Each daemon's memory after the exit, with its peak, and a few seconds later.
        assert!(
            md.contains("| 40 (45); 20 |") && md.contains("| 50 (61); 25 |"),
            "{md}"
        );
        // A peer that mounted nothing lazily is reported as the full pull it did.
        assert!(md.contains("0/2 (full pull)"), "{md}");
        assert!(md.contains("8.00 (0.0 MB), full pull"), "{md}");
        let chart = svg(&runs, "t");
        assert!(chart.contains("0.50x stargz"), "{chart}");
        assert!(
            chart.contains("zstd (stargz-snapshotter, full pull)"),
            "{chart}"
        );
        let csv = csv(&runs, None);
        assert!(
            csv.lines()
                .nth(2)
                .unwrap()
                .ends_with(",2,2,\"ok\",,,,,40000000,45000000,20000000"),
            "{csv}"
        );
    }

    fn with_floor(mut r: Run, chunks: u64) -> Run {
        r.floor = Some(FloorBytes {
            meta: 0,
            tocs: 0,
            chunks,
            chunk_count: 1,
            unmatched_files: 0,
        });
        r
    }

    #[test]
    fn the_floor_comes_from_lazysnaps_median_and_applies_to_both() {
        // 12.5 MB/s, no round trip: 12.5, 25 and 50 MB give 1, 2 and 4 s; median 2 s.
        let link = LinkRate {
            bytes_per_s: 12_500_000.0,
            rtt: Duration::ZERO,
        };
        let mut runs = vec![run("gzip", OVERLAYFS, 10_000, 1000)];
        for (rep, chunks) in [(1, 25_000_000), (2, 12_500_000), (3, 50_000_000)] {
            let mut r = with_floor(run("esgz", LAZYSNAP, 3_000, 100), chunks);
            r.rep = rep;
            runs.push(r);
            let mut p = run("esgz", STARGZ, 5_000, 400);
            p.rep = rep;
            runs.push(p);
        }
        // The first table: floor and each mode against it; none for the full pull.
        let md = markdown(&runs, "# t", Some(&link));
        assert!(md.contains("| 2.00 | 1.50x |"), "{md}");
        assert!(md.contains("| 2.00 | 2.50x |"), "{md}");
        assert!(md.contains("100.0% | - | - | - |"), "{md}");
        // The summary: floor with its MB, lazysnap / floor, stargz-snapshotter / floor;
        // then the floor plus the full pull's create and run (0 + 5 s), each against it.
        assert!(
            md.contains("| 0.60x | 0.25x | 2.00 (25.0) | 1.50x | 2.50x | 7.00 | 0.43x | 0.71x |"),
            "{md}"
        );
        assert!(md.contains("3 round trips of 0.0 ms"), "{md}");
        let csv = csv(&runs, Some(&link));
        let lines: Vec<&str> = csv.lines().collect();
        assert!(lines[0].ends_with(
            ",floor_read_bytes,floor_bytes,floor_s,vs_floor,daemon_rss_bytes,daemon_peak_bytes,daemon_settled_rss_bytes"
        ));
        assert!(lines[1].ends_with("\"ok\",,,,,,,"), "{csv}");
        assert!(
            lines[2].ends_with(",25000000,25000000,2.000,1.500,,,"),
            "{csv}"
        );
        assert!(lines[3].ends_with("\"ok\",,,2.000,2.500,,,"), "{csv}");
    }
}
