//! The platform server over a real socket. W3C trace context crosses a real
//! gRPC hop: the client interceptor injects
//! `traceparent` from the current span and the server layer continues it,
//! so the server's rpc span belongs to the caller's trace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::client::{ClientInterceptor, channel};
use clm_platform::config::Config;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// Starts the platform server alone (health and reflection) on a free port:
/// its URL, its shutdown token, its task and the directory it lives in.
async fn start(
    name: &'static str,
    health_names: &'static [&'static str],
    edit: impl FnOnce(&mut Config),
) -> (
    String,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tempfile::TempDir,
) {
    let routes = tonic::service::RoutesBuilder::default().routes();
    start_with(name, health_names, routes, edit).await
}

/// [`start`] with extra gRPC services.
async fn start_with(
    name: &'static str,
    health_names: &'static [&'static str],
    routes: tonic::service::Routes,
    edit: impl FnOnce(&mut Config),
) -> (
    String,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::defaults(name, dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    edit(&mut config);
    let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let server = tokio::spawn(async move {
        clm_platform::server::serve(
            &config,
            name,
            listener,
            routes,
            health_names,
            tonic_health::server::HealthReporter::new(),
            token,
        )
        .await
    });
    (url, shutdown, server, dir)
}

#[tokio::test]
async fn server_span_continues_the_callers_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();
    clm_platform::telemetry::export_call_spans();

    let (url, shutdown, server, _dir) = start_with("tracetest", &[], probe_routes(), |_| {}).await;

    let caller = tracing::info_span!("caller");
    let caller_trace = caller.context().span().span_context().trace_id();
    async {
        let channel = tower::ServiceBuilder::new()
            .layer(tonic::service::interceptor::InterceptorLayer::new(
                ClientInterceptor::new(None),
            ))
            .service(channel(&url).unwrap());
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        grpc.unary(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static("/test.v1.Probe/Whoami"),
            tonic_prost::ProstCodec::<(), String>::default(),
        )
        .await
        .unwrap();
        // Health probes are not traced.
        HealthClient::new(channel_for(&url))
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
    }
    .instrument(caller.clone())
    .await;
    drop(caller);
    let _ = provider.force_flush();

    let spans = exporter.get_finished_spans().unwrap();
    let rpc = spans
        .iter()
        .find(|s| {
            s.name == "test.v1.Probe/Whoami"
                && s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "rpc.method" && kv.value.as_str() == "Whoami")
        })
        .expect("server rpc span exported");
    assert!(
        spans.iter().all(|s| !s.name.starts_with("grpc.health")),
        "no health spans"
    );
    assert_eq!(
        rpc.span_context.trace_id(),
        caller_trace,
        "the server span is in the caller's trace"
    );
    let caller_span = spans
        .iter()
        .find(|s| s.name == "caller")
        .expect("caller span exported");
    assert_eq!(
        rpc.parent_span_id,
        caller_span.span_context.span_id(),
        "and is the caller span's child"
    );

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

fn channel_for(url: &str) -> tonic::transport::Channel {
    channel(url).unwrap()
}

#[tokio::test]
async fn health_reports_not_serving_while_draining() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_check_response::ServingStatus;

    let (url, shutdown, server, _dir) = start("draintest", &["draintest.v1.Service"], |c| {
        c.drain_timeout_secs = 1
    })
    .await;
    let mut watch = HealthClient::new(channel(&url).unwrap())
        .watch(HealthCheckRequest {
            service: "draintest.v1.Service".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    shutdown.cancel();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    // The open watch keeps a call in flight: the server gives up after the drain timeout.
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn calls_beyond_max_in_flight_are_shed_with_retry_info() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_types::StatusExt;

    let (url, shutdown, server, _dir) = start("shedtest", &[], |c| c.max_in_flight = 1).await;
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(channel(&url).unwrap());

    // An open bidirectional reflection stream keeps one call in flight.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(list()).await.unwrap();
    let mut open = client
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    use tokio_stream::StreamExt;
    open.next().await.unwrap().unwrap();

    let shed = client
        .server_reflection_info(tokio_stream::iter(vec![list()]))
        .await
        .unwrap_err();
    assert_eq!(shed.code(), tonic::Code::Unavailable);
    assert!(
        shed.get_details_retry_info().is_some(),
        "tells the client when to retry"
    );
    // Health checks are never shed.
    HealthClient::new(channel(&url).unwrap())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();

    drop(tx);
    drop(open);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match client
            .server_reflection_info(tokio_stream::iter(vec![list()]))
            .await
        {
            Ok(s) => {
                s.into_inner().message().await.unwrap();
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable);
                assert!(
                    std::time::Instant::now() < deadline,
                    "the slot was never released"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// A tiny gRPC service: `Boom` panics in its handler, `Whoami` answers the
/// subject of the caller's principal (through `authorize`).
#[derive(Clone)]
struct Probe;

impl tonic::server::NamedService for Probe {
    const NAME: &'static str = "test.v1.Probe";
}

struct Whoami;

impl tonic::server::UnaryService<()> for Whoami {
    type Response = String;
    type Future =
        futures::future::BoxFuture<'static, Result<tonic::Response<String>, tonic::Status>>;
    fn call(&mut self, request: tonic::Request<()>) -> Self::Future {
        let caller = clm_platform::auth::authorize(&request, &[clm_platform::auth::Role::Analyst]);
        Box::pin(async move { Ok(tonic::Response::new(caller?.subject)) })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Probe {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            if req.uri().path() == "/test.v1.Probe/Boom" {
                panic!("a bug in a handler");
            }
            let mut grpc =
                tonic::server::Grpc::new(tonic_prost::ProstCodec::<String, ()>::default());
            Ok(grpc.unary(Whoami, req).await)
        })
    }
}

fn probe_routes() -> tonic::service::Routes {
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(Probe);
    routes.routes()
}

async fn probe_call(
    channel: tonic::transport::Channel,
    method: &'static str,
    token: Option<&str>,
) -> Result<String, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(());
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(method),
        tonic_prost::ProstCodec::<(), String>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_panicking_handler_answers_internal_and_the_server_lives_on() {
    let (url, shutdown, server, _dir) = start_with("panictest", &[], probe_routes(), |_| {}).await;
    let channel = channel(&url).unwrap();
    for _ in 0..2 {
        let status = probe_call(channel.clone(), "/test.v1.Probe/Boom", None)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert_eq!(
            status.message(),
            "internal error",
            "a gRPC status, not a reset"
        );
        // The same channel keeps working.
        assert_eq!(
            probe_call(channel.clone(), "/test.v1.Probe/Whoami", None)
                .await
                .unwrap(),
            "local",
            "auth off: the server gives every call the local principal"
        );
    }
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn under_auth_calls_need_a_token_for_the_audience() {
    use clm_platform::auth::{Role, mint_hs256, mint_hs256_with};
    let secret = "server-test-secret-server-test-secret";
    let (url, shutdown, server, _dir) = start_with("authtest", &[], probe_routes(), |c| {
        c.auth.hs256_secret = Some(secret.into())
    })
    .await;
    let channel = channel(&url).unwrap();
    let ttl = std::time::Duration::from_secs(60);
    let none = probe_call(channel.clone(), "/test.v1.Probe/Whoami", None)
        .await
        .unwrap_err();
    assert_eq!(none.code(), tonic::Code::Unauthenticated);
    let elsewhere = mint_hs256_with(secret, "billing", None, "ana", &[Role::Analyst], ttl).unwrap();
    let wrong_aud = probe_call(channel.clone(), "/test.v1.Probe/Whoami", Some(&elsewhere))
        .await
        .unwrap_err();
    assert_eq!(wrong_aud.code(), tonic::Code::Unauthenticated);
    let token = mint_hs256(secret, "ana", &[Role::Analyst], ttl).unwrap();
    assert_eq!(
        probe_call(channel.clone(), "/test.v1.Probe/Whoami", Some(&token))
            .await
            .unwrap(),
        "ana"
    );
    let marketer = mint_hs256(secret, "mo", &[Role::Marketer], ttl).unwrap();
    let denied = probe_call(channel, "/test.v1.Probe/Whoami", Some(&marketer))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_server_refuses_a_public_listener_without_auth() {
    let dir = tempfile::tempdir().unwrap();
    // The config says loopback (and validates); the listener it is handed does not.
    let config = Config::defaults("bindtest", dir.path());
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let routes = tonic::service::RoutesBuilder::default().routes();
    let err = clm_platform::server::serve(
        &config,
        "bindtest",
        listener,
        routes,
        &[],
        tonic_health::server::HealthReporter::new(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("--insecure"), "{err}");

    // With --insecure it serves.
    let mut config = Config::defaults("bindtest", dir.path());
    config.insecure = true;
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let server = tokio::spawn(async move {
        let routes = tonic::service::RoutesBuilder::default().routes();
        clm_platform::server::serve(
            &config,
            "bindtest",
            listener,
            routes,
            &[],
            tonic_health::server::HealthReporter::new(),
            token,
        )
        .await
    });
    let url = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while HealthClient::new(channel(&url).unwrap())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_err()
    {
        assert!(std::time::Instant::now() < deadline, "never served");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// Signs `claims` with `secret` (HS256), as an identity provider would.
fn sign(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Every token rule through the real server: `nbf` is enforced, a
/// configured audience and issuer must be carried, an empty subject is
/// refused; the status says why, never echoing the token.
#[tokio::test]
async fn strict_claims_are_enforced_by_the_server() {
    let secret = "claims-test-secret-claims-test-secret!";
    let (url, shutdown, server, _dir) = start_with("claimstest", &[], probe_routes(), |c| {
        c.auth.hs256_secret = Some(secret.into());
        c.auth.audience = Some("crm-eu".into());
        c.auth.issuer = Some("https://idp.example".into());
    })
    .await;
    let ch = channel(&url).unwrap();
    let exp = now() + 600;
    let good = serde_json::json!({
        "sub": "ana", "roles": ["analyst"], "exp": exp,
        "aud": "crm-eu", "iss": "https://idp.example",
    });
    let call = |claims: serde_json::Value| {
        let token = sign(secret, claims);
        let ch = ch.clone();
        async move { probe_call(ch, "/test.v1.Probe/Whoami", Some(&token)).await }
    };
    assert_eq!(call(good.clone()).await.unwrap(), "ana");
    let mut already = good.clone();
    already["nbf"] = (now() - 10).into();
    assert_eq!(call(already).await.unwrap(), "ana", "a past nbf is fine");

    let refused = |claims: serde_json::Value, why: &'static str| async move {
        let status = call(claims).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::Unauthenticated,
            "{why}: {status:?}"
        );
        assert!(
            status.message().contains(why),
            "{why}: {}",
            status.message()
        );
        assert!(
            !status.message().contains("eyJ"),
            "no token in {}",
            status.message()
        );
    };
    let mut post_dated = good.clone();
    post_dated["nbf"] = (now() + 3600).into();
    refused(post_dated, "nbf").await;
    let mut no_aud = good.clone();
    no_aud.as_object_mut().unwrap().remove("aud");
    refused(no_aud, "aud").await;
    let mut other_aud = good.clone();
    other_aud["aud"] = "billing".into();
    refused(other_aud, "aud").await;
    let mut no_iss = good.clone();
    no_iss.as_object_mut().unwrap().remove("iss");
    refused(no_iss, "iss").await;
    let mut other_iss = good.clone();
    other_iss["iss"] = "https://evil.example".into();
    refused(other_iss, "iss").await;
    let mut empty_sub = good.clone();
    empty_sub["sub"] = "".into();
    refused(empty_sub, "sub").await;
    let mut blank_sub = good.clone();
    blank_sub["sub"] = "   ".into();
    refused(blank_sub, "sub").await;
    let mut no_sub = good.clone();
    no_sub.as_object_mut().unwrap().remove("sub");
    refused(no_sub, "sub").await;
    let mut expired = good.clone();
    expired["exp"] = (now() - 3600).into();
    refused(expired, "exp").await;

    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// Without a configured issuer, `iss` is not required (and the default
/// audience still is).
#[tokio::test]
async fn without_an_issuer_configured_iss_is_optional() {
    let secret = "claims-test-secret-claims-test-secret!";
    let (url, shutdown, server, _dir) = start_with("noisstest", &[], probe_routes(), |c| {
        c.auth.hs256_secret = Some(secret.into());
    })
    .await;
    let ch = channel(&url).unwrap();
    let token = sign(
        secret,
        serde_json::json!({"sub": "ana", "roles": ["analyst"], "exp": now() + 600, "aud": "clm"}),
    );
    assert_eq!(
        probe_call(ch.clone(), "/test.v1.Probe/Whoami", Some(&token))
            .await
            .unwrap(),
        "ana"
    );
    let no_aud = sign(
        secret,
        serde_json::json!({"sub": "ana", "roles": ["analyst"], "exp": now() + 600}),
    );
    assert_eq!(
        probe_call(ch, "/test.v1.Probe/Whoami", Some(&no_aud))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// Reflection serves the google.rpc error details the API answers with,
/// so reflective clients (grpcurl) render BadRequest and QuotaFailure.
#[tokio::test]
async fn reflection_serves_the_error_detail_messages() {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (url, shutdown, server, _dir) = start("reflecttest", &[], |_| {}).await;
    let mut client = ServerReflectionClient::new(channel(&url).unwrap());
    for symbol in [
        "google.rpc.BadRequest",
        "google.rpc.QuotaFailure",
        "google.rpc.ErrorInfo",
        "google.rpc.ResourceInfo",
        "google.rpc.RetryInfo",
    ] {
        let ask = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
        };
        let mut answers = client
            .server_reflection_info(tokio_stream::iter(vec![ask]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.next().await.unwrap().unwrap();
        match answer.message_response {
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                assert!(!files.file_descriptor_proto.is_empty(), "{symbol}");
            }
            other => panic!("{symbol}: {other:?}"),
        }
    }
    shutdown.cancel();
    server.await.unwrap().unwrap();
}
