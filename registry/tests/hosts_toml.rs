//! containerd's host directories against real registries: the origin is a plain-HTTP
//! docker-registry; its mirror is another docker-registry over TLS (a CA made here) that
//! requires a client certificate, serving the same storage. `hosts.toml` says all of it
//! as containerd reads it.

use std::path::Path;

use bytes::Bytes;
use registry::{Client, Digest, RegistryConfig, RemoteBlob, Repository};
use testkit::registry::Registry;
use testkit::tls::TestPki;

const REPO: &str = "hosts/app";

fn config_for(config_path: &Path) -> RegistryConfig {
    let mut config = RegistryConfig::default();
    config.http.max_retries = 0;
    config.resolver.config_path = Some(config_path.display().to_string());
    config
}

fn client_for(config_path: &Path) -> Client {
    Client::new(config_for(config_path)).expect("client")
}

/// Requests for `digest`'s blob in a docker-registry's access log.
fn blob_gets(registry: &Registry, digest: &Digest) -> usize {
    registry
        .log()
        .lines()
        .filter(|l| l.contains(&format!("/blobs/{digest}")) && l.contains("\"GET "))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_mirror_with_a_client_certificate_serves_as_hosts_toml_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = TestPki::new(&d.join("pki")).expect("test certificates");
    let (client_cert, client_key) = pki.client("node").expect("client certificate");
    let origin = Registry::start(&d.join("origin")).expect("origin registry");
    let mirror = origin
        .tls_mirror(&d.join("mirror"), &pki)
        .expect("mirror registry with client certificates");

    let repo = Repository::new(origin.host.clone(), REPO);
    let data = Bytes::from(
        (0..300_000u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>(),
    );
    let digest = Digest::sha256_of(&data);
    let push = client_for(&d.join("nothing-here"));
    push.push_blob(&repo, &digest, data.clone(), None)
        .await
        .expect("push to the origin");

    // The registry's directory, named as containerd names it for host:port; paths in
    // the file are relative to it.
    let config_path = d.join("certs.d");
    let host_dir = config_path.join(&origin.host);
    std::fs::create_dir_all(&host_dir).expect("host dir");
    std::fs::copy(pki.ca(), host_dir.join("mirror-ca.pem")).expect("copy ca");
    // The mirror's table says how it is trusted and which certificate is presented.
    let write_hosts = |mirror_lines: &str| {
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!(
                "server = \"http://{origin}\"\n\n\
                 [host.\"https://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{mirror_lines}",
                origin = origin.host,
                mirror = mirror.host,
            ),
        )
        .expect("write hosts.toml")
    };
    let client_line = format!(
        "  client = [[\"{}\", \"{}\"]]\n",
        client_cert.display(),
        client_key.display()
    );
    write_hosts(&format!("  ca = \"mirror-ca.pem\"\n{client_line}"));

    // With the client certificate, the mirror serves ranges and whole blobs.
    let client = client_for(&config_path);
    let blob = RemoteBlob::new(
        client.clone(),
        repo.clone(),
        digest.clone(),
        data.len() as u64,
    );
    assert_eq!(
        &blob.read(1000, 5000).await.expect("range")[..],
        &data[1000..6000]
    );
    let whole = client
        .fetch_blob(&repo, &digest, 1 << 20)
        .await
        .expect("whole");
    assert_eq!(whole, data);
    assert_eq!(blob_gets(&mirror, &digest), 2, "{}", mirror.log());
    assert_eq!(blob_gets(&origin, &digest), 0, "{}", origin.log());
    // Every request to the mirror named the registry it serves.
    let ns = format!("ns={}", origin.host);
    assert!(
        mirror
            .log()
            .lines()
            .filter(|l| l.contains("/blobs/"))
            .all(|l| l.contains(&ns)),
        "{}",
        mirror.log()
    );

    // Without it, the mirror refuses the handshake and the origin serves: same bytes.
    write_hosts("  ca = \"mirror-ca.pem\"\n");
    let client = client_for(&config_path);
    let blob = RemoteBlob::new(
        client.clone(),
        repo.clone(),
        digest.clone(),
        data.len() as u64,
    );
    assert_eq!(&blob.read(7, 70).await.expect("range")[..], &data[7..77]);
    assert_eq!(blob_gets(&mirror, &digest), 2);
    assert_eq!(blob_gets(&origin, &digest), 1);

    // skip_verify instead of the CA: still the client certificate the mirror wants.
    write_hosts(&format!("  skip_verify = true\n{client_line}"));
    // A reload (SIGHUP in lazysnapd) reads the directory again, and gives the mirror
    // its range reads back.
    client
        .reload_resolver(config_for(&config_path).resolver)
        .expect("reload");
    assert_eq!(&blob.read(0, 10).await.expect("range")[..], &data[..10]);
    assert_eq!(blob_gets(&mirror, &digest), 3);
    assert_eq!(blob_gets(&origin, &digest), 1);
}
