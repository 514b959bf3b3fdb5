//! The peer client: how a CLM service calls another one (queries, and the
//! commands one service gives another, such as scoring's stage moves).
//!
//! Conventions:
//! * **One channel per peer.** [`Peers`] is built once per service (it is
//!   [`crate::Runtime::peers`]) from `peers.<name> = URL`. Each peer gets one
//!   lazily created, reused [`tonic::transport::Channel`]: never a channel per
//!   call. A URL whose host is an IP literal is one endpoint; a DNS name is
//!   balanced over every address it resolves to, re-resolved every
//!   `peer.resolve_interval_ms`, so replicas that appear behind a headless
//!   service get calls without a restart and replicas that go are dropped
//!   (the last non-empty answer is kept while resolution fails). The
//!   resolution task stops with the runtime's cancellation token.
//! * **Every call carries** the service token (from
//!   [`crate::changes::TokenSource`], asked per attempt so it is renewed, or
//!   re-read from `auth.service_token_file`), the W3C trace context of a
//!   client span, and a **deadline**: inside an incoming rpc, the caller's
//!   remaining `grpc-timeout` (the server layer records it in [`DEADLINE`];
//!   see [`remaining`]), else `peer.default_timeout_ms`. The deadline is sent
//!   as `grpc-timeout` *and* enforced locally, so a peer that never answers
//!   cannot hold the caller past it.
//! * **Retries only for idempotent calls.** A call marked
//!   [`Idempotency::Idempotent`] (a mutation carrying a `request_id`, or a
//!   read) that fails with UNAVAILABLE or DEADLINE_EXCEEDED is retried with
//!   exponential backoff and jitter (`peer.min_backoff_ms` ..
//!   `peer.max_backoff_ms`, at most `peer.max_attempts` attempts), and only
//!   while the deadline leaves room for the next attempt. Anything else is
//!   answered once.
//! * **One error mapping.** A failed call is a [`PeerError`]: the peer's own
//!   [`tonic::Status`] (so a caller can match FAILED_PRECONDITION, NOT_FOUND,
//!   INVALID_ARGUMENT, ...), named by peer and rpc
//!   (`customer.TransitionStage: unavailable: ...`), and converted into
//!   [`crate::Error`] in one place when it has to reach the service's own
//!   caller.
//! * **Fan-out.** [`fan_out`] runs several calls side by side under one
//!   deadline and answers every part's result, so a view assembled from
//!   several services (Customer-360) answers what it has and marks the rest
//!   unavailable.
//! * **Telemetry.** Each call is a client span (`<peer>/<rpc>`, created only
//!   when a subscriber records info spans) and one `rpc.client.call.duration`
//!   measurement (seconds, retries included) with `peer`, `rpc.method` and
//!   `rpc.grpc.status_code`.
//!
//! ```ignore
//! let customer = rt.peers.get("customer").ok_or(..)?;
//! let moved = customer
//!     .unary("TransitionStage", Idempotency::Idempotent, request, |channel, request| async move {
//!         CustomerServiceClient::new(channel).transition_stage(request).await
//!     })
//!     .await;
//! ```

use crate::changes::TokenSource;
use crate::config::{Config, PeerConfig};
use crate::error::Error;
use backon::{ExponentialBuilder, Retryable};
use futures::future::BoxFuture;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Histogram;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tracing::Instrument;

tokio::task_local! {
    /// The instant by which the incoming rpc being served must be answered:
    /// set by the server layer from the caller's `grpc-timeout` around the
    /// handler (not inside tasks the handler spawns), and by [`fan_out`] and
    /// [`with_deadline`] around their calls.
    pub static DEADLINE: Instant;
}

/// Time left before the current rpc's deadline, if the work started from
/// an incoming rpc that had one (zero once it has passed).
pub fn remaining() -> Option<Duration> {
    deadline().map(|d| d.saturating_duration_since(Instant::now()))
}

/// The current rpc's deadline, if any (see [`DEADLINE`]).
pub fn deadline() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// Runs `work` with `deadline` as its [`DEADLINE`] (or the current one, if
/// that is sooner): peer calls inside it give the peers no more time.
pub async fn with_deadline<F: Future>(deadline: Instant, work: F) -> F::Output {
    let deadline = self::deadline().map_or(deadline, |outer| outer.min(deadline));
    DEADLINE.scope(deadline, work).await
}

/// Parses a `grpc-timeout` header value (`100m`, `2S`, `30000000u`: at most
/// eight digits and a unit of H, M, S, m, u or n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline a handler works to when its caller sent `timeout`: a little
/// earlier than the caller's (a tenth, at most 50 ms), so the server's
/// DEADLINE_EXCEEDED (or a peer's, naming the peer) travels back before the
/// caller's own timer cuts the call with a bare CANCELLED.
pub(crate) fn handler_deadline(arrived: Instant, timeout: Duration) -> Instant {
    let margin = (timeout / 10).min(Duration::from_millis(50));
    arrived + timeout.saturating_sub(margin)
}

/// Resolves a peer's host name to the addresses of its replicas.
pub trait Resolve: Send + Sync + 'static {
    /// Every address `host:port` resolves to now.
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>>;
}

/// Resolution through the system resolver ([`tokio::net::lookup_host`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Dns;

impl Resolve for Dns {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let target = format!("{host}:{port}");
        Box::pin(async move { Ok(tokio::net::lookup_host(target).await?.collect()) })
    }
}

/// Whether a call may be made more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Repeating it changes nothing (a read, or a mutation with a
    /// `request_id`): retried on UNAVAILABLE and DEADLINE_EXCEEDED.
    Idempotent,
    /// Made once; its failure is answered as is.
    NotIdempotent,
}

/// A call to a peer that failed: the peer's status, named by peer and rpc.
#[derive(Debug)]
pub struct PeerError {
    peer: String,
    rpc: String,
    status: Status,
    attempts: u32,
}

impl PeerError {
    /// `status` as the answer of `peer`'s `rpc` after `attempts` attempts.
    pub fn new(
        peer: impl Into<String>,
        rpc: impl Into<String>,
        status: Status,
        attempts: u32,
    ) -> Self {
        Self {
            peer: peer.into(),
            rpc: rpc.into(),
            status,
            attempts,
        }
    }

    /// The peer's name (`customer`).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The rpc (`TransitionStage`).
    pub fn rpc(&self) -> &str {
        &self.rpc
    }

    /// The peer's status code (or the local one: UNAVAILABLE when it could
    /// not be reached, DEADLINE_EXCEEDED when the deadline passed).
    pub fn code(&self) -> Code {
        self.status.code()
    }

    /// The peer's status, details included.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// Attempts made (more than one only for idempotent calls).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The peer's status, details included.
    pub fn into_status(self) -> Status {
        self.status
    }
}

/// The lower-case name of a status code (`deadline exceeded`).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}: {}: {}",
            self.peer,
            self.rpc,
            code_name(self.status.code()),
            self.status.message()
        )?;
        if self.attempts > 1 {
            write!(f, " (after {} attempts)", self.attempts)?;
        }
        Ok(())
    }
}

impl std::error::Error for PeerError {}

impl From<PeerError> for Error {
    /// A peer's limit (RESOURCE_EXHAUSTED with a `QuotaFailure`) stays
    /// RESOURCE_EXHAUSTED; unreachable, overloaded or cancelled peers are
    /// UNAVAILABLE, a passed
    /// deadline DEADLINE_EXCEEDED; a peer's refusal keeps its code (with the
    /// peer's field violations, resource and reason); a peer refusing this
    /// service's own credentials, or failing, is an internal error (logged,
    /// not shown).
    fn from(e: PeerError) -> Self {
        let details = e.status.get_error_details();
        let message = match details.error_info() {
            Some(info) if !info.reason.is_empty() => format!("{e} [{}]", info.reason),
            _ => e.to_string(),
        };
        if e.code() == Code::ResourceExhausted
            && let Some(quota) = details.quota_failure()
            && let Some(v) = quota.violations.first()
        {
            // A limit of the peer's (not overload): the caller's answer too.
            let limit = details
                .error_info()
                .and_then(|i| i.metadata.get("limit").cloned())
                .unwrap_or_default();
            return Error::ResourceExhausted {
                reason: "PEER_LIMIT_REACHED",
                subject: v.subject.clone(),
                limit,
                message,
            };
        }
        match e.code() {
            Code::Unavailable | Code::ResourceExhausted | Code::Cancelled => {
                Error::Unavailable(message)
            }
            Code::DeadlineExceeded => Error::DeadlineExceeded(message),
            Code::NotFound => Error::NotFound(details.resource_info().map_or_else(
                || e.status.message().trim_end_matches(" not found").to_owned(),
                |r| r.resource_name.clone(),
            )),
            Code::InvalidArgument => match details.bad_request() {
                Some(br) if !br.field_violations.is_empty() => {
                    Error::InvalidArgument(clm_domain::Violations(
                        br.field_violations
                            .iter()
                            .map(|v| clm_domain::Violation::new(&v.field, &v.description))
                            .collect(),
                    ))
                }
                _ => Error::Internal(message),
            },
            Code::FailedPrecondition => Error::FailedPrecondition {
                reason: "PEER_FAILED_PRECONDITION",
                message,
            },
            Code::AlreadyExists => Error::AlreadyExists {
                reason: "PEER_ALREADY_EXISTS",
                message,
            },
            Code::Aborted => Error::Aborted(message),
            Code::OutOfRange => Error::OutOfRange(message),
            _ => Error::Internal(message),
        }
    }
}

/// Every configured peer of one service, each with its one channel.
#[derive(Clone)]
pub struct Peers {
    shared: Arc<Shared>,
}

struct Shared {
    urls: BTreeMap<String, String>,
    settings: PeerConfig,
    tokens: Option<TokenSource>,
    resolver: Arc<dyn Resolve>,
    channels: Mutex<HashMap<String, PeerChannel>>,
    shutdown: CancellationToken,
    duration: Histogram<f64>,
}

/// A peer's channel, and (behind a DNS name) how many addresses it has.
#[derive(Clone)]
struct PeerChannel {
    channel: Channel,
    /// Addresses of the last resolution; [`UNRESOLVED`] before the first.
    addresses: Option<Arc<AtomicUsize>>,
}

const UNRESOLVED: usize = usize::MAX;

/// The message of the CANCELLED status a tonic server answers when the
/// caller's `grpc-timeout` expires ([`tonic::TimeoutExpired`]).
const TONIC_TIMEOUT_EXPIRED: &str = "Timeout expired";

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("peers", &self.shared.urls)
            .field("settings", &self.shared.settings)
            .finish()
    }
}

/// Bucket boundaries of `rpc.client.call.duration`, in seconds.
const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Peers {
    /// The peers of `service` under `config` (`peers`, `peer`), calling with
    /// `tokens`; background resolution stops with `shutdown`.
    pub fn new(
        service: &str,
        config: &Config,
        tokens: Option<TokenSource>,
        shutdown: CancellationToken,
    ) -> Self {
        Self::with_resolver(service, config, tokens, shutdown, Arc::new(Dns))
    }

    /// [`Peers::new`] resolving host names with `resolver`.
    pub fn with_resolver(
        service: &str,
        config: &Config,
        tokens: Option<TokenSource>,
        shutdown: CancellationToken,
        resolver: Arc<dyn Resolve>,
    ) -> Self {
        let duration = crate::telemetry::meter(service)
            .f64_histogram("rpc.client.call.duration")
            .with_unit("s")
            .with_description(
                "Duration of each call to a peer service, retries included, by peer, method and status code",
            )
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        Self {
            shared: Arc::new(Shared {
                urls: config.peers.clone(),
                settings: config.peer.clone(),
                tokens,
                resolver,
                channels: Mutex::default(),
                shutdown,
                duration,
            }),
        }
    }

    /// The peer configured as `name` (`peers.<name>`), if it is.
    pub fn get(&self, name: &str) -> Option<Peer> {
        self.shared.urls.contains_key(name).then(|| Peer {
            name: name.into(),
            shared: self.shared.clone(),
        })
    }

    /// The configured peers' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.shared.urls.keys().map(String::as_str)
    }
}

/// One peer service: see the [module docs](self).
#[derive(Clone)]
pub struct Peer {
    name: Arc<str>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("name", &self.name).finish()
    }
}

/// An endpoint with the platform's connection settings.
fn endpoint(url: String) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10)))
}

impl Peer {
    /// The peer's name (`customer`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The peer's channel, created on first use (inside a tokio runtime:
    /// a DNS name starts its resolution task) and reused.
    pub fn channel(&self) -> Result<Channel, Status> {
        Ok(self.peer_channel()?.channel)
    }

    fn peer_channel(&self) -> Result<PeerChannel, Status> {
        let mut channels = self
            .shared
            .channels
            .lock()
            .map_err(|_| Status::internal("peer channels poisoned"))?;
        if let Some(c) = channels.get(&*self.name) {
            return Ok(c.clone());
        }
        let url =
            self.shared.urls.get(&*self.name).ok_or_else(|| {
                Status::internal(format!("peers.{} is not configured", self.name))
            })?;
        let c = self
            .connect(url)
            .map_err(|e| Status::internal(format!("peers.{}: {e}", self.name)))?;
        channels.insert(self.name.to_string(), c.clone());
        Ok(c)
    }

    fn connect(&self, url: &str) -> Result<PeerChannel, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let host = uri
            .host()
            .ok_or_else(|| format!("{url}: no host"))?
            .to_owned();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        if host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok()
        {
            let channel = endpoint(url.to_owned())
                .map_err(|e| e.to_string())?
                .connect_lazy();
            return Ok(PeerChannel {
                channel,
                addresses: None,
            });
        }
        let (channel, changes) = Channel::balance_channel::<SocketAddr>(16);
        let addresses = Arc::new(AtomicUsize::new(UNRESOLVED));
        let scheme = if https { "https" } else { "http" };
        let make = move |addr: SocketAddr| {
            // Connect to the address, but name the peer (`:authority`) as configured.
            endpoint(format!("{scheme}://{addr}")).map(|e| e.origin(uri.clone()))
        };
        let resolution = Resolution {
            peer: self.name.to_string(),
            host,
            port,
            resolver: self.shared.resolver.clone(),
            interval: Duration::from_millis(self.shared.settings.resolve_interval_ms),
            addresses: addresses.clone(),
        };
        tokio::spawn(resolution.run(make, changes, self.shared.shutdown.clone()));
        Ok(PeerChannel {
            channel,
            addresses: Some(addresses),
        })
    }

    /// Calls `rpc` on the peer with `message`: `call` makes one attempt on
    /// the peer's channel with the prepared request (token, trace context
    /// and `grpc-timeout` set), e.g.
    /// `|ch, req| async move { CustomerServiceClient::new(ch).get_customer(req).await }`.
    /// Idempotent calls are retried (see the [module docs](self)).
    pub async fn unary<Req, Resp, F, Fut>(
        &self,
        rpc: &str,
        idempotency: Idempotency,
        message: Req,
        mut call: F,
    ) -> Result<Resp, PeerError>
    where
        Req: Clone,
        F: FnMut(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let started = Instant::now();
        let settings = &self.shared.settings;
        let deadline = deadline()
            .unwrap_or_else(|| started + Duration::from_millis(settings.default_timeout_ms));
        let span = tracing::info_span!(
            "peer call",
            otel.name = %format_args!("{}/{rpc}", self.name),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = %self.name,
            rpc.method = %rpc,
            rpc.grpc.status_code = tracing::field::Empty,
            attempts = tracing::field::Empty,
        );
        let attempts = AtomicU32::new(0);
        let outcome = async {
            let peer = self.peer_channel()?;
            if peer
                .addresses
                .as_ref()
                .is_some_and(|a| a.load(Ordering::Relaxed) == 0)
            {
                return Err(Status::unavailable("its name resolves to no address"));
            }
            let tokens = self.shared.tokens.as_ref();
            let mut attempt = || {
                attempts.fetch_add(1, Ordering::Relaxed);
                let left = deadline.saturating_duration_since(Instant::now());
                let prepared = prepare(message.clone(), left, tokens)
                    .map(|request| call(peer.channel.clone(), request));
                async move {
                    let late = || {
                        Status::deadline_exceeded(format!(
                            "no answer within {} ms",
                            left.as_millis()
                        ))
                    };
                    match tokio::time::timeout_at(deadline, prepared?).await {
                        Ok(Ok(answer)) => Ok(answer.into_inner()),
                        // A tonic server whose grpc-timeout expired answers
                        // CANCELLED ("Timeout expired"): it is our deadline.
                        Ok(Err(s))
                            if s.code() == Code::Cancelled
                                && (s.message() == TONIC_TIMEOUT_EXPIRED
                                    || Instant::now() >= deadline) =>
                        {
                            Err(late())
                        }
                        Ok(Err(s)) => Err(s),
                        Err(_) => Err(late()),
                    }
                }
            };
            match idempotency {
                Idempotency::NotIdempotent => attempt().await,
                Idempotency::Idempotent => {
                    let backoff = ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(settings.min_backoff_ms))
                        .with_max_delay(Duration::from_millis(settings.max_backoff_ms))
                        .with_max_times(settings.max_attempts.saturating_sub(1) as usize)
                        .with_jitter();
                    attempt
                        .retry(backoff)
                        .sleep(tokio::time::sleep)
                        .when(|s: &Status| {
                            matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded)
                        })
                        // Only while the deadline leaves room for another attempt.
                        .adjust(|_, pause| pause.filter(|p| Instant::now() + *p < deadline))
                        .await
                }
            }
        }
        .instrument(span.clone())
        .await;
        let code = outcome.as_ref().map_or_else(Status::code, |_| Code::Ok);
        let attempts = attempts.load(Ordering::Relaxed);
        span.record("rpc.grpc.status_code", code as i32);
        span.record("attempts", attempts);
        if code != Code::Ok {
            span.record("otel.status_code", "ERROR");
        }
        self.shared.duration.record(
            started.elapsed().as_secs_f64(),
            &[
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("peer", self.name.to_string()),
                KeyValue::new("rpc.method", rpc.to_owned()),
                KeyValue::new("rpc.grpc.status_code", code as i64),
            ],
        );
        outcome.map_err(|status| PeerError::new(&*self.name, rpc, status, attempts))
    }
}

/// One attempt's request: `message` with `left` as its `grpc-timeout`, the
/// service token and the current span's trace context.
fn prepare<Req>(
    message: Req,
    left: Duration,
    tokens: Option<&TokenSource>,
) -> Result<tonic::Request<Req>, Status> {
    if left.is_zero() {
        return Err(Status::deadline_exceeded(
            "the deadline passed before the call",
        ));
    }
    let mut request = tonic::Request::new(message);
    request.set_timeout(left);
    if let Some(tokens) = tokens {
        let token = tokens.token().map_err(Status::from)?;
        if let Some(value) = crate::client::bearer(&token) {
            request.metadata_mut().insert("authorization", value);
        }
    }
    crate::client::inject_trace_context(&tracing::Span::current(), request.metadata_mut());
    Ok(request)
}

/// Keeps a balanced channel's endpoints in step with what a host name
/// resolves to.
struct Resolution {
    peer: String,
    host: String,
    port: u16,
    resolver: Arc<dyn Resolve>,
    interval: Duration,
    addresses: Arc<AtomicUsize>,
}

impl Resolution {
    async fn run<M>(
        self,
        make: M,
        changes: tokio::sync::mpsc::Sender<Change<SocketAddr, Endpoint>>,
        shutdown: CancellationToken,
    ) where
        M: Fn(SocketAddr) -> Result<Endpoint, tonic::transport::Error>,
    {
        let mut current = BTreeSet::new();
        let mut failing = false;
        loop {
            let resolved = tokio::select! {
                r = self.resolver.resolve(&self.host, self.port) => r,
                () = shutdown.cancelled() => return,
            };
            match resolved {
                Ok(found) if !found.is_empty() => {
                    failing = false;
                    let next: BTreeSet<SocketAddr> = found.into_iter().collect();
                    for gone in current.difference(&next) {
                        if changes.send(Change::Remove(*gone)).await.is_err() {
                            return;
                        }
                    }
                    for new in next.difference(&current) {
                        match make(*new) {
                            Ok(e) => {
                                if changes.send(Change::Insert(*new, e)).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(peer = %self.peer, address = %new, error = %e, "peer address unusable");
                            }
                        }
                    }
                    if next != current {
                        tracing::info!(peer = %self.peer, host = %self.host, addresses = ?next, "peer addresses");
                    }
                    self.addresses.store(next.len(), Ordering::Relaxed);
                    current = next;
                }
                answer => {
                    if !failing {
                        let error = answer
                            .err()
                            .map_or_else(|| "no address".to_owned(), |e| e.to_string());
                        tracing::warn!(peer = %self.peer, host = %self.host, error = %error, kept = current.len(), "peer name did not resolve; keeping the addresses known");
                    }
                    failing = true;
                    if current.is_empty() {
                        self.addresses.store(0, Ordering::Relaxed);
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// Runs `calls` side by side under one deadline (`within` from now, or the
/// current rpc's, if sooner) and answers each one's result in order; a part
/// still running at the deadline is DEADLINE_EXCEEDED. The calls see the
/// deadline as [`DEADLINE`], so the peer calls in them pass it on.
pub async fn fan_out<T, Fut>(
    within: Duration,
    calls: impl IntoIterator<Item = Fut>,
) -> Vec<Result<T, PeerError>>
where
    Fut: Future<Output = Result<T, PeerError>>,
{
    let until = Instant::now() + within;
    let until = deadline().map_or(until, |outer| outer.min(until));
    futures::future::join_all(calls.into_iter().enumerate().map(|(i, call)| async move {
        match tokio::time::timeout_at(until, DEADLINE.scope(until, call)).await {
            Ok(answer) => answer,
            Err(_) => Err(PeerError::new(
                "fan-out",
                format!("part {i}"),
                Status::deadline_exceeded(format!("no answer within {} ms", within.as_millis())),
                1,
            )),
        }
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1M"), Some(Duration::from_secs(60)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("30000000u"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "12", "123456789m", "-1m", "1x", "1.5S", "1é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn peer_errors_name_the_peer_and_keep_the_code() {
        let e = PeerError::new(
            "customer",
            "TransitionStage",
            Status::unavailable("down"),
            3,
        );
        assert_eq!(
            e.to_string(),
            "customer.TransitionStage: unavailable: down (after 3 attempts)"
        );
        let status: Status = Error::from(e).into();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().starts_with("customer.TransitionStage"));

        let late = PeerError::new("loyalty", "GetMember", Status::deadline_exceeded("slow"), 1);
        let status: Status = Error::from(late).into();
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(
            status
                .get_error_details()
                .error_info()
                .map(|i| i.reason.clone()),
            Some("DEADLINE_EXCEEDED".into())
        );

        let refused: Status = Error::FailedPrecondition {
            reason: "STAGE_TRANSITION_NOT_ALLOWED",
            message: "no".into(),
        }
        .into();
        let e = PeerError::new("customer", "TransitionStage", refused, 1);
        assert_eq!(e.code(), Code::FailedPrecondition);
        let mapped = Error::from(e);
        assert!(
            matches!(&mapped, Error::FailedPrecondition { message, .. } if message.contains("STAGE_TRANSITION_NOT_ALLOWED")),
            "{mapped:?}"
        );

        let missing: Status = Error::NotFound("customers/c1".into()).into();
        let mapped = Error::from(PeerError::new("customer", "GetCustomer", missing, 1));
        assert!(
            matches!(&mapped, Error::NotFound(n) if n == "customers/c1"),
            "{mapped:?}"
        );

        let bad: Status = Error::invalid("name", "is required").into();
        let mapped = Error::from(PeerError::new("customer", "GetCustomer", bad, 1));
        assert!(matches!(&mapped, Error::InvalidArgument(v) if v.0[0].field == "name"));

        let creds = PeerError::new(
            "customer",
            "GetCustomer",
            Status::unauthenticated("bad token"),
            1,
        );
        assert!(matches!(Error::from(creds), Error::Internal(_)));
    }

    #[test]
    fn handlers_keep_a_margin_to_answer() {
        let now = Instant::now();
        let d = handler_deadline(now, Duration::from_millis(200));
        assert_eq!(d - now, Duration::from_millis(180));
        let d = handler_deadline(now, Duration::from_secs(30));
        assert_eq!(d - now, Duration::from_millis(29_950));
    }
}
