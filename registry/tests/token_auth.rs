//! The bearer-token flow against a token server of ours: challenge, token fetch with basic
//! credentials, reuse until expiry, refresh on 401, refusal without leaking secrets.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine as _;
use common::{FakeServer, Reply, Request, pseudo_random, serve_blob};
use registry::{
    Client, Credentials, Digest, Error, RegistryConfig, RemoteBlob, Repository, StaticCredentials,
};

const REPO: &str = "secure/app";

struct TokenRegistry {
    server: FakeServer,
    valid: Arc<Mutex<HashSet<String>>>,
    expires_in: Arc<AtomicU64>,
}

impl TokenRegistry {
    async fn start(blob: Vec<u8>, allow_anonymous: bool) -> Self {
        let me: Arc<OnceLock<String>> = Arc::default();
        let valid: Arc<Mutex<HashSet<String>>> = Arc::default();
        let expires_in = Arc::new(AtomicU64::new(300));
        let issued = Arc::new(AtomicUsize::new(0));
        let (me2, valid2, exp2) = (me.clone(), valid.clone(), expires_in.clone());
        let good_auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:wonder land:pw")
        );
        let server = FakeServer::start(move |req: &Request, _| {
            if req.path() == "/token" && req.method == "POST" {
                // OAuth2 refresh-token grant, for docker's identity tokens.
                let form = String::from_utf8_lossy(&req.body).into_owned();
                let fields: Vec<(&str, &str)> = form.split('&').filter_map(|kv| kv.split_once('=')).collect();
                let get = |k: &str| fields.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
                if get("grant_type") != Some("refresh_token")
                    || get("refresh_token") != Some("refresh-xyz")
                    || get("service") != Some("fake-registry")
                {
                    return Reply::with(401, &[], "");
                }
                let token = format!("oauth-{}", issued.fetch_add(1, Ordering::SeqCst));
                valid2.lock().expect("lock").insert(token.clone());
                let body = serde_json::json!({"access_token": token, "expires_in": 300});
                return Reply::with(200, &[("Content-Type", "application/json")], body.to_string());
            }
            if req.path() == "/token" {
                assert_eq!(req.query("service"), ["fake-registry"]);
                match req.header("authorization") {
                    Some(a) if a == good_auth => {}
                    None if allow_anonymous => {}
                    _ => return Reply::with(401, &[], r#"{"details":"bad credentials"}"#),
                }
                let n = issued.fetch_add(1, Ordering::SeqCst);
                let token = format!("tok-{n}-{}", req.query("scope").join("+"));
                valid2.lock().expect("lock").insert(token.clone());
                let body = serde_json::json!({"token": token, "expires_in": exp2.load(Ordering::SeqCst)});
                return Reply::with(200, &[("Content-Type", "application/json")], body.to_string());
            }
            let authorised = req
                .header("authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .is_some_and(|t| valid2.lock().expect("lock").contains(t));
            if !authorised {
                let challenge = format!(
                    "Bearer realm=\"http://{}/token\",service=\"fake-registry\",scope=\"repository:{REPO}:pull\"",
                    me2.get().expect("address set")
                );
                return Reply::with(401, &[("WWW-Authenticate", challenge.as_str())], "");
            }
            serve_blob(req, &blob)
        })
        .await;
        me.set(server.host.clone()).expect("set once");
        Self {
            server,
            valid,
            expires_in,
        }
    }

    fn token_requests(&self) -> Vec<Request> {
        self.server
            .requests()
            .into_iter()
            .filter(|r| r.path() == "/token")
            .collect()
    }

    /// Requests to /v2/ sent without any credentials (each one got a challenge).
    fn challenges(&self) -> usize {
        self.server
            .count(|r| r.path().starts_with("/v2/") && r.header("authorization").is_none())
    }
}

fn client_with(creds: Option<Credentials>, host: &str) -> Client {
    let mut config = RegistryConfig::default();
    config.http.max_retries = 1;
    config.http.min_wait_msec = 10;
    let client = Client::new(config).expect("client");
    match creds {
        Some(c) => {
            client.with_credentials(Arc::new(StaticCredentials([(host.to_string(), c)].into())))
        }
        None => client,
    }
}

#[tokio::test]
async fn tokens_are_fetched_reused_and_refreshed() {
    let data = pseudo_random(10_000, 1);
    let reg = TokenRegistry::start(data.clone(), false).await;
    let client = client_with(
        Some(Credentials::new("alice", "wonder land:pw")),
        &reg.server.host,
    );
    let blob = RemoteBlob::new(
        client.clone(),
        Repository::new(reg.server.host.clone(), REPO),
        Digest::sha256_of(&data),
        data.len() as u64,
    );
    for i in 0..3u64 {
        let got = blob.read(i * 100, 50).await.expect("read");
        assert_eq!(&got[..], &data[(i * 100) as usize..(i * 100 + 50) as usize]);
    }
    // One challenge, one token, reused for every read.
    assert_eq!(reg.challenges(), 1);
    let tokens = reg.token_requests();
    assert_eq!(tokens.len(), 1);
    assert_eq!(
        tokens[0].query("scope"),
        [format!("repository:{REPO}:pull")]
    );

    // The registry forgets the token: the client gets a 401, fetches a new one, goes on.
    reg.valid.lock().expect("lock").clear();
    let got = blob.read(5000, 10).await.expect("refreshed");
    assert_eq!(&got[..], &data[5000..5010]);
    assert_eq!(reg.token_requests().len(), 2);

    // Push scopes are separate tokens.
    let repo = Repository::new(reg.server.host.clone(), REPO);
    let exists = client
        .blob_exists(&repo, &Digest::sha256_of(&data))
        .await
        .expect("head");
    assert_eq!(exists, Some(data.len() as u64));
    let last = reg.token_requests().pop().expect("token request");
    assert_eq!(
        last.query("scope"),
        [format!("repository:{REPO}:pull,push")]
    );
}

#[tokio::test]
async fn expired_tokens_are_not_reused() {
    let data = pseudo_random(1000, 2);
    let reg = TokenRegistry::start(data.clone(), false).await;
    reg.expires_in.store(0, Ordering::SeqCst);
    let client = client_with(
        Some(Credentials::new("alice", "wonder land:pw")),
        &reg.server.host,
    );
    let blob = RemoteBlob::new(
        client,
        Repository::new(reg.server.host.clone(), REPO),
        Digest::sha256_of(&data),
        1000,
    );
    for _ in 0..3 {
        blob.read(0, 10).await.expect("read");
    }
    // A token that expires at once is fetched anew for each request, without new 401s.
    assert_eq!(reg.token_requests().len(), 3);
    assert_eq!(reg.challenges(), 1);
}

#[tokio::test]
async fn anonymous_tokens_and_refused_credentials() {
    let data = pseudo_random(1000, 3);
    let open = TokenRegistry::start(data.clone(), true).await;
    let client = client_with(None, &open.server.host);
    let blob = RemoteBlob::new(
        client,
        Repository::new(open.server.host.clone(), REPO),
        Digest::sha256_of(&data),
        1000,
    );
    assert_eq!(&blob.read(0, 1000).await.expect("anonymous")[..], &data[..]);
    assert!(open.token_requests()[0].header("authorization").is_none());

    let closed = TokenRegistry::start(data.clone(), false).await;
    let client = client_with(
        Some(Credentials::new("alice", "not-the-password")),
        &closed.server.host,
    );
    let repo = Repository::new(closed.server.host.clone(), REPO);
    let err = client
        .blob_size(&repo, &Digest::sha256_of(&data))
        .await
        .expect_err("refused");
    let text = format!("{err} {err:?}");
    assert!(matches!(err, Error::Unauthorized { .. }), "{text}");
    assert!(
        text.contains("token service refused") && text.contains(&closed.server.host),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");
}

#[tokio::test]
async fn identity_tokens_use_the_oauth2_refresh_grant() {
    let data = pseudo_random(1000, 4);
    let reg = TokenRegistry::start(data.clone(), false).await;
    let client = client_with(
        Some(Credentials::identity_token("refresh-xyz")),
        &reg.server.host,
    );
    let blob = RemoteBlob::new(
        client,
        Repository::new(reg.server.host.clone(), REPO),
        Digest::sha256_of(&data),
        1000,
    );
    assert_eq!(&blob.read(0, 100).await.expect("read")[..], &data[..100]);
    let tokens = reg.token_requests();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].method, "POST");
    assert!(tokens[0].header("authorization").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_reads_share_one_token() {
    let data = pseudo_random(10_000, 5);
    let reg = TokenRegistry::start(data.clone(), false).await;
    let client = client_with(
        Some(Credentials::new("alice", "wonder land:pw")),
        &reg.server.host,
    );
    let blob = Arc::new(RemoteBlob::new(
        client,
        Repository::new(reg.server.host.clone(), REPO),
        Digest::sha256_of(&data),
        data.len() as u64,
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8u64 {
        let blob = blob.clone();
        tasks.spawn(async move { (i, blob.read(i * 1000, 100).await) });
    }
    while let Some(done) = tasks.join_next().await {
        let (i, got) = done.expect("task");
        let start = (i * 1000) as usize;
        assert_eq!(&got.expect("read")[..], &data[start..start + 100]);
    }
    assert_eq!(reg.token_requests().len(), 1);
}

/// Answers only per repository, as kubelet's credential plugins do; `credentials(host)`
/// alone gets nothing, so a client that does not pass the repository is refused.
struct PerRepository {
    host: String,
    asked: Mutex<Vec<String>>,
}

impl registry::CredentialProvider for PerRepository {
    fn credentials<'a>(&'a self, _host: &'a str) -> registry::CredentialFuture<'a> {
        Box::pin(async { Ok(None) })
    }

    fn credentials_for<'a>(
        &'a self,
        host: &'a str,
        repository: &'a str,
    ) -> registry::CredentialFuture<'a> {
        self.asked
            .lock()
            .expect("lock")
            .push(format!("{host}/{repository}"));
        let found = (host == self.host && repository == REPO)
            .then(|| Credentials::new("alice", "wonder land:pw"));
        Box::pin(async move { Ok(found) })
    }
}

#[tokio::test]
async fn the_token_fetch_asks_for_the_repository_s_credentials() {
    let data = pseudo_random(1000, 5);
    let reg = TokenRegistry::start(data.clone(), false).await;
    let provider = Arc::new(PerRepository {
        host: reg.server.host.clone(),
        asked: Mutex::default(),
    });
    let client = client_with(None, &reg.server.host).with_credentials(provider.clone());
    let blob = RemoteBlob::new(
        client,
        Repository::new(reg.server.host.clone(), REPO),
        Digest::sha256_of(&data),
        data.len() as u64,
    );
    let got = blob
        .read(10, 20)
        .await
        .expect("read with per-repository credentials");
    assert_eq!(&got[..], &data[10..30]);
    assert_eq!(
        *provider.asked.lock().expect("lock"),
        [format!("{}/{REPO}", reg.server.host)]
    );
}
