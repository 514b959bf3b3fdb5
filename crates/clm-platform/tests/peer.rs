//! The peer client against real tonic servers on 127.0.0.1:0: retries and
//! their limits, deadline propagation through the platform's server layer,
//! re-resolution of a DNS name, the token file and fan-out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::changes::TokenSource;
use clm_platform::config::Config;
use clm_platform::peer::{self, Idempotency, Peer, PeerError, Peers, Resolve};
use futures::future::BoxFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A test service, `test.v1.Probe`:
/// * `Echo` answers `<tag>|<authorization>`;
/// * `Slow` notes the `grpc-timeout` it was given and answers after 2 s;
/// * `Down` counts the call and answers UNAVAILABLE;
/// * `Relay` calls the `customer` peer's `Slow` through its peer client and
///   answers that call's error (noting its code).
#[derive(Clone, Default)]
struct Probe {
    tag: String,
    timeouts: Arc<Mutex<Vec<String>>>,
    downs: Arc<AtomicUsize>,
    relay: Option<Peers>,
    relayed: Arc<Mutex<Option<Code>>>,
}

impl tonic::server::NamedService for Probe {
    const NAME: &'static str = "test.v1.Probe";
}

struct Handler {
    probe: Probe,
    path: String,
    headers: http::HeaderMap,
}

impl tonic::server::UnaryService<()> for Handler {
    type Response = String;
    type Future = BoxFuture<'static, Result<tonic::Response<String>, Status>>;
    fn call(&mut self, _: tonic::Request<()>) -> Self::Future {
        let probe = self.probe.clone();
        let path = self.path.clone();
        let header = |name: &str| {
            self.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let (authorization, timeout) = (header("authorization"), header("grpc-timeout"));
        Box::pin(async move {
            match path.as_str() {
                "/test.v1.Probe/Echo" => Ok(tonic::Response::new(format!(
                    "{}|{authorization}",
                    probe.tag
                ))),
                "/test.v1.Probe/Slow" => {
                    probe.timeouts.lock().unwrap().push(timeout);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Ok(tonic::Response::new("slow".into()))
                }
                "/test.v1.Probe/Down" => {
                    probe.downs.fetch_add(1, Ordering::SeqCst);
                    Err(Status::unavailable("down for the test"))
                }
                "/test.v1.Probe/Relay" => {
                    let peer = probe.relay.as_ref().unwrap().get("customer").unwrap();
                    let answer = call(&peer, "Slow", Idempotency::Idempotent).await;
                    let e = answer.expect_err("the slow peer cannot answer in time");
                    *probe.relayed.lock().unwrap() = Some(e.code());
                    Err(Status::from(clm_platform::Error::from(e)))
                }
                _ => Err(Status::unimplemented(path)),
            }
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Probe {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let handler = Handler {
            probe: self.clone(),
            path: req.uri().path().to_owned(),
            headers: req.headers().clone(),
        };
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(tonic_prost::ProstCodec::<String, ()>::default());
            Ok(grpc.unary(handler, req).await)
        })
    }
}

/// Serves `probe` through the platform's server (health, the rpc layer
/// that records the caller's deadline) on a free port: its address.
async fn serve(probe: Probe, shutdown: &CancellationToken) -> SocketAddr {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::defaults("probe", dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.drain_timeout_secs = 0;
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(probe);
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let _dir = dir;
        clm_platform::server::serve(
            &config,
            "probe",
            listener,
            routes.routes(),
            &[],
            tonic_health::server::HealthReporter::new(),
            shutdown,
        )
        .await
    });
    addr
}

/// An address nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A config naming `peers` (name, URL), with short backoffs.
fn peers_config(peers: &[(&str, String)]) -> Config {
    let mut config = Config::defaults("scoring", std::path::Path::new("/tmp/unused"));
    for (name, url) in peers {
        config.peers.insert((*name).into(), url.clone());
    }
    config.peer.min_backoff_ms = 10;
    config.peer.max_backoff_ms = 50;
    config
}

/// One call of a `test.v1.Probe` method through `peer`.
async fn call(
    peer: &Peer,
    method: &'static str,
    idempotency: Idempotency,
) -> Result<String, PeerError> {
    let path = match method {
        "Echo" => "/test.v1.Probe/Echo",
        "Slow" => "/test.v1.Probe/Slow",
        "Down" => "/test.v1.Probe/Down",
        _ => "/test.v1.Probe/Relay",
    };
    peer.unary(
        method,
        idempotency,
        (),
        move |channel: Channel, request| async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready()
                .await
                .map_err(|e| Status::unknown(format!("not ready: {e}")))?;
            grpc.unary(
                request,
                http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::<(), String>::default(),
            )
            .await
        },
    )
    .await
}

#[tokio::test]
async fn a_peer_that_is_down_is_retried_with_backoff_then_unavailable_names_it() {
    let down = closed_port().await;
    let mut config = peers_config(&[("customer", format!("http://{down}"))]);
    config.peer.max_attempts = 3;
    let shutdown = CancellationToken::new();
    let peers = Peers::new("scoring", &config, None, shutdown.clone());
    let customer = peers.get("customer").unwrap();
    let started = std::time::Instant::now();
    let e = customer
        .unary(
            "Check",
            Idempotency::Idempotent,
            HealthCheckRequest::default(),
            |channel, request| async move { HealthClient::new(channel).check(request).await },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert_eq!(e.attempts(), 3, "retried up to peer.max_attempts: {e}");
    assert!(
        started.elapsed() >= Duration::from_millis(10 + 20),
        "backed off between attempts"
    );
    assert!(
        e.to_string().starts_with("customer.Check: unavailable: "),
        "{e}"
    );
    let status = Status::from(clm_platform::Error::from(e));
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("customer.Check"), "{status:?}");

    // A peer that answers UNAVAILABLE itself is retried too, each attempt
    // reaching it.
    let probe = Probe::default();
    let addr = serve(probe.clone(), &shutdown).await;
    let peers = Peers::new(
        "scoring",
        &peers_config(&[("customer", format!("http://{addr}"))]),
        None,
        shutdown.clone(),
    );
    let e = call(
        &peers.get("customer").unwrap(),
        "Down",
        Idempotency::Idempotent,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(e.attempts(), 4, "the default peer.max_attempts");
    assert_eq!(probe.downs.load(Ordering::SeqCst), 4);
    shutdown.cancel();
}

#[tokio::test]
async fn non_idempotent_calls_are_not_retried() {
    let shutdown = CancellationToken::new();
    let probe = Probe::default();
    let addr = serve(probe.clone(), &shutdown).await;
    let down = closed_port().await;
    let peers = Peers::new(
        "scoring",
        &peers_config(&[
            ("customer", format!("http://{addr}")),
            ("loyalty", format!("http://{down}")),
        ]),
        None,
        shutdown.clone(),
    );
    let e = call(
        &peers.get("customer").unwrap(),
        "Down",
        Idempotency::NotIdempotent,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(e.attempts(), 1);
    assert_eq!(
        probe.downs.load(Ordering::SeqCst),
        1,
        "the peer saw one call"
    );
    let e = call(
        &peers.get("loyalty").unwrap(),
        "Echo",
        Idempotency::NotIdempotent,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(e.attempts(), 1);
    shutdown.cancel();
}

#[tokio::test]
async fn a_caller_with_200ms_left_gives_the_peer_at_most_200ms() {
    let shutdown = CancellationToken::new();
    let slow = Probe::default();
    let slow_addr = serve(slow.clone(), &shutdown).await;
    let front = Probe {
        relay: Some(Peers::new(
            "front",
            &peers_config(&[("customer", format!("http://{slow_addr}"))]),
            None,
            shutdown.clone(),
        )),
        ..Probe::default()
    };
    let front_addr = serve(front.clone(), &shutdown).await;

    // The caller: a service with 200 ms left, calling the front through
    // its own peer client (a tonic client also cuts a call locally when
    // its grpc-timeout passes, which the peer client reports the same way).
    let caller = Peers::new(
        "caller",
        &peers_config(&[("segmentation", format!("http://{front_addr}"))]),
        None,
        shutdown.clone(),
    );
    let front_peer = caller.get("segmentation").unwrap();
    // A grpc-timeout is relative: time spent connecting is not the peer's
    // to know. The caller's channel is up, as it is in a running service.
    call(&front_peer, "Echo", Idempotency::Idempotent)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let answer = peer::with_deadline(
        tokio::time::Instant::now() + Duration::from_millis(200),
        call(&front_peer, "Relay", Idempotency::NotIdempotent),
    )
    .await;
    let elapsed = started.elapsed();

    let e = answer.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    // The front's own call to the slow peer ended at its deadline, with
    // DEADLINE_EXCEEDED (not the peer's 2 s, not UNAVAILABLE).
    let mut relayed = None;
    for _ in 0..200 {
        relayed = *front.relayed.lock().unwrap();
        if relayed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(relayed, Some(Code::DeadlineExceeded));
    let seen = slow.timeouts.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the slow peer was called");
    for t in &seen {
        let given = peer::parse_grpc_timeout(t).unwrap_or_else(|| panic!("grpc-timeout {t:?}"));
        assert!(
            given <= Duration::from_millis(200),
            "the peer got {given:?}"
        );
    }
    // Loose: the point is that nobody waited for the slow peer's 2 s.
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    shutdown.cancel();
}

/// A resolver whose answer the test changes.
#[derive(Clone, Default)]
struct Switch(Arc<Mutex<Vec<SocketAddr>>>);

impl Resolve for Switch {
    fn resolve(&self, _: &str, _: u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let addrs = self.0.lock().unwrap().clone();
        Box::pin(async move { Ok(addrs) })
    }
}

#[tokio::test]
async fn a_peer_added_behind_a_dns_name_gets_calls_without_a_restart() {
    let shutdown = CancellationToken::new();
    let a = serve(
        Probe {
            tag: "a".into(),
            ..Probe::default()
        },
        &shutdown,
    )
    .await;
    let b = serve(
        Probe {
            tag: "b".into(),
            ..Probe::default()
        },
        &shutdown,
    )
    .await;
    let names = Switch::default();
    names.0.lock().unwrap().push(a);
    let mut config = peers_config(&[("customer", "http://customer.test:50051".into())]);
    config.peer.resolve_interval_ms = 50;
    let peers = Peers::with_resolver(
        "scoring",
        &config,
        None,
        shutdown.clone(),
        Arc::new(names.clone()),
    );
    let customer = peers.get("customer").unwrap();
    for _ in 0..10 {
        let answer = call(&customer, "Echo", Idempotency::Idempotent)
            .await
            .unwrap();
        assert_eq!(answer, "a|");
    }

    names.0.lock().unwrap().push(b);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..400 {
        let answer = call(&customer, "Echo", Idempotency::Idempotent)
            .await
            .unwrap();
        seen.insert(answer);
        if seen.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["a|".to_owned(), "b|".to_owned()],
        "both replicas answer"
    );

    // And one that goes is dropped: every call reaches the other.
    names.0.lock().unwrap().retain(|x| *x != a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..10 {
        let answer = call(&customer, "Echo", Idempotency::Idempotent)
            .await
            .unwrap();
        assert_eq!(answer, "b|");
    }
    shutdown.cancel();
}

#[tokio::test]
async fn the_token_file_is_re_read_after_it_changes() {
    let shutdown = CancellationToken::new();
    let addr = serve(Probe::default(), &shutdown).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "token-a\n").unwrap();

    // From the config, as every service builds it.
    let mut config = peers_config(&[("customer", format!("http://{addr}"))]);
    config.auth.service_token_file = Some(file.clone());
    assert!(config.validate().is_ok());
    let clock: Arc<dyn clm_domain::Clock> = Arc::new(clm_domain::SystemClock);
    let from_config = TokenSource::from_config(&config, "scoring", clock)
        .unwrap()
        .expect("a token source");
    assert_eq!(from_config.token().unwrap(), "token-a");

    let tokens = TokenSource::from_file(&file, Duration::from_millis(20));
    let peers = Peers::new("scoring", &config, Some(tokens), shutdown.clone());
    let customer = peers.get("customer").unwrap();
    let answer = call(&customer, "Echo", Idempotency::Idempotent)
        .await
        .unwrap();
    assert_eq!(answer, "|Bearer token-a");

    std::fs::write(&file, "token-b\n").unwrap();
    let mut answer = String::new();
    for _ in 0..200 {
        answer = call(&customer, "Echo", Idempotency::Idempotent)
            .await
            .unwrap();
        if answer.ends_with("token-b") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(answer, "|Bearer token-b");

    // A file being rotated (gone for a moment) keeps the last token in use.
    std::fs::remove_file(&file).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let answer = call(&customer, "Echo", Idempotency::Idempotent)
        .await
        .unwrap();
    assert_eq!(answer, "|Bearer token-b");

    config.auth.service_token_file = Some(dir.path().join("missing"));
    assert_eq!(
        config.validate().unwrap_err().key,
        "auth.service_token_file"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn fan_out_answers_each_part_under_one_deadline() {
    let shutdown = CancellationToken::new();
    let up = serve(
        Probe {
            tag: "up".into(),
            ..Probe::default()
        },
        &shutdown,
    )
    .await;
    let down = closed_port().await;
    let peers = Peers::new(
        "scoring",
        &peers_config(&[
            ("customer", format!("http://{up}")),
            ("loyalty", format!("http://{down}")),
        ]),
        None,
        shutdown.clone(),
    );
    let customer = peers.get("customer").unwrap();
    let loyalty = peers.get("loyalty").unwrap();
    let parts = peer::fan_out(
        Duration::from_secs(2),
        [
            call(&customer, "Echo", Idempotency::Idempotent),
            call(&loyalty, "Echo", Idempotency::Idempotent),
        ],
    )
    .await;
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].as_ref().unwrap(), "up|");
    let e = parts[1].as_ref().unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(e.peer(), "loyalty");

    // A slow part is cut at the shared deadline; the quick one still answers.
    let started = std::time::Instant::now();
    let parts = peer::fan_out(
        Duration::from_millis(150),
        [
            call(&customer, "Echo", Idempotency::Idempotent),
            call(&customer, "Slow", Idempotency::Idempotent),
        ],
    )
    .await;
    assert!(parts[0].is_ok());
    let e = parts[1].as_ref().unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert_eq!(e.peer(), "customer");
    assert!(started.elapsed() < Duration::from_millis(1500));
    shutdown.cancel();
}

#[tokio::test]
async fn a_call_past_its_deadline_is_deadline_exceeded_from_the_server_not_cancelled() {
    use tonic_types::StatusExt;
    let shutdown = CancellationToken::new();
    let slow = Probe::default();
    let addr = serve(slow.clone(), &shutdown).await;
    // A plain HTTP/2 client with the header set by hand: a tonic Channel
    // would enforce `grpc-timeout` itself and, on a loaded machine, cut the
    // call (CANCELLED) before the server's answer arrives. What comes back
    // here is the server's answer.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<tonic::body::Body>();
    let origin = format!("http://{addr}");
    let service = tower::ServiceExt::map_request(client, move |mut r: http::Request<_>| {
        let path = r.uri().path().to_owned();
        *r.uri_mut() = format!("{origin}{path}").parse().unwrap();
        r
    });
    let mut grpc = tonic::client::Grpc::new(service);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(());
    request
        .metadata_mut()
        .insert("grpc-timeout", "500m".parse().unwrap());
    let started = std::time::Instant::now();
    let e = grpc
        .unary(
            request,
            http::uri::PathAndQuery::from_static("/test.v1.Probe/Slow"),
            tonic_prost::ProstCodec::<(), String>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    let info = e.get_error_details();
    assert_eq!(
        info.error_info().map(|i| i.reason.as_str()),
        Some("DEADLINE_EXCEEDED")
    );
    // Loose: the point is that nobody waited for the slow handler's 2 s.
    assert!(started.elapsed() < Duration::from_millis(1500));
    shutdown.cancel();
}
