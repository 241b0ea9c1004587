//! An image's lazily mounted layers: grouping them by image (for status, metrics and
//! `lazysnap fetch`), finding the layers a library lookup may search, and making an
//! image wholly local now.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use super::{FuseMounter, Served};

/// The mounted layers of each image, by image reference (sorted), as indices into the
/// list given: the layers mounted under the image's name, and those mounted under
/// another image's name whose digest the image's layers list. (A layer shared with an
/// image pulled before is mounted once, under the first image's name; containerd's
/// labels list a layer and those above it, so a shared base layer is not listed and
/// counts under the first image only.) A digest mounted more than once counts once.
pub fn layers_by_image<'a>(
    layers: impl IntoIterator<Item = (&'a str, &'a str, &'a [String])>,
) -> Vec<(String, Vec<usize>)> {
    let layers: Vec<(&str, &str, &[String])> = layers.into_iter().collect();
    let mut images: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, (image, _, _)) in layers.iter().enumerate() {
        images.entry(image).or_default().push(i);
    }
    images
        .into_iter()
        .map(|(image, own)| {
            let listed: HashSet<&str> = own
                .iter()
                .flat_map(|&i| layers[i].2.iter().map(String::as_str))
                .collect();
            let mut seen = HashSet::new();
            let members = own
                .iter()
                .copied()
                .chain(
                    (0..layers.len())
                        .filter(|&j| layers[j].0 != image && listed.contains(layers[j].1)),
                )
                .filter(|&i| seen.insert(layers[i].1))
                .collect();
            (image.to_string(), members)
        })
        .collect()
}

/// The mounted layer `digest` first, then the other mounted layers of its image (by
/// image name, or by the layer lists of their labels), those that list fewer layers
/// first: nearer the top.
pub(super) fn image_layers_of(
    mounts: &HashMap<PathBuf, Served>,
    digest: &str,
) -> Vec<Arc<fusefs::LayerFs>> {
    let Some(me) = mounts.values().find(|s| s.layer_digest == digest) else {
        return Vec::new();
    };
    let mut others: Vec<&Served> = mounts
        .values()
        .filter(|s| s.layer_digest != digest)
        .filter(|s| {
            s.image_ref == me.image_ref
                || s.image_layers.iter().any(|d| d == digest)
                || me.image_layers.contains(&s.layer_digest)
        })
        .collect();
    others.sort_by(|a, b| {
        (a.image_layers.len(), &a.layer_digest).cmp(&(b.image_layers.len(), &b.layer_digest))
    });
    others.dedup_by(|a, b| a.layer_digest == b.layer_digest);
    std::iter::once(me)
        .chain(others)
        .map(|s| Arc::clone(s.mounted.fs()))
        .collect()
}

/// An image's layer list (its labels') with the layers below in its snapshot chain.
pub fn with_lower(listed: &[String], lower: Option<&Vec<String>>) -> Vec<String> {
    let mut out = listed.to_vec();
    for d in lower.into_iter().flatten() {
        if !out.contains(d) {
            out.push(d.clone());
        }
    }
    out
}

/// Why an image could not be made local.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchImageError {
    /// No layer of that image is mounted lazily here.
    NotMounted,
    /// A fetch failed: each failing layer with its error.
    Failed(Vec<(String, String)>),
}

impl std::fmt::Display for FetchImageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchImageError::NotMounted => {
                f.write_str("no layer of this image is mounted lazily by this lazysnapd")
            }
            FetchImageError::Failed(layers) => {
                let each: Vec<String> = layers.iter().map(|(l, e)| format!("{l}: {e}")).collect();
                write!(f, "{}", each.join("; "))
            }
        }
    }
}

/// What [`FuseMounter::fetch_image`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageFetched {
    /// The image's lazily mounted layers (digests).
    pub layers: Vec<String>,
    /// Distinct chunks fetched, and their decompressed bytes.
    pub chunks: u64,
    pub bytes: u64,
}

/// Range requests in flight at most for one [`FuseMounter::fetch_image`], over all the
/// image's layers.
const FETCH_IMAGE_REQUESTS: usize = 8;

impl FuseMounter {
    /// Makes every lazily mounted layer of `image_ref` (as [`layers_by_image`] groups
    /// them) wholly local now: each chunk not in the cache is fetched, verified and
    /// written to disk, at full speed (no quiet wait, no rate limit: see
    /// [`fusefs::LayerFs::fetch_all_now`]), the layers side by side. Fails when the image
    /// has no such layer, or with every layer whose fetch failed.
    ///
    /// `lower_layers` gives, by layer digest, the digests of the lazily mounted layers
    /// below it in its snapshot chain: a base layer shared with an image pulled earlier
    /// is mounted under that image's name, and only the chain says it is this one's too.
    pub async fn fetch_image(
        &self,
        image_ref: &str,
        lower_layers: &HashMap<String, Vec<String>>,
    ) -> Result<ImageFetched, FetchImageError> {
        let layers: Vec<(String, Arc<fusefs::LayerFs>)> = {
            let mounts = self.mounts();
            let mut served: Vec<&Served> = mounts.values().collect();
            served.sort_by(|a, b| a.layer_digest.cmp(&b.layer_digest));
            let listed: Vec<Vec<String>> = served
                .iter()
                .map(|s| with_lower(&s.image_layers, lower_layers.get(&s.layer_digest)))
                .collect();
            let groups = layers_by_image(served.iter().zip(&listed).map(|(s, listed)| {
                (
                    s.image_ref.as_str(),
                    s.layer_digest.as_str(),
                    listed.as_slice(),
                )
            }));
            let Some((_, members)) = groups.into_iter().find(|(image, _)| image == image_ref)
            else {
                return Err(FetchImageError::NotMounted);
            };
            members
                .into_iter()
                .map(|i| {
                    (
                        served[i].layer_digest.clone(),
                        Arc::clone(served[i].mounted.fs()),
                    )
                })
                .collect()
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(FETCH_IMAGE_REQUESTS));
        let mut tasks = tokio::task::JoinSet::new();
        for (digest, fs) in &layers {
            let (digest, fs, slots) = (digest.clone(), Arc::clone(fs), Arc::clone(&slots));
            tasks.spawn_on(
                async move { (digest, fs.fetch_all_now(slots).await) },
                &self.handle,
            );
        }
        let mut done = ImageFetched {
            layers: layers.iter().map(|(d, _)| d.clone()).collect(),
            ..ImageFetched::default()
        };
        let mut failed = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(fetched))) => {
                    done.chunks += fetched.chunks;
                    done.bytes += fetched.bytes;
                }
                Ok((digest, Err(e))) => failed.push((digest, e.to_string())),
                Err(e) => failed.push((String::from("?"), format!("fetch task: {e}"))),
            }
        }
        if failed.is_empty() {
            tracing::info!(image = %image_ref, layers = done.layers.len(), chunks = done.chunks,
                bytes = done.bytes, "image made local");
            Ok(done)
        } else {
            failed.sort();
            tracing::warn!(image = %image_ref, failed = failed.len(), "making the image local failed");
            Err(FetchImageError::Failed(failed))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_images_layers_gain_those_below_in_its_snapshot_chain_once() {
        let listed = vec!["sha256:top".to_string(), "sha256:mid".to_string()];
        let lower = vec!["sha256:mid".to_string(), "sha256:base".to_string()];
        assert_eq!(
            with_lower(&listed, Some(&lower)),
            ["sha256:top", "sha256:mid", "sha256:base"]
        );
        assert_eq!(with_lower(&listed, None), listed);
    }

    #[test]
    fn layers_are_grouped_by_image_with_the_layers_they_share() {
        let list = |d: &[&str]| d.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // b:1 was pulled after a:1 and shares its base layer `base`, mounted once under
        // a:1's name; c:1 lists no layers (labels without stargz.layers).
        let a_layers = list(&["base", "a-top"]);
        let b_layers = list(&["base", "b-top", "b-more"]);
        let none: Vec<String> = Vec::new();
        let layers: Vec<(&str, &str, &[String])> = vec![
            ("reg/a:1", "base", &a_layers),
            ("reg/b:1", "b-top", &b_layers),
            ("reg/a:1", "a-top", &a_layers),
            ("reg/c:1", "c-only", &none),
            ("reg/b:1", "b-more", &b_layers),
            // The same digest mounted twice (another chain) counts once.
            ("reg/b:1", "b-top", &b_layers),
        ];
        let groups = layers_by_image(layers.iter().copied());
        assert_eq!(
            groups,
            vec![
                ("reg/a:1".to_string(), vec![0, 2]),
                ("reg/b:1".to_string(), vec![1, 4, 0]),
                ("reg/c:1".to_string(), vec![3]),
            ]
        );
        assert!(layers_by_image(std::iter::empty()).is_empty());
    }
}
