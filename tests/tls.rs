//! TLS on every hop of the request's path: client → Reprise (`[tls]`),
//! Reprise → upstream (`routes[].ca_file`), Reprise → Redis (`rediss://` with
//! `store.ca_file`), plus Redis ACL credentials.
//!
//! Certificates are made by the test with `rcgen`: a private CA, and server
//! certificates for `localhost` and `127.0.0.1` signed by it. Nothing here is
//! trusted by the system, so each test also shows that without the CA the
//! connection is refused.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use reprise_relay::config::{Config, ListenerTls};
use reprise_store::{RedisStore, StoreOptions};
use reprise_tests::redis::{free_port, raw_command, RedisServer};
use reprise_tests::relay::{config, Backend, TestRelay};
use reprise_tests::upstream::numbered_event;
use reprise_tests::{data, numbered};
use reprise_tests::{open_sse, with_timeout, SseResponse, Upstream};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};

/// A private CA and one server certificate it signed, as PEM files in a
/// temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.distinguished_name
            .push(DnType::CommonName, "Reprise test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &issuer).expect("server cert");

        let dir = tempfile::Builder::new()
            .prefix("reprise-tls-")
            .tempdir()
            .expect("temp dir");
        let pki = Pki {
            dir,
            ca_pem: ca_cert.pem(),
        };
        std::fs::write(pki.ca_file(), &pki.ca_pem).expect("write CA");
        std::fs::write(pki.cert_file(), cert.pem()).expect("write cert");
        std::fs::write(pki.key_file(), key.serialize_pem()).expect("write key");
        pki
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn cert_file(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    fn key_file(&self) -> PathBuf {
        self.dir.path().join("server-key.pem")
    }

    /// The listener side of the server certificate, offering h2 and http/1.1.
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = reprise_relay::tls::server_config(&self.cert_file(), &self.key_file())
            .expect("server config");
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// A reqwest client trusting this CA (and nothing else it would not).
    fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("CA for reqwest");
        reqwest::Client::builder()
            .no_proxy()
            .add_root_certificate(ca)
            .build()
            .expect("reqwest client")
    }
}

/// An HTTPS upstream: every request gets five SSE events, and the header
/// `x-upstream-version` says which HTTP version reached it.
struct TlsUpstream {
    addr: SocketAddr,
    _stop: DropGuard,
}

impl TlsUpstream {
    async fn start(pki: &Pki) -> TlsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let acceptor = pki.acceptor();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (io, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = token.cancelled() => return,
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // Handshakes that fail (an untrusting relay) just end here.
                    let Ok(tls) = acceptor.accept(io).await else {
                        return;
                    };
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let body: String = (1..=5)
                            .map(|i| String::from_utf8_lossy(&numbered_event(i)).into_owned())
                            .collect();
                        let resp = Response::builder()
                            .header("content-type", "text/event-stream")
                            .header("x-upstream-version", format!("{:?}", req.version()))
                            .body(Full::new(Bytes::from(body)))
                            .expect("response");
                        Ok::<_, Infallible>(resp)
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsUpstream {
            addr,
            _stop: stop.drop_guard(),
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

#[tokio::test]
async fn https_upstream_with_private_ca_streams_through_the_relay() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki).await;
    let mut c = config(&upstream.url(), &Backend::Memory);
    c.routes[0].ca_file = Some(pki.ca_file());
    let relay = TestRelay::start(c).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");

    let mut sse = open_sse(client.get(format!("{}/chat", relay.url()))).await;
    assert_eq!(sse.status(), 200);
    assert!(sse.header("reprise-stream-id").is_some(), "recorded");
    // hyper-rustls offered h2 through ALPN and the upstream took it.
    assert_eq!(sse.header("x-upstream-version"), Some("HTTP/2.0"));
    let got = sse.collect_until_end().await;
    assert_eq!(data(&got), numbered(1..=5));
    relay.stop().await;
}

/// The client a route gets: its CA's for a route with `ca_file` (shared by
/// routes naming the same file), the system roots' otherwise.
#[tokio::test]
async fn client_for_a_route_trusts_its_ca_file() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki).await;
    let mut c = config(&upstream.url(), &Backend::Memory);
    let mut private = c.routes[0].clone();
    private.path = "/private".into();
    private.ca_file = Some(pki.ca_file());
    let mut same_ca = private.clone();
    same_ca.path = "/private2".into();
    c.routes.extend([private, same_ca]);
    let loaded = c.validate().expect("valid config");
    let store = reprise_relay::open_store(&c, &loaded).await.expect("store");
    let relay = reprise_relay::Relay::new(c, store, CancellationToken::new()).expect("relay");

    let get = |route: &str| {
        let route = relay.router.match_path(route).expect("route");
        let req = Request::get(format!("{}/x", upstream.url()))
            .body(reprise_relay::body::empty())
            .expect("request");
        relay.client_for(route).request(req)
    };
    let resp = with_timeout("the upstream over TLS", get("/private/x"))
        .await
        .expect("trusted");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let resp = with_timeout("the upstream over TLS", get("/private2/x"))
        .await
        .expect("trusted");
    assert_eq!(resp.status(), 200);
    let err = with_timeout("the upstream over TLS", get("/other"))
        .await
        .expect_err("untrusted");
    let chain = format!("{:?}", err);
    assert!(
        chain.contains("UnknownIssuer") || chain.contains("certificate"),
        "{chain}"
    );
}

#[tokio::test]
async fn https_upstream_with_private_ca_is_refused_without_ca_file() {
    let pki = Pki::new();
    let upstream = TlsUpstream::start(&pki).await;
    let relay = TestRelay::start(config(&upstream.url(), &Backend::Memory)).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");

    let resp = with_timeout(
        "the relay's answer",
        client.get(format!("{}/chat", relay.url())).send(),
    )
    .await
    .expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let body = resp.bytes().await.expect("body");
    let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON error body");
    assert_eq!(body["error"]["code"], "upstream_unavailable", "{body}");
    relay.stop().await;
}

#[tokio::test]
async fn unreadable_or_invalid_ca_files_are_config_errors_naming_the_file() {
    let pki = Pki::new();
    let garbage = pki.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not PEM\n").expect("write");
    let missing = pki.dir.path().join("missing.pem");
    for bad in [&garbage, &missing] {
        let mut c = config("https://localhost:1", &Backend::Memory);
        c.routes[0].ca_file = Some(bad.clone());
        let err = c.validate().expect_err("invalid CA file").to_string();
        assert!(
            err.contains("routes[0].ca_file") && err.contains(&bad.display().to_string()),
            "{err}"
        );
    }
    // The listener's files, and their pairing.
    let mut c = config("http://127.0.0.1:1", &Backend::Memory);
    c.tls = Some(ListenerTls {
        cert_file: pki.cert_file(),
        key_file: missing.clone(),
    });
    let err = c.validate().expect_err("missing key").to_string();
    assert!(
        err.starts_with("invalid config: tls: ") && err.contains("missing.pem"),
        "{err}"
    );
    c.tls = Some(ListenerTls {
        cert_file: pki.ca_file(),
        key_file: pki.key_file(),
    });
    let err = c
        .validate()
        .expect_err("key of another certificate")
        .to_string();
    assert!(err.contains("server-key.pem"), "{err}");
    // ca_file only makes sense with TLS.
    let mut c = config("http://127.0.0.1:1", &Backend::Memory);
    c.routes[0].ca_file = Some(pki.ca_file());
    assert!(c
        .validate()
        .expect_err("http upstream")
        .to_string()
        .contains("https://"));
    let mut c = config(
        "http://127.0.0.1:1",
        &Backend::Redis("redis://127.0.0.1:1".into()),
    );
    c.store.ca_file = Some(pki.ca_file());
    assert!(c
        .validate()
        .expect_err("redis://")
        .to_string()
        .contains("rediss://"));
    // And from TOML.
    let text = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\n[store]\nredis_url = \"rediss://localhost:1\"\nca_file = {:?}\n\
         [[routes]]\npath = \"/\"\nupstream = \"https://localhost:1\"\nca_file = {:?}\n",
        pki.cert_file(),
        pki.key_file(),
        pki.ca_file(),
        pki.ca_file()
    );
    Config::from_toml(&text)
        .expect("parses")
        .validate()
        .expect("valid");
}

/// Reprise on an HTTPS listener, in-process.
struct TlsRelay {
    url: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TlsRelay {
    async fn start(mut c: Config, pki: &Pki) -> TlsRelay {
        reprise_tests::init_tracing();
        c.tls = Some(ListenerTls {
            cert_file: pki.cert_file(),
            key_file: pki.key_file(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = reprise_relay::run(c, listener, token).await {
                panic!("relay failed to start: {e}");
            }
        });
        let relay = TlsRelay {
            url: format!("https://localhost:{port}"),
            client: pki.client(),
            shutdown,
            task,
        };
        let ready = format!("{}/_reprise/readyz", relay.url);
        with_timeout("the TLS relay to become ready", async {
            loop {
                if let Ok(r) = relay.client.get(&ready).send().await {
                    if r.status().is_success() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        relay
    }

    async fn stop(self) {
        self.shutdown.cancel();
        with_timeout("relay shutdown", self.task)
            .await
            .expect("relay task");
    }
}

#[tokio::test]
async fn https_listener_streams_and_resumes() {
    let pki = Pki::new();
    let upstream = Upstream::start().await;
    let relay = TlsRelay::start(config(&upstream.url(), &Backend::Memory), &pki).await;

    let ctl = upstream.controlled_stream();
    let mut first = open_sse(relay.client.get(format!("{}/chat", relay.url))).await;
    assert_eq!(first.status(), 200);
    for i in 1..=3 {
        ctl.send(numbered_event(i)).await;
    }
    let got = first.next_events(3).await;
    assert_eq!(data(&got), numbered(1..=3));
    let last_id = got[2].id.clone();
    first.disconnect();
    // The relay tells the upstream the client came over HTTPS... at least it
    // forwarded the request; the recorded stream goes on without the client.
    ctl.send(numbered_event(4)).await;
    ctl.finish();

    let mut rest = open_sse(
        relay
            .client
            .get(format!("{}/chat", relay.url))
            .header("last-event-id", &last_id),
    )
    .await;
    assert_eq!(rest.status(), 200);
    assert_eq!(data(&rest.collect_until_end().await), numbered(4..=4));

    // A client that does not trust the CA cannot talk to it at all.
    let untrusting = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let err = untrusting
        .get(format!("{}/_reprise/healthz", relay.url))
        .send()
        .await
        .expect_err("untrusted certificate");
    assert!(err.is_connect(), "{err:?}");
    // Plain HTTP on the TLS port is not served.
    let plain = relay.url.replace("https://", "http://");
    let resp = untrusting
        .get(format!("{plain}/_reprise/healthz"))
        .send()
        .await;
    assert!(resp.map(|r| !r.status().is_success()).unwrap_or(true));
    relay.stop().await;
}

#[tokio::test]
async fn https_listener_speaks_http2_through_alpn() {
    let pki = Pki::new();
    let upstream = Upstream::start().await;
    let relay = TlsRelay::start(config(&upstream.url(), &Backend::Memory), &pki).await;
    let port: u16 = relay
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");

    let mut roots = rustls::RootCertStore::empty();
    for cert in reprise_relay::tls::load_certs(&pki.ca_file()).expect("CA") {
        roots.add(cert).expect("root");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(reprise_relay::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::get(format!("https://localhost:{port}/_reprise/healthz"))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("ok"));
    drop(send);
    relay.stop().await;
}

/// A `redis-server` serving only TLS on a free port, with the test's
/// certificate; killed on drop.
struct TlsRedis {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    async fn start(pki: &Pki) -> TlsRedis {
        let dir = tempfile::Builder::new()
            .prefix("reprise-redis-tls-")
            .tempdir()
            .expect("dir");
        let port = free_port().expect("port");
        let arg = |p: &Path| p.display().to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                &arg(&pki.cert_file()),
                "--tls-key-file",
                &arg(&pki.key_file()),
            ])
            .args([
                "--tls-ca-cert-file",
                &arg(&pki.ca_file()),
                "--tls-auth-clients",
                "no",
            ])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &arg(dir.path()),
            ])
            .args(["--logfile", &arg(&dir.path().join("redis.log"))])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (install redis-server 6+ built with TLS)");
        let mut server = TlsRedis {
            port,
            child,
            _dir: dir,
        };
        // Ready once the TLS port accepts connections.
        with_timeout("redis-server to listen on its TLS port", async {
            loop {
                if let Ok(Some(status)) = server.child.try_wait() {
                    panic!("redis-server exited: {status}");
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        server
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Records a stream through `relay`, drops the client after two events, and
/// resumes it from another relay on the same store.
async fn record_and_resume(relay: &TestRelay, other: &TestRelay, upstream: &Upstream) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let ctl = upstream.controlled_stream();
    let mut first: SseResponse = open_sse(client.get(format!("{}/chat", relay.url()))).await;
    assert_eq!(first.status(), 200);
    ctl.send(numbered_event(1)).await;
    ctl.send(numbered_event(2)).await;
    let got = first.next_events(2).await;
    first.disconnect();
    ctl.send(numbered_event(3)).await;
    ctl.finish();
    // The other relay has only the store: the stream went through Redis.
    let mut rest = open_sse(
        client
            .get(format!("{}/chat", other.url()))
            .header("last-event-id", &got[1].id),
    )
    .await;
    assert_eq!(rest.status(), 200);
    assert_eq!(data(&rest.collect_until_end().await), numbered(3..=3));
}

fn store_options() -> StoreOptions {
    StoreOptions {
        key_prefix: "reprise:".into(),
        retention: Duration::from_secs(60),
        max_stream_duration: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn rediss_with_private_ca_records_and_resumes() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki).await;
    let upstream = Upstream::start().await;
    let url = format!("rediss://localhost:{}", redis.port);
    let mut c = config(&upstream.url(), &Backend::Redis(url.clone()));
    c.store.ca_file = Some(pki.ca_file());
    let a = TestRelay::start(c.clone()).await;
    let b = TestRelay::start(c).await;
    record_and_resume(&a, &b, &upstream).await;
    a.stop().await;
    b.stop().await;

    // Without the CA, fred's system roots refuse the server's certificate.
    let err = RedisStore::connect(&url, store_options())
        .await
        .err()
        .expect("untrusted certificate");
    assert!(err.to_string().contains("cannot connect to Redis"), "{err}");
}

#[tokio::test]
async fn redis_acl_user_and_password() {
    let server = RedisServer::start().await.expect("redis-server");
    let port = server.port();
    let reply = raw_command(
        port,
        &[
            "ACL",
            "SETUSER",
            "reprise",
            "on",
            ">s3cret-pw",
            "~*",
            "&*",
            "+@all",
        ],
    )
    .await
    .expect("ACL SETUSER");
    assert_eq!(reply, b"+OK\r\n", "{}", String::from_utf8_lossy(&reply));
    // The default user can no longer do anything: only the ACL user works.
    raw_command(port, &["ACL", "SETUSER", "default", "off"])
        .await
        .expect("ACL default off");

    let upstream = Upstream::start().await;
    let url = format!("redis://reprise:s3cret-pw@127.0.0.1:{port}");
    let c = config(&upstream.url(), &Backend::Redis(url));
    let a = TestRelay::start(c.clone()).await;
    let b = TestRelay::start(c).await;
    record_and_resume(&a, &b, &upstream).await;
    a.stop().await;
    b.stop().await;

    // A wrong password: start-up fails, saying so, without the password.
    let wrong = format!("redis://reprise:not-the-pw@127.0.0.1:{port}");
    let c = config(&upstream.url(), &Backend::Redis(wrong));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let run = reprise_relay::run(c, listener, CancellationToken::new());
    let err = with_timeout("the relay to refuse a wrong password", run)
        .await
        .expect_err("wrong password")
        .to_string();
    assert!(err.contains("WRONGPASS") || err.contains("auth"), "{err}");
    assert!(!err.contains("not-the-pw"), "{err}");
    // Killed on drop: `SHUTDOWN` would need the ACL user.
    drop(server);
}
