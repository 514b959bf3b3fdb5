//! Logs, traces and metrics.
//!
//! `tracing` logs go to stderr, pretty or JSON. When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans and metrics are also exported
//! over OTLP/gRPC, and the W3C trace-context propagator is installed so the
//! server layer continues incoming traces and [`crate::client`] forwards them.

use crate::config::{LogConfig, LogFormat};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes exporters when dropped; keep it alive for the life of the process.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
    }
}

/// Installs the global subscriber once per process. `service` names the
/// OpenTelemetry resource. Calling it twice is harmless (the second call
/// keeps the first setup).
pub fn init(log: &LogConfig, service: &str) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter =
        EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(&log.filter));
    let fmt = match log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let mut guard = TelemetryGuard::default();
    let otel_layer = if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        match otlp(service) {
            Ok((tracer, meter)) => {
                let layer = tracing_opentelemetry::layer().with_tracer(tracer.tracer("clm"));
                opentelemetry::global::set_meter_provider(meter.clone());
                guard.tracer = Some(tracer);
                guard.meter = Some(meter);
                Some(layer)
            }
            Err(e) => {
                eprintln!("warning: OpenTelemetry export disabled: {e}");
                None
            }
        }
    } else {
        None
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel_layer)
        .try_init();
    guard
}

fn otlp(service: &str) -> anyhow::Result<(SdkTracerProvider, SdkMeterProvider)> {
    let resource = Resource::builder()
        .with_service_name(format!("clm-{service}"))
        .build();
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let tracer = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource.clone())
        .build();
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .build()?;
    let meter = SdkMeterProvider::builder()
        .with_periodic_exporter(metrics)
        .with_resource(resource)
        .build();
    Ok((tracer, meter))
}
