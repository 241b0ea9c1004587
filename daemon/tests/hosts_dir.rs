//! lazysnapd reading containerd's host directories (`[resolver] config_path`) with real
//! parts: an eStargz image in a plain-HTTP docker-registry, a mirror of it (another
//! docker-registry on the same storage) over TLS with a CA made here and a required client
//! certificate, named in `hosts.toml`; containerd pulls through lazysnapd, runc runs the
//! image. The layers' range reads go to the mirror (with `ns=`), none to the registry.

#![allow(clippy::unwrap_used)] // a test that cannot go on should stop right there

mod common;

use common::{containerd_for, layers_of, push_busybox_app, rpull_lazily, start_lazysnapd};
use testkit::registry::Registry;
use testkit::tls::TestPki;

/// GETs of `digest`'s blob in a docker-registry's access log.
fn blob_gets(log: &str, digest: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(&format!("/blobs/{digest}")) && l.contains("\"GET "))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn lazy_layers_come_through_the_mirror_hosts_toml_names() {
    if testkit::skip_unless_root("lazy_layers_come_through_the_mirror_hosts_toml_names") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let origin = Registry::start(&d.join("origin")).unwrap();
    let (_, estargz) = push_busybox_app(&origin, "hosts/app", 8 << 20, 31);
    let pki = TestPki::new(&d.join("pki")).unwrap();
    let (cert, key) = pki.client("node").unwrap();
    let mirror = origin.tls_mirror(&d.join("mirror"), &pki).unwrap();

    let certs_d = d.join("certs.d");
    let host_dir = certs_d.join(&origin.host);
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{origin}\"\n\n[host.\"https://{mirror}\"]\n  \
             capabilities = [\"pull\"]\n  ca = \"{ca}\"\n  client = [[\"{cert}\", \"{key}\"]]\n",
            origin = origin.host,
            mirror = mirror.host,
            ca = pki.ca().display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )
    .unwrap();
    let daemon = start_lazysnapd(
        d,
        &format!(
            "[lazy]\nbackground_fetch = false\n[resolver]\nconfig_path = \"{}\"\n",
            certs_d.display()
        ),
    );
    let containerd = containerd_for(&daemon);

    let logged_before = (origin.log().len(), mirror.log().len());
    rpull_lazily(&estargz, &containerd).await;
    let out = containerd
        .ctr([
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            &estargz,
            "hosts-1",
        ])
        .unwrap();
    assert!(out.contains("served-lazily"), "{out}");

    let origin_log = origin.log()[logged_before.0..].to_string();
    let mirror_log = mirror.log()[logged_before.1..].to_string();
    let ns = format!("ns={}", origin.host);
    for (layer, _) in layers_of(&estargz).await {
        let from_mirror = blob_gets(&mirror_log, &layer);
        assert!(
            !from_mirror.is_empty(),
            "layer {layer} was not read through the mirror; lazysnapd log:\n{}",
            daemon.log()
        );
        assert!(
            from_mirror.iter().all(|l| l.contains(&ns)),
            "{from_mirror:#?}"
        );
        // containerd itself may fetch what lazysnapd does not mount; lazysnapd mounted
        // every layer, so the registry served none of their bytes.
        assert_eq!(blob_gets(&origin_log, &layer), Vec::<String>::new());
    }
}
