//! Logs, traces and metrics.
//!
//! `tracing` logs go to stderr, pretty or JSON; inside a call every line
//! carries the call span's `trace_id` and `span_id` (see [`crate::server`]),
//! so a log line leads to its trace. When `telemetry.otlp_endpoint` (or the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` variable) is set, spans and
//! metrics are also exported over OTLP/gRPC, and the W3C trace-context
//! propagator is installed so the server layer continues incoming traces and
//! [`crate::client`] forwards them.
//!
//! **One resource per service, even in one process.** `clm up` runs every
//! service in one process, yet each service's spans and metrics carry its
//! own `service.name` (`clm-customer`, `clm-scoring`, ...):
//! * metrics: [`meter`] hands each service a meter of its own
//!   [`SdkMeterProvider`], whose resource names the service;
//! * spans: there is one tracer (the `tracing` bridge has one), whose
//!   processor routes each finished span to the batch exporter of its
//!   service. The server layer marks a call's span with the service; child
//!   spans (database statements, a handler's own spans) inherit it from
//!   their parent. Spans of no service go out under the process's resource
//!   (`clm-up`).
//!
//! **Database spans.** [`observe_database`] makes every SQL statement run
//! inside a traced call a child span named after its operation and table
//! (`SELECT customers`), with `db.system` and `db.statement`: the SQL text
//! with bind parameters as placeholders. Any literal written into the SQL
//! is masked (`'?'`, `?`) before export, so no value (no personal data)
//! leaves the process. Statements outside a traced call (relays, purges)
//! make no span.
//!
//! **Noise.** The `tracing` bridge's own attributes (`busy_ns`, `idle_ns`,
//! `thread.*`, `code.*`, `target`) are exported only with
//! `telemetry.span_details = true`.

use crate::config::{Config, LogFormat, TelemetryConfig};
use opentelemetry::KeyValue;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, Tracer as _,
    TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, SdkTracerProvider, Span, SpanData, SpanProcessor,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The span attribute naming the CLM service a span belongs to. The
/// exporter turns it into the span's resource (`service.name =
/// clm-<service>`) and drops it from the exported attributes.
pub const SERVICE_ATTRIBUTE: &str = "clm.service";

/// Span fields that exist for log lines only (the span's own ids) and are
/// not exported as attributes.
const LOG_ONLY_ATTRIBUTES: [&str; 3] = [SERVICE_ATTRIBUTE, "trace_id", "span_id"];

/// The target of the call span ([`crate::server`]): its own target, so the
/// log filter enables it with a static directive (`clm_rpc=info`) whatever
/// the log level, and the per-callsite interest of every other span and
/// event stays cached instead of being filtered on every call.
pub const CALL_TARGET: &str = "clm_rpc";

/// The transport crates whose spans and events never become trace spans.
const TRANSPORT_TARGETS: [&str; 6] = ["h2", "hyper", "hyper_util", "tonic", "tower", "tower_http"];

/// The instrumentation scope of every CLM instrument and span.
const SCOPE: &str = "clm-platform";

/// Flushes exporters when dropped; keep it alive for the life of the process.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports every finished span and the current metrics now.
    pub fn flush(&self) {
        if let Some(t) = &self.tracer {
            let _ = t.force_flush();
        }
        if let Some(state) = STATE.get() {
            for m in lock(&state.meters).values() {
                let _ = m.force_flush();
            }
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(state) = STATE.get() {
            for m in lock(&state.meters).values() {
                let _ = m.shutdown();
            }
        }
    }
}

/// What the process exports to, set once by [`init`].
struct State {
    /// OTLP/gRPC endpoint.
    endpoint: String,
    /// Seconds between metric exports.
    metric_interval: Duration,
    /// Meter providers by service name.
    meters: Mutex<HashMap<String, SdkMeterProvider>>,
    /// The span router of the one tracer provider.
    router: Arc<Router>,
}

static STATE: OnceLock<State> = OnceLock::new();
static DETAILS: OnceLock<bool> = OnceLock::new();
static CALL_SPANS_EXPORTED: AtomicBool = AtomicBool::new(false);

/// Whether an OpenTelemetry layer records the call spans of the server
/// layer ([`crate::server`]): then each call span carries the RPC
/// attributes and continues the caller's trace; otherwise it is for the
/// log only and carries just the rpc, the request id and the caller's
/// trace id. [`init`] sets it when it installs the OTLP layer.
pub fn call_spans_exported() -> bool {
    CALL_SPANS_EXPORTED.load(Ordering::Relaxed)
}

/// Says that an OpenTelemetry layer records spans: code that installs its
/// own layer instead of [`init`]'s (a test with an in-memory exporter)
/// calls it before serving.
pub fn export_call_spans() {
    CALL_SPANS_EXPORTED.store(true, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The resource of `service` (`customer` → `service.name = clm-customer`).
pub fn resource(service: &str) -> Resource {
    Resource::builder()
        .with_service_name(format!("clm-{service}"))
        .with_attribute(KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION").to_owned(),
        ))
        .build()
}

/// The OTLP endpoint `telemetry` asks for: its own, else the standard variable.
fn endpoint(telemetry: &TelemetryConfig) -> Option<String> {
    telemetry
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.is_empty())
}

/// Installs the global subscriber once per process. `process` names the
/// resource of spans that belong to no service (`up` under `clm up`, else
/// the service). Calling it twice is harmless (the second call keeps the
/// first setup). Must run inside the Tokio runtime (the OTLP exporters
/// live there).
pub fn init(config: &Config, process: &str) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let log = &config.log;
    let filter =
        EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(&log.filter));
    let filter = with_call_span(filter);
    let fmt = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        // Colours only on a terminal: a log file or collector gets plain
        // text, and no call pays for escape codes nobody sees.
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
    };
    let details = config.telemetry.span_details;
    let _ = DETAILS.set(details);
    let mut guard = TelemetryGuard::default();
    let otel_layer = match endpoint(&config.telemetry) {
        Some(endpoint) if STATE.get().is_none() => {
            match otlp(&endpoint, &config.telemetry, process) {
                Ok(tracer) => {
                    let layer = tracing_opentelemetry::layer()
                        .with_tracer(tracer.tracer(SCOPE))
                        .with_tracked_inactivity(details)
                        .with_threads(details)
                        .with_location(details)
                        .with_target(details)
                        // Error events are log lines, not span statuses:
                        // the server layer sets a call's status from its code.
                        .with_error_records_to_exceptions(false)
                        // The log filter chooses log lines only: traces
                        // always get the info level spans (every call),
                        // whatever the log level, but never the transport's
                        // own (h2, hyper, tonic, tower): static, per target.
                        .with_filter(trace_filter());
                    opentelemetry::global::set_tracer_provider(tracer.clone());
                    guard.tracer = Some(tracer);
                    export_call_spans();
                    Some(layer)
                }
                Err(e) => {
                    eprintln!("warning: OpenTelemetry export disabled: {e}");
                    None
                }
            }
        }
        _ => None,
    };
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel_layer)
        .try_init();
    guard
}

/// `filter` plus the call span, always on for the log whatever the level,
/// so every line logged inside a call (a warn included) names its trace. A
/// static target directive, not a dynamic filter: every callsite's interest
/// is decided once and cached, and the filter's maximum level stays what
/// the log asks for (a dynamic `or` filter has none, so every `trace!` in
/// h2 and hyper was filtered again on every call).
fn with_call_span(filter: EnvFilter) -> EnvFilter {
    match format!("{CALL_TARGET}=info").parse() {
        Ok(always) => filter.add_directive(always),
        Err(_) => filter,
    }
}

/// What the OTLP layer records: info and above, except the transport's
/// internals. A static filter, so callsite interest is cached.
fn trace_filter() -> tracing_subscriber::filter::Targets {
    TRANSPORT_TARGETS.iter().fold(
        tracing_subscriber::filter::Targets::new()
            .with_default(tracing_subscriber::filter::LevelFilter::INFO),
        |t, target| t.with_target(*target, tracing_subscriber::filter::LevelFilter::OFF),
    )
}

fn otlp(
    endpoint: &str,
    telemetry: &TelemetryConfig,
    process: &str,
) -> anyhow::Result<SdkTracerProvider> {
    let default = span_processor(endpoint, process)?;
    let router = Arc::new(Router {
        process: process.to_owned(),
        default,
        services: RwLock::default(),
        owners: Mutex::default(),
    });
    let tracer = SdkTracerProvider::builder()
        .with_span_processor(RouterHandle(router.clone()))
        .with_resource(resource(process))
        .build();
    let state = State {
        endpoint: endpoint.to_owned(),
        metric_interval: Duration::from_secs(telemetry.metric_interval_secs.max(1)),
        meters: Mutex::default(),
        router,
    };
    if STATE.set(state).is_err() {
        anyhow::bail!("telemetry is already initialised");
    }
    Ok(tracer)
}

fn span_processor(endpoint: &str, service: &str) -> anyhow::Result<BatchSpanProcessor> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let mut processor = BatchSpanProcessor::builder(exporter).build();
    processor.set_resource(&resource(service));
    Ok(processor)
}

/// Prepares the exporters of `service` (its span route and meter), so its
/// first spans already go out under its own resource. [`crate::service::run`]
/// calls it; without OTLP export it does nothing.
pub fn register(service: &str) {
    let Some(state) = STATE.get() else { return };
    let mut services = state
        .router
        .services
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // A single-service process: its resource is the default route's.
    if service != state.router.process && !services.contains_key(service) {
        match span_processor(&state.endpoint, service) {
            Ok(p) => {
                services.insert(service.to_owned(), p);
            }
            Err(e) => tracing::warn!(service, error = %e, "span export for this service disabled"),
        }
    }
    drop(services);
    let _ = meter(service);
}

/// A meter whose instruments report under `service`'s resource
/// (`service.name = clm-<service>`). Without OTLP export: the global
/// meter provider's (tests may install one; by default it records nothing).
pub fn meter(service: &str) -> opentelemetry::metrics::Meter {
    use opentelemetry::metrics::MeterProvider as _;
    let Some(state) = STATE.get() else {
        return opentelemetry::global::meter(SCOPE);
    };
    let mut meters = lock(&state.meters);
    if let Some(m) = meters.get(service) {
        return m.meter(SCOPE);
    }
    let exporter = match opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(&state.endpoint)
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(service, error = %e, "metric export for this service disabled");
            return opentelemetry::global::meter(SCOPE);
        }
    };
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
        .with_interval(state.metric_interval)
        .build();
    let provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource(service))
        .build();
    let m = provider.meter(SCOPE);
    meters.insert(service.to_owned(), provider);
    m
}

/// Sends each finished span to the exporter of the service it belongs to.
#[derive(Debug)]
struct Router {
    /// The process's name: its own spans go to `default`.
    process: String,
    /// Spans of no (registered) service: the process's resource.
    default: BatchSpanProcessor,
    /// By service name.
    services: RwLock<HashMap<String, BatchSpanProcessor>>,
    /// The service of each span still open, so its children inherit it.
    owners: Mutex<HashMap<SpanId, Arc<str>>>,
}

/// The router as the provider's processor (the provider owns its
/// processors; the router is shared with [`register`]).
#[derive(Debug)]
struct RouterHandle(Arc<Router>);

impl SpanProcessor for RouterHandle {
    fn on_start(&self, span: &mut Span, cx: &opentelemetry::Context) {
        let Some(data) = span.exported_data() else {
            return;
        };
        let own = data
            .attributes
            .iter()
            .find(|kv| kv.key.as_str() == SERVICE_ATTRIBUTE)
            .map(|kv| Arc::<str>::from(kv.value.as_str().as_ref()));
        let mut owners = lock(&self.0.owners);
        let service = own.or_else(|| {
            let parent = cx.span().span_context().span_id();
            owners.get(&parent).cloned()
        });
        if let Some(service) = service {
            owners.insert(data.span_context.span_id(), service.clone());
            drop(owners);
            span.set_attribute(KeyValue::new(SERVICE_ATTRIBUTE, service.to_string()));
        }
    }

    fn on_end(&self, mut span: SpanData) {
        let owner = lock(&self.0.owners).remove(&span.span_context.span_id());
        span.attributes
            .retain(|kv| !LOG_ONLY_ATTRIBUTES.contains(&kv.key.as_str()));
        let services = self
            .0
            .services
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match owner.as_deref().and_then(|s| services.get(s)) {
            Some(p) => p.on_end(span),
            None => self.0.default.on_end(span),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let services = self
            .0
            .services
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in services.values() {
            p.force_flush()?;
        }
        self.0.default.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let services = self
            .0
            .services
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in services.values() {
            let _ = p.shutdown_with_timeout(timeout);
        }
        self.0.default.shutdown_with_timeout(timeout)
    }
}

/// Whether spans carry the tracing library's own details (see the module docs).
pub fn span_details() -> bool {
    DETAILS.get().copied().unwrap_or(false)
}

/// Makes every SQL statement `db` runs inside a traced call a child span
/// of that call (see the module docs). `db` must not have been cloned yet
/// (clones keep the callback they had).
pub fn observe_database(db: &mut sea_orm::DatabaseConnection, service: &'static str) {
    let system = match db.get_database_backend() {
        sea_orm::DbBackend::Postgres => "postgresql",
        sea_orm::DbBackend::Sqlite => "sqlite",
        sea_orm::DbBackend::MySql => "mysql",
        _ => "other_sql",
    };
    db.set_metric_callback(move |info| database_span(service, system, info));
}

fn database_span(service: &'static str, system: &'static str, info: &sea_orm::metric::Info<'_>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let current = tracing::Span::current();
    if current.is_none() {
        return;
    }
    let parent = current.context();
    let parent_span: SpanContext = parent.span().span_context().clone();
    if !parent_span.is_valid() || !parent_span.is_sampled() {
        return;
    }
    let end = std::time::SystemTime::now();
    let start = end.checked_sub(info.elapsed).unwrap_or(end);
    let statement = mask_literals(&info.statement.sql);
    // Only reached once export is on (a valid parent), so the global
    // provider is ours by then.
    static TRACER: OnceLock<opentelemetry::global::BoxedTracer> = OnceLock::new();
    let tracer = TRACER.get_or_init(|| opentelemetry::global::tracer(SCOPE));
    let mut span = tracer
        .span_builder(operation_name(&statement))
        .with_kind(SpanKind::Client)
        .with_start_time(start)
        .with_attributes([
            KeyValue::new("db.system", system),
            KeyValue::new("db.statement", statement),
            KeyValue::new(SERVICE_ATTRIBUTE, service),
        ])
        .start_with_context(tracer, &parent);
    if info.failed {
        span.set_status(Status::error("statement failed"));
    }
    span.end_with_timestamp(end);
}

/// `SELECT customers`, `INSERT outbox`, ...: the statement's operation and
/// its first table (OpenTelemetry's `{db.operation} {db.collection}`).
pub fn operation_name(sql: &str) -> String {
    let words: Vec<&str> = sql.split_whitespace().take(64).collect();
    let Some(first) = words.first() else {
        return "SQL".into();
    };
    let op = first.to_ascii_uppercase();
    let after = |keyword: &str| {
        words
            .iter()
            .position(|w| w.eq_ignore_ascii_case(keyword))
            .and_then(|i| words.get(i + 1))
    };
    let table = match op.as_str() {
        "SELECT" | "DELETE" => after("FROM"),
        "INSERT" => after("INTO"),
        "UPDATE" => words.get(1),
        _ => None,
    };
    match table {
        Some(t) => {
            let t: String = t
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                .collect();
            if t.is_empty() {
                op
            } else {
                format!("{op} {t}")
            }
        }
        None => op,
    }
}

/// `sql` with every string literal replaced by `'?'` and every numeric
/// literal by `?`; placeholders (`$1`, `?`), identifiers and keywords stay.
/// CLM binds its values, so this is a second line of defence: no value
/// written into a statement reaches a trace.
pub fn mask_literals(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    let mut prev: Option<char> = None;
    while let Some(c) = chars.next() {
        if c == '\'' {
            // A string literal, '' being an escaped quote inside it.
            loop {
                match chars.next() {
                    Some('\'') if chars.peek() == Some(&'\'') => {
                        chars.next();
                    }
                    Some('\'') | None => break,
                    Some(_) => {}
                }
            }
            out.push_str("'?'");
            prev = Some('\'');
            continue;
        }
        let in_word = prev.is_some_and(|p| p.is_ascii_alphanumeric() || p == '_' || p == '$');
        if c.is_ascii_digit() && !in_word {
            while chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphanumeric() || *n == '.')
            {
                chars.next();
            }
            out.push('?');
            prev = Some('0');
            continue;
        }
        out.push(c);
        prev = Some(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_static_and_leave_out_the_transport() {
        use tracing::Level;
        use tracing_subscriber::filter::LevelFilter;
        use tracing_subscriber::layer::Filter;
        // A warn log still gets the call span, and its maximum level is
        // info: debug and trace callsites (h2, hyper) are never consulted.
        let log = with_call_span(EnvFilter::new("warn"));
        assert_eq!(
            <EnvFilter as Filter<tracing_subscriber::Registry>>::max_level_hint(&log),
            Some(LevelFilter::INFO)
        );
        let traces = trace_filter();
        assert!(traces.would_enable(CALL_TARGET, &Level::INFO));
        assert!(traces.would_enable("clm_customer::api", &Level::INFO));
        assert!(!traces.would_enable("clm_customer::api", &Level::DEBUG));
        for transport in TRANSPORT_TARGETS {
            assert!(!traces.would_enable(transport, &Level::INFO), "{transport}");
            assert!(!traces.would_enable(&format!("{transport}::proto"), &Level::ERROR));
        }
    }

    #[test]
    fn literals_are_masked_placeholders_kept() {
        assert_eq!(
            mask_literals(
                "SELECT \"t1\".\"a\" FROM t1 WHERE email = 'ada@example.com' AND n > 42 AND id = $1 LIMIT 10"
            ),
            "SELECT \"t1\".\"a\" FROM t1 WHERE email = '?' AND n > ? AND id = $1 LIMIT ?"
        );
        assert_eq!(mask_literals("x = 'it''s' OR y = ?"), "x = '?' OR y = ?");
        assert_eq!(mask_literals("v = 1.5e3"), "v = ?");
    }

    #[test]
    fn operation_names_name_the_table() {
        assert_eq!(
            operation_name("SELECT \"a\" FROM \"customers\" WHERE id = $1"),
            "SELECT customers"
        );
        assert_eq!(
            operation_name("insert into outbox (a) values ($1)"),
            "INSERT outbox"
        );
        assert_eq!(operation_name("UPDATE \"stages\" SET"), "UPDATE stages");
        assert_eq!(operation_name("BEGIN"), "BEGIN");
        assert_eq!(operation_name(""), "SQL");
    }
}
