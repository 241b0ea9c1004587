//! Progress reporting: bars on a terminal, one line per event otherwise, or nothing.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
enum Mode {
    Quiet,
    Lines,
    Bars(MultiProgress),
}

/// Where conversion progress goes. Cheap to clone; shared with conversion threads.
#[derive(Clone)]
pub struct Progress {
    mode: Mode,
}

impl Progress {
    /// Nothing at all (library callers, tests).
    pub fn quiet() -> Self {
        Progress { mode: Mode::Quiet }
    }

    /// Plain lines on stderr (logs, CI).
    pub fn lines() -> Self {
        Progress { mode: Mode::Lines }
    }

    /// Bars on stderr.
    pub fn bars() -> Self {
        Progress {
            mode: Mode::Bars(MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// Bars when stderr is a terminal, lines otherwise.
    pub fn auto() -> Self {
        if std::io::stderr().is_terminal() {
            Self::bars()
        } else {
            Self::lines()
        }
    }

    /// A one-off message (skipped layers, pushed manifests).
    pub fn message(&self, msg: &str) {
        match &self.mode {
            Mode::Quiet => {}
            Mode::Lines => eprintln!("{msg}"),
            Mode::Bars(m) => {
                // Printing through the MultiProgress keeps the bars below the text.
                if m.println(msg).is_err() {
                    eprintln!("{msg}");
                }
            }
        }
    }

    /// A task of `total` bytes (0 when unknown).
    pub fn task(&self, label: &str, total: u64) -> Task {
        let bar = match &self.mode {
            Mode::Quiet => None,
            Mode::Lines => {
                eprintln!("{label}: started ({})", human(total));
                None
            }
            Mode::Bars(m) => {
                let bar = m.add(ProgressBar::new(total));
                let style = ProgressStyle::with_template(
                    "{msg:40} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
                )
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style);
                bar.set_message(label.to_string());
                bar.enable_steady_tick(Duration::from_millis(200));
                Some(bar)
            }
        };
        Task {
            bar,
            lines: matches!(self.mode, Mode::Lines),
            label: label.to_string(),
            start: Instant::now(),
        }
    }
}

/// One layer's (or blob's) progress.
#[derive(Clone)]
pub struct Task {
    bar: Option<ProgressBar>,
    lines: bool,
    label: String,
    start: Instant,
}

impl Task {
    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    pub fn finish(&self, outcome: &str) {
        let secs = self.start.elapsed().as_secs_f64();
        if let Some(bar) = &self.bar {
            bar.finish_with_message(format!("{}: {outcome}", self.label));
        } else if self.lines {
            eprintln!("{}: {outcome} ({secs:.1}s)", self.label);
        }
    }
}

/// `12.3 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human(12), "12 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }
}
