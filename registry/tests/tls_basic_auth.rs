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

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it, with the openssl CLI.
fn make_certs(dir: &Path) {
    let p = |n: &str| dir.join(n);
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=lazysnap test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
        ])
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem")));
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
        ])
        .arg(p("server.key"))
        .arg("-out")
        .arg(p("server.csr")));
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext");
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(p("server.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .arg("-CAcreateserial")
        .arg("-out")
        .arg(p("server.pem"))
        .arg("-extfile")
        .arg(p("ext.cnf")));
}

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
    make_certs(dir.path());
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
