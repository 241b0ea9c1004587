//! docker-registry behind TLS (a CA made here) with htpasswd basic auth; credentials come
//! from a docker config file.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use registry::{
    Client, Digest, DockerConfig, Error, HostConfig, RegistryConfig, RemoteBlob, Repository,
};
use testkit::registry::{Registry, RegistryOptions};

fn tls_config(host: &str, ca: Option<&Path>) -> RegistryConfig {
    let mut config = RegistryConfig::default();
    config.http.max_retries = 1;
    config.http.min_wait_msec = 10;
    let host_config = HostConfig {
        ca: ca.map(|c| vec![c.to_path_buf()]).unwrap_or_default(),
        plain_http: Some(false),
        ..HostConfig::default()
    };
    config.resolver.host.insert(host.to_string(), host_config);
    config
}

fn docker_config(dir: &Path, host: &str, user: &str, pass: &str) -> DockerConfig {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let path = dir.join(format!("config-{user}-{}.json", pass.len()));
    std::fs::write(
        &path,
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .expect("write config");
    DockerConfig::load(&path).expect("load docker config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_registry_with_basic_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    testkit::tls::TestPki::new(dir.path()).expect("test certificates");
    let htpasswd = Command::new("htpasswd")
        .args(["-Bbn", "alice", "s3cret-pw"])
        .output()
        .expect("htpasswd");
    assert!(htpasswd.status.success());
    std::fs::write(dir.path().join("htpasswd"), &htpasswd.stdout).expect("write htpasswd");
    let reg = Registry::start_with(
        &dir.path().join("registry"),
        &RegistryOptions {
            htpasswd: Some(dir.path().join("htpasswd")),
            tls: Some((dir.path().join("server.pem"), dir.path().join("server.key"))),
            ..RegistryOptions::default()
        },
    )
    .expect("start docker-registry with TLS and htpasswd");
    let ca = dir.path().join("ca.pem");
    let repo = Repository::new(reg.host.clone(), "private/app");
    let data = Bytes::from((0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let digest = Digest::sha256_of(&data);

    let client = Client::new(tls_config(&reg.host, Some(&ca)))
        .expect("client")
        .with_credentials(Arc::new(docker_config(
            dir.path(),
            &reg.host,
            "alice",
            "s3cret-pw",
        )));
    client
        .push_blob(&repo, &digest, data.clone(), None)
        .await
        .expect("push over TLS");
    let blob = RemoteBlob::open(client.clone(), repo.clone(), digest.clone())
        .await
        .expect("open");
    assert_eq!(
        &blob.read(1000, 5000).await.expect("read")[..],
        &data[1000..6000]
    );

    // Wrong password: refused, and the password appears nowhere.
    let wrong = Client::new(tls_config(&reg.host, Some(&ca)))
        .expect("client")
        .with_credentials(Arc::new(docker_config(
            dir.path(),
            &reg.host,
            "alice",
            "wrong-pass-xyz",
        )));
    let err = wrong.blob_size(&repo, &digest).await.expect_err("refused");
    let text = format!("{err} {err:?}");
    assert!(matches!(err, Error::Unauthorized { .. }), "{text}");
    assert!(
        text.contains("refused the credentials") && text.contains(&reg.host),
        "{text}"
    );
    assert!(
        !text.contains("wrong-pass-xyz") && !text.contains("s3cret"),
        "{text}"
    );

    // No credentials at all.
    let anonymous = Client::new(tls_config(&reg.host, Some(&ca))).expect("client");
    let err = anonymous
        .blob_size(&repo, &digest)
        .await
        .expect_err("anonymous");
    assert!(err.to_string().contains("none are configured"), "{err}");

    // Without our CA the certificate is not trusted.
    let untrusting = Client::new(tls_config(&reg.host, None)).expect("client");
    let err = untrusting
        .blob_size(&repo, &digest)
        .await
        .expect_err("untrusted");
    let text = err.to_string();
    assert!(
        text.to_lowercase().contains("certificate") && text.contains(&reg.host),
        "{text}"
    );
}
