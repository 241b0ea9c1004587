//! Where every parse of a layer's metadata runs: off the threads that serve gRPC and
//! FUSE, within one memory budget shared by all parses in flight, for at most a set
//! time, and stopped, not only abandoned, when its caller stops waiting (a mount
//! timeout). A hostile layer's TOC then costs a bounded share of the node.

use std::sync::Arc;
use std::time::Duration;

use estargz::Cancel;
use tokio::sync::Semaphore;

use crate::remote::MountError;

/// The memory all parses in flight may reserve by default: one TOC at the format's cap
/// (150 MiB compressed and inflated, 1.5 GB reserved) fits.
pub const DEFAULT_PARSE_MEMORY: u64 = 1536 << 20;

/// Budget units: KiB, so that a u32 of permits covers terabytes.
const UNIT: u64 = 1024;

/// Runs metadata parses within a memory budget and a time limit.
#[derive(Clone)]
pub struct ParseGate {
    budget: Arc<Semaphore>,
    total: u64,
    time_limit: Duration,
}

impl std::fmt::Debug for ParseGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParseGate")
            .field("total", &self.total)
            .field(
                "available",
                &(self.budget.available_permits() as u64 * UNIT),
            )
            .field("time_limit", &self.time_limit)
            .finish()
    }
}

impl ParseGate {
    /// `total` bytes for all parses in flight; each parse may take `time_limit`,
    /// waiting for its share of the budget included.
    pub fn new(total: u64, time_limit: Duration) -> ParseGate {
        let units = (total / UNIT).clamp(1, Semaphore::MAX_PERMITS as u64);
        ParseGate {
            budget: Arc::new(Semaphore::new(units as usize)),
            total: units * UNIT,
            time_limit,
        }
    }

    /// Bytes of the budget not reserved now.
    pub fn available(&self) -> u64 {
        self.budget.available_permits() as u64 * UNIT
    }

    /// Runs `parse` on a blocking thread once `need` bytes of the budget are reserved
    /// (they stay reserved until it returns). `cancel` is set when this future ends or
    /// is dropped, so a parse whose caller gave up stops at its next look at the flag.
    /// `layer` names the layer in errors.
    pub async fn run<T, F>(
        &self,
        layer: &str,
        need: u64,
        cancel: Cancel,
        parse: F,
    ) -> Result<T, MountError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let mb = |b: u64| b.div_ceil(1 << 20);
        if need > self.total {
            return Err(MountError::Layer(format!(
                "layer {layer}: parsing its metadata may take {} MB, more than the {} MB \
                 lazysnapd lets parses in flight take (lazy.parse_memory_mb)",
                mb(need),
                mb(self.total)
            )));
        }
        let _stop = cancel.on_drop();
        let units = u32::try_from(need.div_ceil(UNIT).max(1)).unwrap_or(u32::MAX);
        let work = async {
            let reserved = Arc::clone(&self.budget)
                .acquire_many_owned(units)
                .await
                .map_err(|e| MountError::Mount(format!("parse budget: {e}")))?;
            tokio::task::spawn_blocking(move || {
                let _reserved = reserved;
                parse()
            })
            .await
            .map_err(|e| MountError::Mount(format!("parse task: {e}")))
        };
        match tokio::time::timeout(self.time_limit, work).await {
            Ok(done) => done,
            Err(_) => Err(MountError::Layer(format!(
                "layer {layer}: parsing its metadata took longer than {:?} (lazy.mount_timeout_sec); stopped",
                self.time_limit
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn a_parse_over_the_whole_budget_is_refused_without_running() {
        let gate = ParseGate::new(10 << 20, Duration::from_secs(5));
        let ran = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        let err = gate
            .run("sha256:x", 11 << 20, Cancel::new(), move || {
                flag.store(true, Ordering::SeqCst)
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("parse_memory_mb"), "{err}");
        assert!(!ran.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn parses_wait_for_their_share_and_give_it_back() {
        let gate = ParseGate::new(10 << 20, Duration::from_secs(5));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let first = {
            let gate = gate.clone();
            tokio::spawn(async move {
                gate.run("a", 8 << 20, Cancel::new(), move || rx.recv().unwrap())
                    .await
            })
        };
        while gate.available() > 2 << 20 {
            tokio::task::yield_now().await;
        }
        // The second does not fit beside the first: it waits.
        let second = gate.run("b", 4 << 20, Cancel::new(), || 7);
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut second)
                .await
                .is_err()
        );
        tx.send(()).unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(second.await.unwrap(), 7);
        assert_eq!(gate.available(), 10 << 20);
    }

    #[tokio::test]
    async fn a_parse_past_its_time_is_cancelled_and_its_share_returned() {
        let gate = ParseGate::new(10 << 20, Duration::from_millis(200));
        let cancel = Cancel::new();
        let seen = cancel.clone();
        let started = std::time::Instant::now();
        let err = gate
            .run("sha256:slow", 5 << 20, cancel, move || {
                while !seen.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // The blocking parse saw the flag and returned its share.
        while gate.available() != 10 << 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
