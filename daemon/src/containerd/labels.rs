//! containerd's labels, as its Go client sets them: garbage-collection references
//! between content and snapshots, the labels a remote snapshotter reads to find a layer,
//! chain IDs, and the size limit containerd enforces.

use std::collections::{BTreeMap, HashMap};

use registry::media_types::{DOCKER_CONFIG, OCI_CONFIG};
use registry::{Descriptor, Digest};

// The remote-snapshot labels: one definition, shared with the snapshotter that reads them.
pub use snapshotter::remote::{
    LABEL_CRI_IMAGE_LAYERS, LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_CRI_MANIFEST_DIGEST,
    LABEL_STARGZ_DIGEST, LABEL_STARGZ_LAYERS, LABEL_STARGZ_PREFETCH, LABEL_STARGZ_REFERENCE,
    LABEL_TARGET_REF as LABEL_SNAPSHOT_REF,
};

/// Annotations with this prefix are forwarded to the snapshotter as labels
/// (containerd's `snapshots.FilterInheritedLabels`); the TOC digest is one.
pub const INHERITED_PREFIX: &str = "containerd.io/snapshot/";

pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
pub const LABEL_GC_FLAT: &str = "containerd.io/gc.flat";
pub const LABEL_GC_CONFIG: &str = "containerd.io/gc.ref.content.config";
pub const LABEL_GC_LAYER_PREFIX: &str = "containerd.io/gc.ref.content.l.";
pub const LABEL_GC_MANIFEST_PREFIX: &str = "containerd.io/gc.ref.content.m.";
pub const LABEL_GC_OTHER_PREFIX: &str = "containerd.io/gc.ref.content.";
pub const LABEL_GC_SNAPSHOT_PREFIX: &str = "containerd.io/gc.ref.snapshot.";
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
pub const LABEL_DISTRIBUTION_SOURCE_PREFIX: &str = "containerd.io/distribution.source.";

/// containerd refuses a label whose key and value together exceed this (`labels.Validate`).
pub const MAX_LABEL_SIZE: usize = 4096;
/// OCI chain IDs: the first layer's is its diff ID, then `sha256("<parent> <diff ID>")`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.to_string(),
            Some(parent) => Digest::sha256_of(format!("{parent} {diff_id}").as_bytes()).to_string(),
        };
        out.push(next);
    }
    out
}

/// `key`'s value: as many of `values`, comma-joined, as containerd's label size limit allows
/// (stargz-snapshotter's `appendWithValidation`).
fn bounded_list<'a>(key: &str, values: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for v in values {
        let extra = v.len() + usize::from(!out.is_empty());
        if key.len() + out.len() + extra > MAX_LABEL_SIZE {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(v);
    }
    out
}

/// The labels of the Prepare (and Commit) of layer `i`: inherited annotations, the chain
/// ID, and the stargz and CRI labels that tell a remote snapshotter where the layer is.
pub fn layer_labels(
    image: &str,
    manifest_digest: &str,
    layers: &[Descriptor],
    i: usize,
    chain_id: &str,
    prefetch_size: u64,
) -> BTreeMap<String, String> {
    let layer = &layers[i];
    let mut labels: BTreeMap<String, String> = layer
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(INHERITED_PREFIX) || k.as_str() == LABEL_SNAPSHOT_REF)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let digest = layer.digest.to_string();
    let following: Vec<String> = layers[i..].iter().map(|l| l.digest.to_string()).collect();
    let mut set = |k: &str, v: String| {
        labels.insert(k.to_string(), v);
    };
    set(LABEL_SNAPSHOT_REF, chain_id.to_string());
    set(LABEL_STARGZ_REFERENCE, image.to_string());
    set(LABEL_STARGZ_DIGEST, digest.clone());
    set(
        LABEL_STARGZ_LAYERS,
        bounded_list(LABEL_STARGZ_LAYERS, following.iter().map(String::as_str)),
    );
    set(LABEL_STARGZ_PREFETCH, prefetch_size.to_string());
    set(LABEL_CRI_IMAGE_REF, image.to_string());
    set(LABEL_CRI_LAYER_DIGEST, digest);
    set(LABEL_CRI_MANIFEST_DIGEST, manifest_digest.to_string());
    set(
        LABEL_CRI_IMAGE_LAYERS,
        bounded_list(LABEL_CRI_IMAGE_LAYERS, following.iter().map(String::as_str)),
    );
    labels
}

/// GC labels of a parent: one `containerd.io/gc.ref.content.*` per child, numbered per
/// key as containerd's `images.SetChildrenMappedLabels` with `ChildGCLabels` does.
pub fn child_gc_labels(children: &[&Descriptor]) -> BTreeMap<String, String> {
    let mut counters: HashMap<&'static str, usize> = HashMap::new();
    let mut labels = BTreeMap::new();
    for child in children {
        let key = gc_label_key(&child.media_type);
        let key = if key.ends_with('.') {
            let n = counters.entry(key).or_default();
            let numbered = format!("{key}{n}");
            *n += 1;
            numbered
        } else {
            key.to_string()
        };
        labels.insert(key, child.digest.to_string());
    }
    labels
}

pub fn gc_label_key(media_type: &str) -> &'static str {
    match media_type {
        OCI_CONFIG | DOCKER_CONFIG => LABEL_GC_CONFIG,
        registry::OCI_MANIFEST | registry::DOCKER_MANIFEST => LABEL_GC_MANIFEST_PREFIX,
        m if is_layer(m) => LABEL_GC_LAYER_PREFIX,
        _ => LABEL_GC_OTHER_PREFIX,
    }
}

/// containerd's `images.IsLayerType`.
pub fn is_layer(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.oci.image.layer.")
        || media_type.starts_with("application/vnd.docker.image.rootfs.")
}

/// containerd's ingest ref for a blob (`remotes.MakeRefKey`): one writer per blob at a time.
pub fn ingest_ref(desc: &Descriptor) -> String {
    let kind = match gc_label_key(&desc.media_type) {
        LABEL_GC_CONFIG => "config",
        LABEL_GC_MANIFEST_PREFIX => "manifest",
        LABEL_GC_LAYER_PREFIX => "layer",
        _ if desc.media_type == registry::OCI_INDEX
            || desc.media_type == registry::DOCKER_MANIFEST_LIST =>
        {
            "index"
        }
        _ => "unknown",
    };
    format!("{kind}-{}", desc.digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(s: &str) -> Digest {
        Digest::sha256_of(s.as_bytes())
    }

    fn layer(name: &str, annotations: &[(&str, &str)]) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: digest(name),
            size: 10,
            annotations: (!annotations.is_empty()).then(|| {
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            platform: None,
            other: Default::default(),
        }
    }

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a: Digest = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
            .parse()
            .unwrap();
        let b: Digest = "sha256:2d3d2ef6d89abf0d6b5d8e6f8f2e44bd4fd1d52d16cb6f4ee1ee37a5cd4c2a3a"
            .parse()
            .unwrap();
        let ids = chain_ids(&[a.clone(), b.clone(), a.clone()]);
        assert_eq!(ids[0], a.to_string());
        // sha256 of "<parent> <diff ID>", digests with their algorithm prefix (computed
        // with Python's hashlib).
        assert_eq!(
            ids[1],
            "sha256:2d9bc6338eefe844132ff6948a906611df3af30fa0f320f219131aef8b73f648"
        );
        assert_eq!(
            ids[2],
            "sha256:5d8ae71ad8fe6ade965055541628cfef0071352ca8f346e3ebc39def159af167"
        );
        assert_eq!(chain_ids(&[]), Vec::<String>::new());
    }

    #[test]
    fn layer_labels_carry_the_remote_snapshot_protocol() {
        let layers = vec![
            layer(
                "a",
                &[
                    ("containerd.io/snapshot/stargz/toc.digest", "sha256:toc"),
                    ("org.opencontainers.image.title", "not forwarded"),
                ],
            ),
            layer("b", &[]),
            layer("c", &[]),
        ];
        let labels = layer_labels("r.io/x:1", "sha256:m", &layers, 1, "sha256:chain", 42);
        assert_eq!(labels[LABEL_SNAPSHOT_REF], "sha256:chain");
        assert_eq!(labels[LABEL_STARGZ_REFERENCE], "r.io/x:1");
        assert_eq!(labels[LABEL_CRI_IMAGE_REF], "r.io/x:1");
        assert_eq!(labels[LABEL_STARGZ_DIGEST], layers[1].digest.to_string());
        assert_eq!(labels[LABEL_CRI_LAYER_DIGEST], layers[1].digest.to_string());
        assert_eq!(labels[LABEL_CRI_MANIFEST_DIGEST], "sha256:m");
        let following = format!("{},{}", layers[1].digest, layers[2].digest);
        assert_eq!(labels[LABEL_STARGZ_LAYERS], following);
        assert_eq!(labels[LABEL_CRI_IMAGE_LAYERS], following);
        assert_eq!(labels[LABEL_STARGZ_PREFETCH], "42");
        assert!(!labels.contains_key("containerd.io/snapshot/stargz/toc.digest"));

        let first = layer_labels("r.io/x:1", "sha256:m", &layers, 0, "sha256:c0", 42);
        assert_eq!(
            first["containerd.io/snapshot/stargz/toc.digest"], "sha256:toc",
            "annotations under containerd.io/snapshot/ are forwarded"
        );
        assert!(!first.contains_key("org.opencontainers.image.title"));
    }

    #[test]
    fn layer_lists_stay_under_containerds_label_limit() {
        let layers: Vec<Descriptor> = (0..200).map(|i| layer(&i.to_string(), &[])).collect();
        let labels = layer_labels("r.io/x:1", "sha256:m", &layers, 0, "sha256:c", 1);
        for key in [LABEL_STARGZ_LAYERS, LABEL_CRI_IMAGE_LAYERS] {
            let value = &labels[key];
            assert!(key.len() + value.len() <= MAX_LABEL_SIZE, "{key}");
            let listed: Vec<&str> = value.split(',').collect();
            assert!(listed.len() > 10 && listed.len() < 200, "{}", listed.len());
            // Whole digests only, in order, from this layer on.
            for (i, d) in listed.iter().enumerate() {
                assert_eq!(*d, layers[i].digest.to_string());
            }
        }
    }

    #[test]
    fn gc_labels_are_numbered_per_kind() {
        let config = Descriptor {
            media_type: "application/vnd.oci.image.config.v1+json".into(),
            ..layer("config", &[])
        };
        let (a, b) = (layer("a", &[]), layer("b", &[]));
        let labels = child_gc_labels(&[&config, &a, &b]);
        assert_eq!(labels[LABEL_GC_CONFIG], config.digest.to_string());
        assert_eq!(
            labels["containerd.io/gc.ref.content.l.0"],
            a.digest.to_string()
        );
        assert_eq!(
            labels["containerd.io/gc.ref.content.l.1"],
            b.digest.to_string()
        );
        assert_eq!(labels.len(), 3);

        let m = Descriptor {
            media_type: registry::OCI_MANIFEST.into(),
            ..layer("m", &[])
        };
        let labels = child_gc_labels(&[&m, &m]);
        assert!(labels.contains_key("containerd.io/gc.ref.content.m.0"));
        assert!(labels.contains_key("containerd.io/gc.ref.content.m.1"));
    }
}
