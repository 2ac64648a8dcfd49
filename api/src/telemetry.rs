//! Optional OTLP trace export for the gateway and the processors.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED` is
//! not `true`, `OTEL_TRACES_EXPORTER` not `none`); then spans go over
//! OTLP/HTTP (JSON) to that endpoint, configured by the standard `OTEL_*`
//! variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`).
//!
//! The spans are `tracing` spans with target [`TARGET`]: only the exporter
//! sees them (never the log output), and when export is off no layer wants
//! them, so creating one costs a cached callsite check. Their parents come
//! from the W3C `traceparent` stored with each webhook
//! ([`crate::trace::TraceParent`]), so the gateway's `publish` and the
//! processor's `pull`, `deliver` and `ack` of one webhook are one trace.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::trace::TraceParent;

/// The `tracing` target of every exported span.
pub const TARGET: &str = "spillway::otel";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (set once at start-up).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether the environment asks for OTLP export (see the module docs).
pub fn configured(env: impl Fn(&str) -> Option<String>) -> bool {
    let set = |k: &str| env(k).is_some_and(|v| !v.trim().is_empty());
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let no_exporter =
        env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !disabled
        && !no_exporter
}

/// The exporter and its provider, when the environment asks for them.
/// `service` names the process unless `OTEL_SERVICE_NAME` does.
pub(crate) fn provider(service: &'static str) -> Result<Option<SdkTracerProvider>, String> {
    if !configured(|k| std::env::var(k).ok()) {
        return Ok(None);
    }
    // The exporter's HTTP client is rustls without a built-in provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some(provider))
}

/// The `tracing` layer that exports [`TARGET`] spans through `provider`.
pub(crate) fn layer<S>(
    provider: &SdkTracerProvider,
    service: &'static str,
) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_filter(
            tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::TRACE),
        )
}

/// Make `tp` (a remote span: the provider's, or the gateway's `publish`)
/// the parent of `span`. Call it before the span is entered; a no-op when
/// export is off.
pub fn set_parent(span: &tracing::Span, tp: &TraceParent) {
    if !enabled() {
        return;
    }
    let remote = SpanContext::new(
        TraceId::from_bytes(tp.trace_id),
        SpanId::from_bytes(tp.parent_id),
        TraceFlags::new(tp.flags),
        true,
        TraceState::NONE,
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// `span` as a `traceparent` (its trace, its own span id), so what
/// follows is its child; `None` when export is off.
pub fn traceparent_of(span: &tracing::Span) -> Option<TraceParent> {
    if !enabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| TraceParent {
        trace_id: sc.trace_id().to_bytes(),
        parent_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_is_on_only_when_an_endpoint_is_set_and_not_disabled() {
        let on = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            configured(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        };
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        for (vars, want) in [
            (vec![], false),
            (vec![ep], true),
            (
                vec![("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c/v1/traces")],
                true,
            ),
            (vec![("OTEL_EXPORTER_OTLP_ENDPOINT", " ")], false),
            (vec![ep, ("OTEL_SDK_DISABLED", "true")], false),
            (vec![ep, ("OTEL_SDK_DISABLED", "false")], true),
            (vec![ep, ("OTEL_TRACES_EXPORTER", "none")], false),
            (vec![ep, ("OTEL_TRACES_EXPORTER", "otlp")], true),
            (vec![("OTEL_SERVICE_NAME", "x")], false),
        ] {
            assert_eq!(on(&vars), want, "{vars:?}");
        }
    }

    #[test]
    fn without_export_spans_have_no_traceparent() {
        let span = tracing::info_span!(target: TARGET, "deliver");
        set_parent(&span, &crate::trace::root());
        assert_eq!(traceparent_of(&span), None);
    }
}
