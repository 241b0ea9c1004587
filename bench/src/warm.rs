//! lazysnap-bench's warm mode: what the rest of a container's life costs once its image is
//! wholly local. Each pass runs in a new container (as each CI job is one) twice in a row:
//! the first run sees the caches the earlier containers left, the second its own. The
//! passes are timed inside the container, so container creation is not counted.
//!
//! - data: `tar -cf - TREE | wc -c` (every byte of a large tree);
//! - metadata: `find TREE -xdev -printf '%s\n' | wc -l` (an lstat of every entry);
//! - start-up: the image's own command, ten times.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::stats::Samples;

/// One pass of the warm mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pass {
    Data,
    Metadata,
    Startup,
}

pub const PASSES: [Pass; 3] = [Pass::Data, Pass::Metadata, Pass::Startup];

impl Pass {
    pub fn name(self) -> &'static str {
        match self {
            Pass::Data => "data",
            Pass::Metadata => "metadata",
            Pass::Startup => "start-up",
        }
    }

    /// What the pass does, for the report (pipes escaped for a Markdown table).
    pub fn describe(self, tree: &str) -> String {
        match self {
            Pass::Data => format!("`tar -cf - {tree} \\| wc -c`"),
            Pass::Metadata => format!("`find {tree} -xdev -printf '%s\\n' \\| wc -l`"),
            Pass::Startup => "the image's command, ten times".to_string(),
        }
    }

    /// The pass's shell command line; its last output line is kept (a checksum of sorts:
    /// every mode must print the same).
    fn command(self, tree: &str, cmd: &[String]) -> String {
        let tree = quote(tree);
        match self {
            Pass::Data => format!("tar -cf - {tree} 2>/dev/null | wc -c"),
            Pass::Metadata => format!("find {tree} -xdev -printf '%s\\n' | wc -l"),
            Pass::Startup => {
                let cmd: Vec<String> = cmd.iter().map(|a| quote(a)).collect();
                format!(
                    "i=0; while [ $i -lt 10 ]; do {} >/dev/null 2>&1 || exit 1; i=$((i + 1)); done; echo 10",
                    cmd.join(" ")
                )
            }
        }
    }
}

/// Single-quotes `s` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Marks the lines the container script prints for each timed run of a pass.
const MARK: &str = "lsbench-pass";

/// The container's script for `pass`: the pass twice, each timed with the container's
/// own clock (`date +%s%N`, GNU coreutils), one line each:
/// `lsbench-pass RUN NANOSECONDS LAST-OUTPUT-LINE`.
pub fn script(pass: Pass, tree: &str, cmd: &[String]) -> String {
    let command = pass.command(tree, cmd);
    format!(
        "for run in 1 2; do s=$(date +%s%N); out=$( {command} ) || exit 1; e=$(date +%s%N); \
         echo \"{MARK} $run $((e - s)) $(echo \"$out\" | tail -n 1)\"; done"
    )
}

/// The two timed runs of a pass's container, and what the pass printed last.
#[derive(Clone, Debug, PartialEq)]
pub struct Timed {
    pub first: Duration,
    pub second: Duration,
    pub output: String,
}

/// Parses a pass container's output (see [`script`]).
pub fn parse(out: &str) -> Option<Timed> {
    let mut runs = BTreeMap::new();
    for line in out.lines() {
        let mut f = line.split_whitespace();
        if f.next() != Some(MARK) {
            continue;
        }
        let run: u32 = f.next()?.parse().ok()?;
        let ns: u64 = f.next()?.parse().ok()?;
        let output = f.collect::<Vec<_>>().join(" ");
        runs.insert(run, (Duration::from_nanos(ns), output));
    }
    let (first, output) = runs.get(&1)?.clone();
    let (second, _) = runs.get(&2)?.clone();
    Some(Timed {
        first,
        second,
        output,
    })
}

/// One pass in one mode, one repetition.
#[derive(Clone, Debug)]
pub struct WarmRun {
    pub image: String,
    /// `overlayfs`, `lazysnap` or `stargz-snapshotter` (as the cold report names them).
    pub mode: String,
    pub rep: usize,
    pub pass: Pass,
    pub timed: Timed,
    /// lazysnapd's FUSE requests by opcode during the container (empty for the others).
    pub fuse_ops: BTreeMap<String, u64>,
}

impl WarmRun {
    /// The pass's figure: the faster of its two runs (the second usually).
    pub fn best(&self) -> Duration {
        self.timed.first.min(self.timed.second)
    }
}

/// Per-opcode request counts from lazysnapd's Prometheus text
/// (`lazysnap_fuse_operation_duration_seconds_count{op="read"} 12`).
pub fn fuse_op_counts(metrics: &str) -> BTreeMap<String, u64> {
    let prefix = "lazysnap_fuse_operation_duration_seconds_count{op=\"";
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix)?;
            let (op, rest) = rest.split_once('"')?;
            let n = rest.rsplit(' ').next()?.trim().parse::<f64>().ok()?;
            Some((op.to_string(), n as u64))
        })
        .collect()
}

/// `after - before`, per opcode, leaving out those that did not change.
pub fn ops_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(op, n)| (op.clone(), n.saturating_sub(*before.get(op).unwrap_or(&0))))
        .filter(|(_, n)| *n > 0)
        .collect()
}

pub const CSV_HEADER: &str = "image,mode,rep,pass,first_s,second_s,output,fuse_ops";

pub fn csv_line(r: &WarmRun) -> String {
    let ops: Vec<String> = r.fuse_ops.iter().map(|(o, n)| format!("{o}={n}")).collect();
    format!(
        "{},{},{},{},{:.4},{:.4},\"{}\",\"{}\"",
        r.image,
        r.mode,
        r.rep,
        r.pass.name(),
        r.timed.first.as_secs_f64(),
        r.timed.second.as_secs_f64(),
        r.timed.output.replace('"', "'"),
        ops.join(" ")
    )
}

fn samples<'a>(
    runs: impl Iterator<Item = &'a WarmRun>,
    f: impl Fn(&WarmRun) -> Duration,
) -> Samples {
    let mut s = Samples::default();
    for r in runs {
        s.push(f(r));
    }
    s
}

fn cell(s: &Samples) -> String {
    if s.is_empty() {
        return "—".to_string();
    }
    format!(
        "{:.3} ({:.3}–{:.3})",
        s.median().as_secs_f64(),
        s.min().as_secs_f64(),
        s.max().as_secs_f64()
    )
}

fn ratio(a: &Samples, b: &Samples) -> String {
    if a.is_empty() || b.is_empty() || b.median().is_zero() {
        return "—".to_string();
    }
    format!(
        "{:.2}x",
        a.median().as_secs_f64() / b.median().as_secs_f64()
    )
}

/// The warm report: per image and pass, the medians (min–max) of each mode's best run and
/// of its first run in a new container, the ratios to overlayfs, and lazysnapd's FUSE
/// requests per pass container.
pub fn markdown(
    runs: &[WarmRun],
    heading: &str,
    modes: &[&str],
    trees: &[(String, String)],
) -> String {
    let mut out = format!("{heading}\n\n");
    let mut images: Vec<&str> = runs.iter().map(|r| r.image.as_str()).collect();
    images.dedup();
    images.sort();
    images.dedup();
    let lazy_modes: Vec<&str> = modes
        .iter()
        .copied()
        .filter(|m| *m != crate::cold::report::OVERLAYFS)
        .collect();
    for image in images {
        let tree = trees
            .iter()
            .find(|(i, _)| i == image)
            .map_or("/", |(_, t)| t.as_str());
        let _ = writeln!(out, "## {image}\n");
        let mut header = "| pass | run |".to_string();
        let mut rule = "|---|---|".to_string();
        for m in modes {
            let _ = write!(header, " {m} |");
            rule.push_str("---|");
        }
        for m in &lazy_modes {
            let _ = write!(header, " {m} / overlayfs |");
            rule.push_str("---|");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        for pass in PASSES {
            let of = |mode: &str| -> Vec<&WarmRun> {
                runs.iter()
                    .filter(|r| r.image == image && r.pass == pass && r.mode == mode)
                    .collect()
            };
            if runs.iter().all(|r| r.image != image || r.pass != pass) {
                continue;
            }
            let best_of = |m: &str| samples(of(m).into_iter(), WarmRun::best);
            let first_of = |m: &str| samples(of(m).into_iter(), |r| r.timed.first);
            for (label, pick) in [
                ("best of 2", &best_of as &dyn Fn(&str) -> Samples),
                ("first in a new container", &first_of),
            ] {
                let mut row = format!("| {} {} | {label} |", pass.name(), pass.describe(tree));
                for m in modes {
                    let _ = write!(row, " {} |", cell(&pick(m)));
                }
                let base = pick(crate::cold::report::OVERLAYFS);
                for m in &lazy_modes {
                    let _ = write!(row, " {} |", ratio(&pick(m), &base));
                }
                let _ = writeln!(out, "{row}");
            }
        }
        let _ = writeln!(out);
        let lazy: Vec<&WarmRun> = runs
            .iter()
            .filter(|r| r.image == image && !r.fuse_ops.is_empty())
            .collect();
        if !lazy.is_empty() {
            let _ = writeln!(
                out,
                "lazysnapd's FUSE requests per pass container (both runs; median over repetitions):\n"
            );
            let mut ops: Vec<&str> = lazy
                .iter()
                .flat_map(|r| r.fuse_ops.keys().map(String::as_str))
                .collect();
            ops.sort();
            ops.dedup();
            let _ = writeln!(out, "| pass | {} |", ops.join(" | "));
            let _ = writeln!(out, "|---|{}", "---|".repeat(ops.len()));
            for pass in PASSES {
                let of: Vec<&&WarmRun> = lazy.iter().filter(|r| r.pass == pass).collect();
                if of.is_empty() {
                    continue;
                }
                let mut row = format!("| {} |", pass.name());
                for op in &ops {
                    let mut n: Vec<u64> = of
                        .iter()
                        .map(|r| *r.fuse_ops.get(*op).unwrap_or(&0))
                        .collect();
                    n.sort_unstable();
                    let _ = write!(row, " {} |", n[n.len() / 2]);
                }
                let _ = writeln!(out, "{row}");
            }
            let _ = writeln!(out);
        }
        let mut outputs: BTreeMap<(Pass, &str), Vec<&str>> = BTreeMap::new();
        for r in runs.iter().filter(|r| r.image == image) {
            outputs
                .entry((r.pass, r.timed.output.as_str()))
                .or_default()
                .push(r.mode.as_str());
        }
        for pass in PASSES {
            let seen: Vec<_> = outputs.keys().filter(|(p, _)| *p == pass).collect();
            if seen.len() > 1 {
                let _ = writeln!(
                    out,
                    "- **The modes disagree on the {} pass's output**: {:?}",
                    pass.name(),
                    outputs
                        .iter()
                        .filter(|((p, _), _)| *p == pass)
                        .collect::<Vec<_>>()
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_quotes_the_command_and_parse_reads_its_lines() {
        let s = script(
            Pass::Startup,
            "/usr",
            &["/usr/bin/python3".into(), "-c".into(), "print('x')".into()],
        );
        assert!(
            s.contains(r"'/usr/bin/python3' '-c' 'print('\''x'\'')'"),
            "{s}"
        );
        let out = "noise\nlsbench-pass 1 1500000000 10\nlsbench-pass 2 500000000 10\n";
        assert_eq!(
            parse(out),
            Some(Timed {
                first: Duration::from_millis(1500),
                second: Duration::from_millis(500),
                output: "10".into()
            })
        );
        assert_eq!(parse("lsbench-pass 1 5 x\n"), None);
    }

    #[test]
    fn the_script_runs_in_sh_and_times_both_runs() {
        let s = script(Pass::Metadata, env!("CARGO_MANIFEST_DIR"), &[]);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&s)
            .output()
            .unwrap();
        let t = parse(&String::from_utf8_lossy(&out.stdout)).expect("two timed runs");
        let entries: u64 = t.output.parse().unwrap();
        assert!(entries > 3, "{t:?}");
    }

    #[test]
    fn op_counts_come_from_the_histogram_counts() {
        let m = "# HELP x\n\
                 lazysnap_fuse_operation_duration_seconds_bucket{op=\"read\",le=\"0.001\"} 3\n\
                 lazysnap_fuse_operation_duration_seconds_count{op=\"read\"} 12\n\
                 lazysnap_fuse_operation_duration_seconds_count{op=\"open\"} 4\n";
        let before = fuse_op_counts(m);
        assert_eq!(before.get("read"), Some(&12));
        let after: BTreeMap<String, u64> =
            [("read".to_string(), 20), ("open".to_string(), 4)].into();
        assert_eq!(
            ops_between(&before, &after),
            [("read".to_string(), 8)].into()
        );
    }
}
