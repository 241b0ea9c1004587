//! Per-mount behaviour. The shared cache has its own [`crate::CacheConfig`].

use std::time::Duration;

use crate::error::{Error, Result};

/// How one mounted layer fetches, reads ahead and talks to the kernel. Every field has
/// a documented default ([`FsConfig::default`]).
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Right after mounting, fetch the chunks `lazysnap optimize` marked, or else the
    /// prioritized files (everything before `.prefetch.landmark`), in blob order, in
    /// requests of at most `prefetch_request_bytes`. Default true.
    pub prefetch: bool,
    /// After prefetch, fetch the rest of the layer at low priority so it ends up fully
    /// local (needs the disk cache): only while the registry host's link is quiet (see
    /// [`crate::Link`]). Default true.
    pub background_fetch: bool,
    /// Background fetch budget in compressed bytes per second for each registry host
    /// (all its layers together); `None` is unlimited. Default 50 MB/s.
    pub background_rate_limit: Option<u64>,
    /// Size of one background range request (compressed): small, so that a demand read
    /// that arrives while one is in flight waits for little. Default 1 MiB.
    pub background_request_bytes: u64,
    /// The background fetch of a host's layers starts only after no demand read and no
    /// prefetch has used the host's link for this long, and no layer was mounted: a
    /// starting container reads in bursts, and the gaps between them are not idle
    /// time. Default 2 s.
    pub background_quiet: Duration,
    /// Largest prefetch request (compressed). Several are in flight for a registry host
    /// (`readahead_requests`), one while a reader waits for the network. Default 1 MiB:
    /// requests already in flight when a container's first read comes share the link
    /// with it until they end (with 4 MiB, the python image's first line came 0.7 s
    /// later).
    pub prefetch_request_bytes: u64,
    /// Of each prioritized file, the prefetch takes the chunks that start in its first
    /// this many (uncompressed) bytes; the rest comes when read and with the background
    /// fetch. 0: whole files. Default 32 MiB: on the bench's `ctr-remote`-optimized JRE
    /// the JVM's 129 MB `modules` (2% of it read at the start) no longer holds back the
    /// files after it (5.05 -> 4.46 s, 61.2 -> 35.4 MB); 16 MiB also cut Node.js's
    /// 47 MB `libnode`, two thirds read, and was slower there
    /// (`bench/results/prefetch-file-bytes.md`).
    pub prefetch_file_bytes: u64,
    /// Deadline of one range request: a FUSE read of a chunk that is not local waits at
    /// most this long when the registry is away (down, unreachable, not answering), then
    /// fails with EIO; the next read tries again. Default 15 s: well under what
    /// containerd and the kubelet wait for a container (the kubelet's runtime requests
    /// time out after 2 min), so a container reading a layer whose registry is gone gets
    /// an I/O error it can report instead of hanging until they give up; and long
    /// enough for a 16 MiB range (`max_range_bytes`) over a link of about 10 Mbit/s. A
    /// registry that refuses connections fails sooner, after the registry client's few
    /// quick retries (1 to 1.5 s).
    pub fetch_timeout: Duration,
    /// Largest coalesced on-demand range request (compressed). Default 16 MiB.
    pub max_range_bytes: u64,
    /// Chunks closer than this in the blob are fetched in one request (the bytes in
    /// between are cheaper than a round trip). Default 32 KiB.
    pub coalesce_gap: u64,
    /// On a miss, also fetch the chunks that follow the missed ones in the blob, up to
    /// this many compressed bytes, in a parallel request: they are the neighbouring
    /// files of the same directory, which programs read together (a python import reads
    /// a package's modules one after another). It halves while fewer than a quarter of
    /// the neighbour bytes are then read (a file read at random), down to a sixteenth,
    /// and grows back. 0 turns it off. Default 1 MiB.
    pub neighbour_fetch_bytes: u64,
    /// When a container starts reading a dynamically linked ELF object (a program or
    /// library), the libraries it needs are looked up in the image's layers and fetched
    /// at once instead of one after another as the dynamic linker opens them: each
    /// whole if it is at most this many compressed bytes, else its first chunk (the
    /// rest as the program touches it). A compiled Python module read from its start
    /// gets the same for the modules its top-level code imports. 0 turns both off.
    /// Default 2 MiB.
    pub library_fetch_bytes: u64,
    /// First read-ahead window of a sequential reader (file bytes). Default 4 MiB.
    pub readahead_initial: u64,
    /// The window doubles on every sequential refill up to this. Default 64 MiB.
    pub readahead_max: u64,
    /// Range requests one read-ahead window is split into, fetched in parallel.
    /// Default 4.
    pub readahead_requests: usize,
    /// Serve files that are wholly on disk through FUSE passthrough (kernel 6.9+): the
    /// kernel then reads a local copy directly, at local-disk speed. A file of at least
    /// `passthrough_min_bytes` whose chunks are all on disk is copied into one such file
    /// when it is closed. Without kernel support it is simply not used. Default false:
    /// passthrough needs every open to reach the daemon (an OPEN and a RELEASE per
    /// open), while without it the kernel opens files itself and keeps their page cache,
    /// which is faster for a warm container that opens many files (`lazysnap-bench
    /// --warm`, bench/results/warm.md).
    pub passthrough: bool,
    /// Smallest file served through passthrough. Default 1 MiB (below that a read is a
    /// single FUSE round trip anyway, and each such file would be stored twice).
    pub passthrough_min_bytes: u64,
    /// FUSE session threads, all reading the one /dev/fuse fd. Default 16: a process
    /// asking one question at a time (`ls -l`: two GETXATTR per name) is answered on its
    /// own CPU more often with more threads waiting, instead of paying a wake-up on the
    /// other CPU each way (fs-bench, wide directory).
    pub fuse_threads: usize,
    /// Largest read the kernel is asked for. Default 1 MiB.
    pub max_read: u32,
    /// The kernel's page-cache read-ahead on the mount, at most `max_read`. It is also
    /// the window the kernel reads around a page fault in a mapped file, so it sets how
    /// much of a library one fault asks for: what `lazysnap optimize` records and what
    /// a run then reads must match, and a large window marks (and fetches) most of every
    /// library a command maps. Large sequential reads do not need it: the fetcher reads
    /// ahead itself. Default 128 KiB (the kernel's own default).
    pub kernel_readahead: u32,
    /// How long the kernel may cache attributes and names; the layer is immutable.
    /// Default 24 h.
    pub attr_timeout: Duration,
    /// Source name shown in /proc/mounts. Default "lazysnap".
    pub fsname: String,
    /// FUSE subtype (`fuse.<subtype>`). Default "lazysnap".
    pub subtype: String,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            prefetch: true,
            background_fetch: true,
            background_rate_limit: Some(50_000_000),
            background_request_bytes: 1 << 20,
            background_quiet: Duration::from_secs(2),
            prefetch_request_bytes: 1 << 20,
            prefetch_file_bytes: 32 << 20,
            fetch_timeout: Duration::from_secs(15),
            max_range_bytes: 16 << 20,
            coalesce_gap: 32 << 10,
            neighbour_fetch_bytes: 1 << 20,
            library_fetch_bytes: 2 << 20,
            readahead_initial: 4 << 20,
            readahead_max: 64 << 20,
            readahead_requests: 4,
            passthrough: false,
            passthrough_min_bytes: 1 << 20,
            fuse_threads: 16,
            max_read: 1 << 20,
            kernel_readahead: 128 << 10,
            attr_timeout: Duration::from_secs(24 * 3600),
            fsname: "lazysnap".into(),
            subtype: "lazysnap".into(),
        }
    }
}

impl FsConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Config(what.to_string()));
        if self.background_rate_limit == Some(0) {
            return bad("background_rate_limit of 0 (use background_fetch = false)");
        }
        if self.background_request_bytes == 0
            || self.max_range_bytes == 0
            || self.prefetch_request_bytes == 0
        {
            return bad("request sizes must be positive");
        }
        if self.readahead_requests == 0 || self.readahead_initial > self.readahead_max {
            return bad("readahead_requests must be positive and initial <= max");
        }
        if self.fuse_threads == 0 || self.fuse_threads > 64 {
            return bad("fuse_threads must be 1..=64");
        }
        if self.max_read < 4096 {
            return bad("max_read below 4096");
        }
        if self.fetch_timeout.is_zero() {
            return bad("fetch_timeout of 0");
        }
        for name in [&self.fsname, &self.subtype] {
            if name.is_empty() || name.contains([',', '\0', ' ']) {
                return bad("fsname/subtype must be non-empty without commas or spaces");
            }
        }
        Ok(())
    }
}
