//! What a run varies: the form an image is pushed in, and the lazy snapshotter (mode)
//! that pulls it.

use bench::cold::report;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Form {
    /// The plain gzip image, pulled fully onto overlayfs (`ctr image pull`).
    Gzip,
    /// eStargz without prioritized files, pulled lazily (`lazysnap rpull`).
    Esgz,
    /// eStargz with the files the command read prioritized (`lazysnap optimize`).
    EsgzOpt,
    /// zstd:chunked (`lazysnap convert --zstdchunked`: containers/storage's footer, which
    /// stargz-snapshotter 0.12 cannot read, so it pulls this form fully), pulled lazily.
    Zstd,
    /// eStargz converted by stargz-snapshotter's `ctr-remote image convert --estargz
    /// --oci`, no prioritized files.
    EsgzCtr,
    /// eStargz optimized by `ctr-remote image optimize --oci`, the image's command run
    /// once (in a containerd the bench starts) to find the files to prioritize.
    EsgzCtrOpt,
    /// zstd:chunked converted by `ctr-remote image convert --zstdchunked --oci`
    /// (stargz-snapshotter's own footer, which both snapshotters mount lazily).
    ZstdCtr,
    /// The gzip image itself with a SOCI index by `lazysnap convert --soci` (v2), pulled
    /// lazily by lazysnap (stargz-snapshotter reads no SOCI index: not run with it).
    GzipSoci,
    /// The gzip image with a SOCI index made by soci's own code (`--soci-ref`).
    GzipSociRef,
}

impl Form {
    pub(crate) fn tag(self) -> &'static str {
        match self {
            Form::Gzip => "gzip",
            Form::Esgz => "esgz",
            Form::EsgzOpt => "esgz-opt",
            Form::Zstd => "zstd",
            Form::EsgzCtr => "esgz-ctr",
            Form::EsgzCtrOpt => "esgz-ctr-opt",
            Form::ZstdCtr => "zstd-ctr",
            Form::GzipSoci => "gzip-soci",
            Form::GzipSociRef => "gzip-soci-ref",
        }
    }

    /// Forms only lazysnap pulls lazily (the peer would pull them in full).
    pub(crate) fn lazysnap_only(self) -> bool {
        matches!(self, Form::GzipSoci | Form::GzipSociRef)
    }
}

/// The lazy snapshotters each lazy form is run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Mode {
    /// lazysnapd, on its default config.
    Lazysnap,
    /// stargz-snapshotter (the peer daemon, `--peer`), on its default config.
    StargzSnapshotter,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Lazysnap => report::LAZYSNAP,
            Mode::StargzSnapshotter => report::STARGZ,
        }
    }
}
