//! The manifests that refer to a manifest: from the referrers API (filtered again on the
//! client, whatever the registry applied), from the tag schema when the registry has no
//! API (404), and none at all when neither has any.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use common::{FakeServer, Reply};
use registry::{Client, Digest, RegistryConfig, Repository};

const REPO: &str = "ref/repo";
const SOCI_V1: &str = "application/vnd.amazon.soci.index.v1+json";

fn listing(entries: &[(&str, &str)]) -> Vec<u8> {
    let manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|(digest_of, artifact_type)| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": Digest::sha256_of(digest_of.as_bytes()).to_string(),
                "size": 10,
                "artifactType": artifact_type,
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .unwrap()
}

#[tokio::test]
async fn the_api_answers_and_the_artifact_type_is_filtered_again() {
    let subject = Digest::sha256_of(b"image");
    let body = listing(&[("a", SOCI_V1), ("b", "application/vnd.in-toto+json")]);
    let server = FakeServer::start(move |req, _| {
        if req.path().contains("/referrers/") {
            Reply::with(
                200,
                &[("Content-Type", "application/vnd.oci.image.index.v1+json")],
                body.clone(),
            )
        } else {
            Reply::status(404)
        }
    })
    .await;
    let client = Client::new(RegistryConfig::default()).unwrap();
    let repo = Repository::new(server.host.clone(), REPO);
    let found = client
        .referrers(&repo, &subject, Some(SOCI_V1))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].digest, Digest::sha256_of(b"a"));
    assert!(client.has_referrers_api(&repo, &subject).await.unwrap());
    let asked = server.requests();
    assert!(
        asked.iter().any(|r| r.target
            == format!("/v2/{REPO}/referrers/{subject}?artifactType=application/vnd.amazon.soci.index.v1%2Bjson")),
        "{:?}",
        asked.iter().map(|r| &r.target).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn without_the_api_the_tag_schema_is_read_and_without_it_there_are_none() {
    let subject = Digest::sha256_of(b"image");
    let tag = format!("/v2/{REPO}/manifests/sha256-{}", subject.hex());
    let body = listing(&[("c", SOCI_V1)]);
    let with_tag = FakeServer::start(move |req, _| {
        if req.path() == tag {
            let digest = Digest::sha256_of(&body).to_string();
            Reply::with(
                200,
                &[
                    ("Content-Type", "application/vnd.oci.image.index.v1+json"),
                    ("Docker-Content-Digest", digest.as_str()),
                ],
                body.clone(),
            )
        } else {
            Reply::status(404)
        }
    })
    .await;
    let client = Client::new(RegistryConfig::default()).unwrap();
    let repo = Repository::new(with_tag.host.clone(), REPO);
    let found = client
        .referrers(&repo, &subject, Some(SOCI_V1))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].digest, Digest::sha256_of(b"c"));
    assert!(!client.has_referrers_api(&repo, &subject).await.unwrap());

    let nothing = FakeServer::start(|_, _| Reply::status(404)).await;
    let repo = Repository::new(nothing.host.clone(), REPO);
    assert!(
        client
            .referrers(&repo, &subject, None)
            .await
            .unwrap()
            .is_empty()
    );
}
