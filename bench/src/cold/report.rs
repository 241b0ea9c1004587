//! What a run of lazysnap-bench writes: every run as CSV, medians (with min-max) as a
//! Markdown table with the ratios the issue's targets are stated in (to the full pull and
//! lazysnap / stargz-snapshotter), a summary table of the three side by side, and an SVG
//! chart of cold-start time per image, form and mode, stacked by phase.

use std::fmt::Write as _;
use std::time::Duration;

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

pub const CSV_HEADER: &str = "image,form,mode,rep,pull_s,create_s,first_line_s,run_s,total_s,bytes_served,image_bytes,range_requests,lazy_layers,layers,last_line";

pub fn csv_line(r: &Run) -> String {
    let (lazy, layers) = r
        .lazy_layers
        .map_or((String::new(), String::new()), |(l, n)| {
            (l.to_string(), n.to_string())
        });
    format!(
        "{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{},{},{},\"{}\"",
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

pub fn csv(runs: &[Run]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for r in runs {
        out.push_str(&csv_line(r));
        out.push('\n');
    }
    out
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
}

impl Group {
    pub fn median_bytes(&self) -> u64 {
        let mut b = self.bytes.clone();
        b.sort_unstable();
        match b.len() {
            0 => 0,
            n if n % 2 == 1 => b[n / 2],
            n => (b[n / 2 - 1] + b[n / 2]) / 2,
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

/// The Markdown tables. The first: every image, form and mode, medians (min-max) in
/// seconds; the cold start against the same image's overlayfs full pull and, for
/// lazysnap, against stargz-snapshotter on the same form; bytes served as a share of the
/// gzip image's size. The second: per image and lazy form, the three side by side with
/// lazysnap / stargz-snapshotter for time and bytes.
pub fn markdown(runs: &[Run], heading: &str) -> String {
    let groups = groups(runs);
    let mut out = String::new();
    let _ = writeln!(out, "{heading}\n");
    let _ = writeln!(
        out,
        "| image | form | mode | lazy layers | pull s | create s | first line s | run to exit s | cold start s | vs full pull | lazysnap / stargz-snapshotter | MB served | % of gzip image |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
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
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}% |",
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
            100.0 * g.median_bytes() as f64 / gzip_bytes.max(1) as f64
        );
    }
    out.push('\n');
    out.push_str(&summary(&groups));
    out
}

/// Per image and lazy form: full pull, stargz-snapshotter and lazysnap (median cold
/// start in seconds, MB served), and lazysnap / stargz-snapshotter.
fn summary(groups: &[Group]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Summary: lazysnap vs stargz-snapshotter vs full pull\n\n\
         Median cold start in seconds (MB served). A \"full pull\" note on a lazy mode: it \
         mounted no layer lazily and downloaded the image instead.\n"
    );
    let _ = writeln!(
        out,
        "| image | form | full pull | stargz-snapshotter | lazysnap | lazysnap / stargz-snapshotter, time | bytes |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
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
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {t} | {b} |",
            g.image,
            g.form,
            cell(base),
            cell(theirs),
            cell(ours)
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
        }
    }

    #[test]
    fn table_has_ratios_against_the_full_pull() {
        let runs = [
            run("gzip", "overlayfs", 10_000, 1000),
            run("esgz", "lazysnap", 2_000, 100),
        ];
        let md = markdown(&runs, "# t");
        assert!(md.contains("| img | esgz | lazysnap | 2/2 |"), "{md}");
        assert!(md.contains("0.20x"), "{md}");
        assert!(md.contains("10.0% |"), "{md}");
        let chart = svg(&runs, "t");
        assert!(chart.starts_with("<svg") && chart.contains("0.20x"));
        assert_eq!(csv(&runs).lines().count(), 3);
    }

    #[test]
    fn lazysnap_is_set_against_stargz_snapshotter_on_the_same_form() {
        let mut fallback = run("zstd", STARGZ, 8_000, 1000);
        fallback.lazy_layers = Some((0, 2));
        let runs = [
            run("gzip", OVERLAYFS, 10_000, 1000),
            run("esgz", LAZYSNAP, 2_000, 100),
            run("esgz", STARGZ, 4_000, 400),
            run("zstd", LAZYSNAP, 3_000, 150),
            fallback,
        ];
        let md = markdown(&runs, "# t");
        // Rows are per mode, not merged per form.
        assert!(
            md.contains("| img | esgz | stargz-snapshotter | 2/2 |"),
            "{md}"
        );
        // lazysnap / stargz: time 2/4, bytes 100/400.
        assert!(md.contains("0.50x (bytes 0.25x)"), "{md}");
        assert!(
            md.contains(
                "| img | esgz | 10.00 (0.0 MB) | 4.00 (0.0 MB) | 2.00 (0.0 MB) | 0.50x | 0.25x |"
            ),
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
        let csv = csv(&runs);
        assert!(csv.lines().nth(2).unwrap().contains(",2,2,\"ok\""), "{csv}");
    }
}
