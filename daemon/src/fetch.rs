//! `lazysnap fetch IMAGE...`: makes images wholly local now, before the background
//! fetch would get there. lazysnapd does the work (`POST /fetch?image=REF` on its status
//! socket, answered when the image is local or a fetch failed); this side asks for each
//! image at once, shows progress from `GET /status` meanwhile, and reports.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use converter::{Progress, human};

use crate::observe::{self, ImageStatus};

#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// Image references, as pulled (`lazysnap rpull`, `ctr`, CRI).
    #[arg(required = true)]
    pub images: Vec<String>,
    /// lazysnapd's root directory.
    #[arg(long, default_value = crate::config::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// No progress bars (they are drawn only on a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
    /// Give up after this many seconds (lazysnapd goes on fetching).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

/// How often progress is read from the status.
const POLL: Duration = Duration::from_millis(250);

/// One image's outcome, for the summary.
#[derive(Debug)]
pub struct Fetched {
    pub image: String,
    /// Its status once done.
    pub status: ImageStatus,
    /// Decompressed bytes fetched for it now.
    pub bytes: u64,
}

/// Runs `lazysnap fetch`: Ok with each image's final status, in the order given, once
/// every image is wholly local; Err naming the images that are not mounted lazily, that
/// failed, or that were not done in time.
pub async fn fetch(args: &FetchArgs) -> anyhow::Result<Vec<Fetched>> {
    let start = Instant::now();
    let mut images: Vec<String> = Vec::new();
    for image in &args.images {
        if !images.contains(image) {
            images.push(image.clone());
        }
    }
    let status = observe::fetch_status(&args.root).await?;
    let find = |status: &observe::Status, image: &str| {
        status.images.iter().find(|i| i.image == image).cloned()
    };
    let missing: Vec<&String> = images
        .iter()
        .filter(|i| find(&status, i).is_none())
        .collect();
    if !missing.is_empty() {
        let mounted: Vec<&str> = status.images.iter().map(|i| i.image.as_str()).collect();
        anyhow::bail!(
            "not mounted lazily by the lazysnapd at {}: {} (pull it with `lazysnap rpull`; images mounted lazily: {})",
            args.root.display(),
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if mounted.is_empty() {
                "none".to_string()
            } else {
                mounted.join(", ")
            }
        );
    }
    let progress = if args.no_progress {
        Progress::quiet()
    } else {
        Progress::auto()
    };
    // One task per image, sized by what is not local yet; advanced as local grows.
    let mut tasks = Vec::new();
    for image in &images {
        let s = find(&status, image).unwrap_or_default();
        let task = progress.task(image, s.total_bytes - s.local_bytes.min(s.total_bytes));
        tasks.push((image.clone(), task, s.local_bytes));
    }
    let mut requests = tokio::task::JoinSet::new();
    for (i, image) in images.iter().enumerate() {
        let (root, image) = (args.root.clone(), image.clone());
        requests.spawn(async move { (i, observe::request_fetch(&root, &image).await) });
    }
    let deadline = args.timeout.map(|t| start + Duration::from_secs(t));
    let mut answers: Vec<Option<anyhow::Result<observe::FetchAnswer>>> =
        images.iter().map(|_| None).collect();
    let mut ticker = tokio::time::interval(POLL);
    while answers.iter().any(Option::is_none) {
        let sleep_until = deadline.map(tokio::time::Instant::from_std);
        tokio::select! {
            joined = requests.join_next() => {
                let Some(joined) = joined else { break };
                let (i, answer) = joined?;
                answers[i] = Some(answer);
            }
            _ = ticker.tick() => {
                if let Ok(now) = observe::fetch_status(&args.root).await {
                    for (image, task, shown) in &mut tasks {
                        if let Some(s) = find(&now, image) && s.local_bytes > *shown {
                            task.inc(s.local_bytes - *shown);
                            *shown = s.local_bytes;
                        }
                    }
                }
            }
            _ = async {
                match sleep_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = observe::fetch_status(&args.root).await.ok();
                let mut pending = Vec::new();
                for ((image, task, _), answer) in tasks.iter().zip(&answers) {
                    if answer.is_some() {
                        continue;
                    }
                    task.finish("timed out");
                    let at = now
                        .as_ref()
                        .and_then(|n| find(n, image))
                        .map_or(String::new(), |s| format!(" ({:.1}% local)", s.percent_local()));
                    pending.push(format!("{image}{at}"));
                }
                anyhow::bail!(
                    "timed out after {}s with {} not wholly local yet; lazysnapd goes on fetching",
                    args.timeout.unwrap_or_default(),
                    pending.join(", ")
                );
            }
        }
    }
    let now = observe::fetch_status(&args.root).await?;
    let mut done = Vec::new();
    let mut failures = Vec::new();
    for ((image, task, _), answer) in tasks.iter().zip(answers) {
        let answer = match answer {
            Some(Ok(a)) => a,
            Some(Err(e)) => {
                task.finish("failed");
                failures.push(format!("{image}: {e:#}"));
                continue;
            }
            None => {
                task.finish("failed");
                failures.push(format!("{image}: no answer from lazysnapd"));
                continue;
            }
        };
        if let Some(error) = &answer.error {
            task.finish("failed");
            failures.push(format!("{image}: {error}"));
            continue;
        }
        let Some(status) = find(&now, image) else {
            task.finish("failed");
            failures.push(format!("{image}: no longer mounted"));
            continue;
        };
        if status.local_bytes < status.total_bytes {
            task.finish("failed");
            failures.push(format!(
                "{image}: only {} of {} local after fetching",
                human(status.local_bytes),
                human(status.total_bytes)
            ));
            continue;
        }
        task.finish("local");
        done.push(Fetched {
            image: image.clone(),
            status,
            bytes: answer.bytes,
        });
    }
    if !failures.is_empty() {
        anyhow::bail!(
            "{} of {} image(s) not made local:\n  {}",
            failures.len(),
            images.len(),
            failures.join("\n  ")
        );
    }
    Ok(done)
}

/// The summary line of one image.
pub fn summary(f: &Fetched, elapsed: Duration) -> String {
    let s = &f.status;
    let offline = if s.offline_ready {
        "offline-ready".to_string()
    } else {
        format!(
            "NOT offline-ready: the metadata of {} of its {} layer(s) is not kept, so a restart needs the registry",
            s.layers.len() - s.metadata_stored_layers.min(s.layers.len()),
            s.layers.len()
        )
    };
    format!(
        "{}: {} of {} local ({:.1}%) in {} lazy layer(s), {} fetched now in {:.1}s; {offline}",
        f.image,
        human(s.local_bytes),
        human(s.total_bytes),
        s.percent_local(),
        s.layers.len(),
        human(f.bytes),
        elapsed.as_secs_f64()
    )
}
