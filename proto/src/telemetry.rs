//! Logs to stderr and, given an OTLP endpoint, spans exported to it over gRPC. W3C trace
//! context (`traceparent`) crosses every process boundary: the router's request span is a
//! child of its client's, and the worker's of the router's, so one request is one trace. A
//! worker's scheduler steps are spans of their own, linked to the requests they served.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes the spans still queued when dropped (at the end of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(Err(err)) = self.provider.take().map(|p| p.shutdown()) {
            eprintln!("flushing the last spans to the OTLP endpoint: {err}");
        }
    }
}

/// Installs the subscriber: `RUST_LOG` (default `info`) for logs, and spans of `service` at
/// info and above batched to `otlp_endpoint` (`http://collector:4317`) when one is given. Must
/// run inside a Tokio runtime when it is: the exporter's channel lives on it.
pub fn init(service: &str, otlp_endpoint: Option<&str>) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt::layer().with_filter(filter);
    let Some(endpoint) = otlp_endpoint else {
        tracing_subscriber::registry().with(logs).init();
        return Ok(Telemetry { provider: None });
    };
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build();
    // Spans at info and above whatever RUST_LOG says of logs, and none of the exporter's own
    // stack (its spans would feed it).
    let quiet = "info,h2=off,hyper=off,hyper_util=off,tonic=off,tower=off,opentelemetry=off";
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service.to_string()))
        .with_filter(EnvFilter::new(quiet));
    tracing_subscriber::registry().with(logs).with(spans).init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// Makes `span` a child of the trace context in `metadata` (a client's `traceparent`), if
/// there is one; otherwise it starts a trace.
pub fn continue_trace(span: &tracing::Span, metadata: &MetadataMap) {
    let parent = TraceContextPropagator::new().extract(&Metadata(metadata));
    // Fails only when no OpenTelemetry layer is installed: then there is nothing to join.
    let _ = span.set_parent(parent);
}

/// Links `span` to `to`'s span, as OpenTelemetry relates a batch to the requests in it: a
/// scheduler step serves many requests, each its own trace, so it is a child of none.
pub fn link(span: &tracing::Span, to: &tracing::Span) {
    let context = to.context().span().span_context().clone();
    if context.is_valid() {
        span.add_link(context);
    }
}

/// Writes `span`'s trace context into `metadata`, for the next hop.
pub fn propagate(span: &tracing::Span, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut MetadataMut(metadata));
}

struct Metadata<'a>(&'a MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataMut<'a>(&'a mut MetadataMap);

impl Injector for MetadataMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}
