//! The Markdown report: one row per measurement, figures as median (min–max).

use std::process::Command;

use crate::Bench;

/// One line of the report.
pub(crate) struct Row {
    pub(crate) what: String,
    pub(crate) unit: &'static str,
    pub(crate) ours: Summary,
    pub(crate) baseline: Option<(String, Summary)>,
    /// Human-readable goal and whether it was met.
    pub(crate) goal: String,
    pub(crate) met: bool,
}

/// Median and range of repeated measurements.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Summary {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Summary {
    pub(crate) fn of(values: &[f64]) -> Summary {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Summary {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }

    fn show(&self) -> String {
        format!(
            "{} ({}–{})",
            fmt_num(self.median),
            fmt_num(self.min),
            fmt_num(self.max)
        )
    }
}

fn fmt_num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

impl Bench<'_> {
    pub(crate) fn report(&self) -> String {
        let mut r = String::new();
        let cmd: Vec<String> = std::env::args().collect();
        r.push_str("# fusefs benchmarks (issue 5, item 8)\n\n");
        r.push_str(&format!(
            "Command: `{}` (as root, release build: `CARGO_TARGET_DIR=target-bench cargo build --release -p bench --bin fs-bench`).\n\n",
            cmd.join(" ")
        ));
        r.push_str(&format!(
            "Machine: {} cores, `uptime` at the end: {}. Seed {}, {} repetitions, ours and \
             baseline alternating; figures are median (min–max).\n\n",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            uptime(),
            self.args.seed,
            self.args.repeat
        ));
        r.push_str("| benchmark | unit | lazysnap | baseline | baseline figure | goal | met |\n");
        r.push_str("|---|---|---|---|---|---|---|\n");
        for row in &self.rows {
            let (bname, bfig) = match &row.baseline {
                Some((n, s)) => (n.clone(), s.show()),
                None => ("—".into(), "—".into()),
            };
            r.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                row.what,
                row.unit,
                row.ours.show(),
                bname,
                bfig,
                row.goal,
                if row.met { "yes" } else { "**no**" }
            ));
        }
        r.push('\n');
        for n in &self.notes {
            r.push_str(&format!("- {n}\n"));
        }
        r
    }
}

fn uptime() -> String {
    Command::new("uptime")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unavailable".into())
}
