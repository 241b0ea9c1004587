//! soci's prefetch artifact: beside a layer's zTOC in a SOCI index, the spans the image's
//! command read at start-up (`{"version":"1.0","prefetch_spans":[{"start_span":0,
//! "end_span":2}]}`), which a snapshotter fetches first.

use std::ops::RangeInclusive;

/// The media type of a prefetch artifact in a SOCI index.
pub const MEDIA_TYPE: &str = "application/vnd.amazon.soci.prefetch.v1+json";
const VERSION: &str = "1.0";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefetchError {
    #[error("not a prefetch artifact: {0}")]
    Json(String),
    #[error("prefetch artifact version {0:?}, only 1.0 is known")]
    Version(String),
    #[error("prefetch span {0}..={1} is reversed")]
    Reversed(u32, u32),
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Artifact {
    version: String,
    prefetch_spans: Vec<Span>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Span {
    start_span: u32,
    end_span: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    priority: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// The span ranges an artifact names, in its order.
pub fn decode(bytes: &[u8]) -> Result<Vec<RangeInclusive<u32>>, PrefetchError> {
    let artifact: Artifact =
        serde_json::from_slice(bytes).map_err(|e| PrefetchError::Json(e.to_string()))?;
    if artifact.version != VERSION {
        return Err(PrefetchError::Version(artifact.version));
    }
    artifact
        .prefetch_spans
        .iter()
        .map(|s| {
            if s.start_span > s.end_span {
                Err(PrefetchError::Reversed(s.start_span, s.end_span))
            } else {
                Ok(s.start_span..=s.end_span)
            }
        })
        .collect()
}

/// The artifact of `spans` (span ids), merged into runs as soci writes them.
pub fn encode(spans: &[u32]) -> Vec<u8> {
    let mut sorted = spans.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<Span> = Vec::new();
    for id in sorted {
        match runs.last_mut() {
            Some(run) if run.end_span + 1 == id => run.end_span = id,
            _ => runs.push(Span {
                start_span: id,
                end_span: id,
                priority: 0,
            }),
        }
    }
    let artifact = Artifact {
        version: VERSION.into(),
        prefetch_spans: runs,
    };
    serde_json::to_vec(&artifact).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_read_back_as_runs() {
        let bytes = encode(&[4, 0, 1, 2, 9, 1]);
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":2},{"start_span":4,"end_span":4},{"start_span":9,"end_span":9}]}"#
        );
        assert_eq!(decode(&bytes).unwrap(), [0..=2, 4..=4, 9..=9]);
        assert!(decode(br#"{"version":"2.0","prefetch_spans":[]}"#).is_err());
        assert!(
            decode(br#"{"version":"1.0","prefetch_spans":[{"start_span":3,"end_span":1}]}"#)
                .is_err()
        );
        assert!(decode(b"[]").is_err());
    }
}
