//! The order of precedence on a registry host's link, over a simulated link: a serial
//! line with a rate and a one-way delay that two layers of the same host share. The
//! simulation computes when each request's bytes would arrive, so what a demand read
//! waits for is known from the model, not from the machine's speed.

use super::*;

use std::time::Duration;
use tokio::time::Instant;

/// What the simulated link did with one request.
#[derive(Debug, Clone, Copy)]
struct Sent {
    len: u64,
    /// Time its bytes waited behind other requests' bytes.
    queued: Duration,
    /// From asking to having the whole body.
    latency: Duration,
}

struct SimLink {
    /// Bytes per second.
    rate: f64,
    delay: Duration,
    state: Mutex<(Instant, Vec<Sent>)>,
}

impl SimLink {
    fn new(rate: f64, delay: Duration) -> Arc<Self> {
        Arc::new(SimLink {
            rate,
            delay,
            state: Mutex::new((Instant::now(), Vec::new())),
        })
    }

    /// Queues a response of `len` bytes; returns when it has arrived whole.
    fn send(&self, len: u64) -> Instant {
        let now = Instant::now();
        let asked = now + self.delay;
        let mut st = self.state.lock().unwrap();
        let start = asked.max(st.0);
        st.0 = start + Duration::from_secs_f64(len as f64 / self.rate);
        let done = st.0 + self.delay;
        st.1.push(Sent {
            len,
            queued: start - asked,
            latency: done - now,
        });
        done
    }

    fn log(&self) -> Vec<Sent> {
        self.state.lock().unwrap().1.clone()
    }

    fn clear(&self) {
        self.state.lock().unwrap().1.clear();
    }
}

struct SimBlob {
    data: Bytes,
    link: Arc<SimLink>,
}

impl BlobReader for SimBlob {
    fn size(&self) -> BlobFuture<'_, u64> {
        let n = self.data.len() as u64;
        Box::pin(async move { Ok(n) })
    }

    fn read_at(&self, offset: u64, len: u64) -> BlobFuture<'_, Bytes> {
        Box::pin(async move {
            let end = offset.saturating_add(len).min(self.data.len() as u64);
            if offset > end {
                return Err(BlobError::new(BlobErrorKind::OutOfRange, "past the end"));
            }
            tokio::time::sleep_until(self.link.send(end - offset)).await;
            Ok(self.data.slice(offset as usize..end as usize))
        })
    }
}

const RATE: f64 = 8e6;
const BACKGROUND_REQUEST: u64 = 256 << 10;
const SMALL_FILES: usize = 8;

/// A big file first (what the background fetch works on), then small files.
fn layer_blob() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: Vec<u8>| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(MTIME);
        b.append_data(&mut h, path, &data[..]).unwrap();
    };
    add("big", pattern(4 << 20, 31));
    for i in 0..SMALL_FILES {
        add(&format!("small{i}"), pattern(8 << 10, 40 + i as u64));
    }
    convert(&b.into_inner().unwrap(), OutputFormat::Estargz, &[])
}

/// Two layers of one host on one simulated link; the background fetch of both running
/// or not; then a reader reads the small files of the first layer one after another
/// (20 ms apart). Returns what the link did with the reader's requests.
fn demand_reads(background: bool) -> Vec<Sent> {
    let rt = runtime();
    let sim = SimLink::new(RATE, Duration::from_millis(5));
    let data = Bytes::from(layer_blob());
    let config = FsConfig {
        background_request_bytes: BACKGROUND_REQUEST,
        background_quiet: Duration::from_millis(100),
        ..quiet_config()
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::open(CacheConfig {
        dir: dir.path().join("cache"),
        memory_bytes: 64 << 20,
        disk_bytes: 1 << 30,
        max_fill_percent: 100,
    })
    .unwrap();
    let link = crate::Link::for_config(&config);
    let mut layers = Vec::new();
    for _ in 0..2 {
        let blob = Arc::new(SimBlob {
            data: data.clone(),
            link: Arc::clone(&sim),
        });
        let layer = rt.block_on(Layer::open(blob, &Default::default())).unwrap();
        let backing = crate::Backing {
            cache: cache.clone(),
            link: link.clone(),
            handle: rt.handle().clone(),
        };
        layers.push(Arc::new(
            LayerFs::new(Arc::new(layer), backing, config.clone()).unwrap(),
        ));
    }
    sim.clear();
    let mut tasks = Vec::new();
    if background {
        for fs in &layers {
            let fetcher = Arc::clone(fs.fetcher());
            tasks.push(rt.spawn(async move { fetcher.background().await }));
        }
        // Wait until the background fetch is flowing.
        let flowing = || {
            sim.log()
                .iter()
                .filter(|s| s.len >= BACKGROUND_REQUEST / 2)
                .count()
                >= 3
        };
        assert!(testkit::wait_until(Duration::from_secs(20), flowing));
    }
    let fs = &layers[0];
    let before = sim.log().len();
    for i in 0..SMALL_FILES {
        let ino = fs.lookup(1, format!("small{i}").as_bytes()).unwrap().ino;
        let got = rt.block_on(fs.read(ino, 0, 8 << 10)).unwrap();
        assert_eq!(&got[..], &pattern(8 << 10, 40 + i as u64)[..]);
        std::thread::sleep(Duration::from_millis(20));
    }
    let reads: Vec<Sent> = sim.log()[before..]
        .iter()
        .filter(|s| s.len < 64 << 10)
        .copied()
        .collect();
    assert_eq!(reads.len(), SMALL_FILES, "{:?}", sim.log());
    for t in tasks {
        t.abort();
    }
    reads
}

#[test]
fn a_demand_read_waits_for_at_most_one_small_background_request_of_its_host() {
    let alone = demand_reads(false);
    let beside = demand_reads(true);
    let one_request = Duration::from_secs_f64(BACKGROUND_REQUEST as f64 / RATE);
    for (i, (a, b)) in alone.iter().zip(&beside).enumerate() {
        assert_eq!(a.queued, Duration::ZERO, "read {i} alone: {a:?}");
        assert!(
            b.queued <= one_request,
            "read {i} queued behind more than one background request: {b:?}"
        );
        assert!(
            b.latency <= a.latency + one_request,
            "read {i}: {b:?} against {a:?} without the background"
        );
    }
    // Reads that follow one another within the quiet period find the link free: the
    // background (of both layers) holds back until the reader stops.
    for (i, b) in beside.iter().enumerate().skip(1) {
        assert_eq!(b.queued, Duration::ZERO, "read {i}: {b:?}");
    }
}
