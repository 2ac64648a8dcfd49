//! The webhook handler and the admin endpoints: routing, the request
//! slots and body budget, verification, the rate limit and the publish
//! (answered 2xx only after JetStream's PubAck). Errors are in
//! [`crate::error`], the stored message in [`crate::message`], the accept
//! loop in [`crate::listener`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use governor::clock::{Clock, DefaultClock};
use http_body_util::BodyExt;
use spillway_api::telemetry;
use spillway_api::trace::TraceParent;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, debug_span, field, info_span, warn};

use crate::delivery;
pub use crate::error::ApiError;
use crate::handshake::{self, Reply};
use crate::listener::ClientAddr;
use crate::listener::ClientSlots;
use crate::message::{Accepted, ordering_key, stored_message};
use crate::metrics::{EndpointLabels, Metrics, RequestLabels, VerifyLabels};
use crate::route::{self, Route};
use crate::verify::Inbound;

/// Tunables of request handling.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Deadline for a publish, from sending to PubAck.
    pub publish_timeout: Duration,
    /// Deadline for reading a request body (slow senders are cut off).
    pub body_timeout: Duration,
    /// Retry-After sent with 503s, seconds.
    pub retry_after_secs: u64,
    /// Publishes awaiting their PubAck at once, across all requests.
    pub max_in_flight_publishes: usize,
    /// Webhook requests past routing (reading their body, verifying,
    /// publishing) at once, across all endpoints. A request over the cap is
    /// answered 503 before its body is read, which bounds the memory held by
    /// bodies of requests that are not yet authenticated.
    pub max_concurrent_requests: usize,
    /// Bytes the bodies of requests not yet verified may hold at once,
    /// across all requests (reserved as buffers grow, before they grow).
    /// Three quarters may go to large bodies (declared over
    /// [`SMALL_BODY`] or of unknown length), a quarter is kept for small
    /// ones, which is what providers send.
    pub body_budget_bytes: u64,
    /// Slowest accepted body upload after [`BODY_RATE_GRACE`], bytes per
    /// second (0: no minimum); slower senders get 408.
    pub min_body_bytes_per_second: u64,
    /// Webhook requests one client address may have past routing at once
    /// (0: no limit); more get 429 before their body is read, so one
    /// client cannot take every slot. Only meaningful where the gateway
    /// sees client addresses (behind a load balancer every request comes
    /// from it).
    pub max_requests_per_client: usize,
}

/// A body up to this size (declared) is "small": it draws on the budget
/// kept for small bodies and may use every request slot.
pub const SMALL_BODY: u64 = 64 * 1024;
/// Time a sender has before the minimum body rate applies.
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(2);

impl Default for Limits {
    fn default() -> Self {
        Self {
            publish_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            retry_after_secs: 5,
            max_in_flight_publishes: 4096,
            max_concurrent_requests: 256,
            body_budget_bytes: 64 * 1024 * 1024,
            min_body_bytes_per_second: 16 * 1024,
            max_requests_per_client: 0,
        }
    }
}

/// Shared state of the gateway.
#[derive(Debug)]
pub struct Gateway {
    /// The live routing table.
    pub router: Arc<route::Router>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// True once the routing source has synced at least once.
    pub synced: Arc<AtomicBool>,
    /// Limits.
    pub limits: Limits,
    nats: async_nats::Client,
    js: jetstream::Context,
    permits: Semaphore,
    requests: Semaphore,
    clients: ClientSlots,
    /// Slots large-body requests may hold (half of `requests`).
    large_requests: Semaphore,
    /// Body budget, in KiB, for small and for large bodies.
    small_budget: Semaphore,
    large_budget: Semaphore,
    draining: AtomicBool,
    clock: DefaultClock,
}

impl Gateway {
    /// Build the state around a NATS client.
    pub fn new(
        nats: async_nats::Client,
        router: Arc<route::Router>,
        metrics: Arc<Metrics>,
        synced: Arc<AtomicBool>,
        limits: Limits,
    ) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(limits.publish_timeout)
            .build(nats.clone());
        Self {
            permits: Semaphore::new(limits.max_in_flight_publishes.max(1)),
            requests: Semaphore::new(limits.max_concurrent_requests.max(1)),
            clients: ClientSlots::new(limits.max_requests_per_client),
            large_requests: Semaphore::new((limits.max_concurrent_requests / 2).max(1)),
            small_budget: Semaphore::new(kib(limits.body_budget_bytes / 4)),
            large_budget: Semaphore::new(kib(
                limits.body_budget_bytes - limits.body_budget_bytes / 4
            )),
            draining: AtomicBool::new(false),
            router,
            metrics,
            synced,
            limits,
            nats,
            js,
            clock: DefaultClock::default(),
        }
    }

    /// Ready: not shutting down, routing table synced and NATS connected.
    pub fn ready(&self) -> bool {
        !self.draining()
            && self.synced.load(AtomicOrdering::Acquire)
            && self.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// Shutdown has begun: `/readyz` answers 503 from now on (so load
    /// balancers stop sending) while webhooks are still served.
    pub fn start_draining(&self) {
        self.draining.store(true, AtomicOrdering::Release);
    }

    /// Whether [`start_draining`](Self::start_draining) was called.
    pub fn draining(&self) -> bool {
        self.draining.load(AtomicOrdering::Acquire)
    }

    /// Flush what the NATS client still buffers, waiting at most
    /// `publish_timeout` (a client that is not connected, e.g. refused by
    /// NATS, would otherwise wait forever).
    pub async fn flush(&self) {
        match tokio::time::timeout(self.limits.publish_timeout, self.nats.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "flushing NATS on shutdown failed"),
            Err(_) => warn!("flushing NATS on shutdown timed out"),
        }
    }
}

/// The public router: every path goes to the webhook handler.
pub fn app(state: Arc<Gateway>) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// The admin router: `/healthz`, `/readyz`, `/metrics`.
pub fn admin_app(state: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(gw): State<Arc<Gateway>>| async move {
                if gw.ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(gw): State<Arc<Gateway>>| async move {
                gw.metrics
                    .routes
                    .set(i64::try_from(gw.router.table().len()).unwrap_or(i64::MAX));
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    gw.metrics.encode(),
                )
            }),
        )
        .with_state(state)
}

struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

async fn handle(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    gw.metrics.in_flight.inc();
    let _guard = InFlight(&gw.metrics);
    let route = gw.router.table().get(req.uri().path());
    let endpoint = route
        .as_ref()
        .map(|r| r.label.clone())
        .unwrap_or_else(|| gw.metrics.unknown_endpoint.clone());
    // Debug level: at the default level it costs nothing per request;
    // warnings name the endpoint themselves.
    let span = debug_span!("webhook", endpoint = %endpoint, method = %req.method());
    // Exported (OTLP) only: a disabled callsite when export is off.
    let otel = info_span!(
        target: telemetry::TARGET,
        "webhook",
        otel.kind = "server",
        webhook.endpoint = %endpoint,
        http.request.method = %req.method(),
        http.response.status_code = field::Empty,
    );
    if telemetry::enabled()
        && let Some(tp) = incoming_traceparent(req.headers())
    {
        telemetry::set_parent(&otel, &tp);
    }
    let response = match route {
        None => ApiError::NotFound.into_response(),
        Some(route) => match handle_route(&gw, &route, req)
            .instrument(span.clone())
            .instrument(otel.clone())
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if let ApiError::Unauthorized(f) = &e {
                    gw.metrics
                        .verify_failures
                        .get_or_create(&VerifyLabels {
                            webhook_endpoint: endpoint.clone(),
                            reason: f.reason().to_owned(),
                        })
                        .inc();
                }
                span.in_scope(|| debug!(error = %e, "rejected"));
                e.into_response()
            }
        },
    };
    otel.record("http.response.status_code", response.status().as_u16());
    gw.metrics
        .requests
        .get_or_create(&RequestLabels {
            webhook_endpoint: endpoint,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// The request's valid `traceparent`.
fn incoming_traceparent(headers: &HeaderMap) -> Option<TraceParent> {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
}

fn reply(r: Reply) -> Result<Response, ApiError> {
    match r {
        Reply::Text(t) => Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            t,
        )
            .into_response()),
        Reply::Json(v) => Ok((StatusCode::OK, Json(v)).into_response()),
        Reply::Forbidden => Err(ApiError::Forbidden),
    }
}

async fn handle_route(gw: &Gateway, route: &Route, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let query = parts.uri.query();
    if let Some(h) = &route.handshake
        && let Some(r) =
            handshake::before_verify(h.kind, &parts.method, query, h.meta_verify_token.as_deref())
    {
        return reply(r);
    }
    if parts.method != Method::POST && parts.method != Method::PUT {
        return Err(ApiError::MethodNotAllowed);
    }
    if route.suspended {
        return Err(ApiError::Unavailable {
            reason: "suspended",
            retry_after: gw.limits.retry_after_secs,
        });
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.max_body_bytes) {
        return Err(ApiError::PayloadTooLarge);
    }
    // Taken before the body is buffered and held until the answer: bodies
    // of unauthenticated requests cannot pile up past the global cap, large
    // ones not past half of it (small ones, what providers send, always
    // find a slot the large ones cannot take).
    let overloaded = || ApiError::Unavailable {
        reason: "overloaded",
        retry_after: gw.limits.retry_after_secs,
    };
    // One client's share first: it cannot take every slot.
    let _client_slot = match parts.extensions.get::<ClientAddr>() {
        Some(c) => Some(gw.clients.take(c.0).ok_or(ApiError::ClientBusy {
            retry_after: gw.limits.retry_after_secs,
        })?),
        None => None,
    };
    let _request_permit = gw.requests.try_acquire().map_err(|_| overloaded())?;
    let small = declared.is_some_and(|n| n <= SMALL_BODY);
    let _large_permit = if small {
        None
    } else {
        Some(gw.large_requests.try_acquire().map_err(|_| overloaded())?)
    };
    let budget = if small {
        &gw.small_budget
    } else {
        &gw.large_budget
    };
    let (body, _budget_permit) =
        read_body(body, route.max_body_bytes, declared, &gw.limits, budget).await?;
    let verifier = route.verifier.as_ref().map_err(|_| ApiError::Unavailable {
        reason: "not_ready",
        retry_after: gw.limits.retry_after_secs,
    })?;
    let now_unix = jiff::Timestamp::now().as_second();
    let verify = info_span!(
        target: telemetry::TARGET,
        "verify",
        webhook.scheme = verifier.scheme().as_str(),
        otel.status_code = field::Empty,
    );
    verify
        .in_scope(|| {
            verifier.verify(&Inbound {
                headers: &parts.headers,
                body: &body,
                query,
                now_unix,
            })
        })
        .map_err(|f| {
            verify.record("otel.status_code", "ERROR");
            ApiError::Unauthorized(f)
        })?;
    drop(verify);
    // Only verified requests spend the endpoint's rate limit: unsigned
    // junk is refused above (401) without taking a provider's tokens; the
    // global request cap bounds it before the body is read.
    if let Some(l) = &route.limiter
        && let Err(not_until) = l.check()
    {
        let wait = not_until.wait_time_from(gw.clock.now());
        return Err(ApiError::RateLimited {
            retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
        });
    }
    if let Some(h) = &route.handshake
        && let Some(r) =
            handshake::after_verify(h.kind, &parts.headers, &body, h.zoom_secret.as_deref())
    {
        return reply(r);
    }
    store(gw, route, &parts.headers, body).await?;
    Ok(route.response_status.into_response())
}

/// KiB permits for `bytes` (rounded up), as the budgets count.
fn kib(bytes: u64) -> usize {
    usize::try_from(bytes.div_ceil(1024)).unwrap_or(usize::MAX)
}

/// Read a body of at most `max` bytes. Memory is reserved from `budget`
/// before the buffer grows (the declared length at once, else as it
/// doubles), so unverified bodies never hold more than the budget: none
/// left is 503 `overloaded`. A sender slower than the minimum rate (after
/// the grace) or past the body timeout gets 408.
async fn read_body<'a>(
    mut body: Body,
    max: u64,
    declared: Option<u64>,
    limits: &Limits,
    budget: &'a Semaphore,
) -> Result<(Bytes, Option<tokio::sync::SemaphorePermit<'a>>), ApiError> {
    let overloaded = || ApiError::Unavailable {
        reason: "overloaded",
        retry_after: limits.retry_after_secs,
    };
    let mut held: Option<tokio::sync::SemaphorePermit<'a>> = None;
    let mut held_kib = 0usize;
    let mut reserve = |want_bytes: u64| -> Result<(), ApiError> {
        let want = kib(want_bytes);
        if want > held_kib {
            let n = u32::try_from(want - held_kib).map_err(|_| overloaded())?;
            let p = budget.try_acquire_many(n).map_err(|_| overloaded())?;
            match &mut held {
                Some(h) => h.merge(p),
                None => held = Some(p),
            }
            held_kib = want;
        }
        Ok(())
    };
    let first = declared.unwrap_or(0).min(max);
    reserve(first)?;
    // A body that arrives in one frame (what providers send) is kept as
    // hyper read it; a second frame copies both into `buf`.
    let mut single: Option<Bytes> = None;
    let mut buf: Vec<u8> = Vec::new();
    let start = tokio::time::Instant::now();
    let hard = start + limits.body_timeout;
    let rate = limits.min_body_bytes_per_second;
    loop {
        let have = single.as_ref().map_or(buf.len(), Bytes::len);
        // The next frame must come before the body timeout and, after the
        // grace, before the minimum rate is missed with what has arrived.
        let deadline = if rate == 0 {
            hard
        } else {
            let earned = Duration::from_secs_f64(have as f64 / rate as f64);
            hard.min(start + BODY_RATE_GRACE + earned)
        };
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ApiError::RequestTimeout),
            Ok(None) => break,
            // The client went away or sent a malformed body.
            Ok(Some(Err(_))) => return Err(ApiError::BadRequest),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let len = (have + data.len()) as u64;
        if len > max {
            return Err(ApiError::PayloadTooLarge);
        }
        // More than declared: it drew on the budget its declaration chose.
        if declared.is_some_and(|d| len > d) {
            return Err(ApiError::BadRequest);
        }
        if single.is_none() && buf.is_empty() {
            reserve(len)?;
            single = Some(data);
            continue;
        }
        if len as usize > buf.capacity() {
            let grown = (len.max(2 * have as u64).max(first)).min(max);
            reserve(grown)?;
            buf.reserve_exact(usize::try_from(grown).unwrap_or(usize::MAX) - buf.len());
        }
        if let Some(s) = single.take() {
            buf.extend_from_slice(&s);
        }
        buf.extend_from_slice(&data);
    }
    Ok((single.unwrap_or_else(|| Bytes::from(buf)), held))
}

async fn store(
    gw: &Gateway,
    route: &Route,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(), ApiError> {
    let scheme = route
        .verifier
        .as_ref()
        .map(|v| v.scheme())
        .unwrap_or(spillway_api::Scheme::None);
    let ids = delivery::ids(&route.dedup, scheme, headers, &body);
    let ordering = ordering_key(route, headers, &body);
    let partition = ordering.as_ref().map(|(_, p)| *p).unwrap_or(0);
    let subject = if partition == 0 {
        route.intake_subject.clone()
    } else {
        route.names.subject(partition).into()
    };
    let publish = info_span!(
        target: telemetry::TARGET,
        "publish",
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.destination.name = %subject,
        otel.status_code = field::Empty,
    );
    // Exported: the stored traceparent names the publish span, so the
    // processor's spans are its children.
    let stored_trace = telemetry::traceparent_of(&publish);
    let accepted = Accepted {
        route,
        headers,
        ids: &ids,
        ordering: ordering.as_ref().map(|(k, _)| k.as_str()),
        now: jiff::Timestamp::now(),
        trace: stored_trace.as_ref(),
    };
    let (nats_headers, body) = stored_message(&accepted, body);
    let unavailable = ApiError::Unavailable {
        reason: "store_unavailable",
        retry_after: gw.limits.retry_after_secs,
    };
    let labels = EndpointLabels {
        webhook_endpoint: route.label.clone(),
    };
    if gw.nats.connection_state() != async_nats::connection::State::Connected {
        gw.metrics.publish_failures.get_or_create(&labels).inc();
        warn!(endpoint = %route.endpoint, "NATS is not connected; answering 503");
        return Err(unavailable);
    }
    let started = Instant::now();
    let result = tokio::time::timeout(gw.limits.publish_timeout, async {
        let _permit = gw
            .permits
            .acquire()
            .await
            .map_err(|_| "closed".to_owned())?;
        // The copy for the fallback below is made only until the scoped
        // subject has taken one webhook (an upgrade window), not on every
        // request.
        let fallback = (!route.scoped_subject_seen.load(AtomicOrdering::Relaxed))
            .then(|| (nats_headers.clone(), body.clone()));
        let first = match gw
            .js
            .publish_with_headers(subject, nats_headers, body)
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        if first.is_ok() {
            route
                .scoped_subject_seen
                .store(true, AtomicOrdering::Relaxed);
        }
        match first {
            // No stream takes the scoped subject yet: an operator of the
            // previous release still runs (an upgrade in progress), whose
            // stream takes the one-token subject.
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound && fallback.is_some() => {
                debug!("no stream for the scoped subject; trying the previous release's");
                let (nats_headers, body) = fallback.expect("checked above");
                gw.js
                    .publish_with_headers(route.names.legacy_subject(partition), nats_headers, body)
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())
            }
            other => other.map_err(|e| e.to_string()),
        }
    })
    .instrument(publish.clone())
    .await;
    if !matches!(result, Ok(Ok(_))) {
        publish.record("otel.status_code", "ERROR");
    }
    match result {
        Ok(Ok(ack)) => {
            gw.metrics
                .publish_seconds
                .get_or_create(&labels)
                .observe(started.elapsed().as_secs_f64());
            if ack.duplicate {
                gw.metrics.duplicates.get_or_create(&labels).inc();
            }
            debug!(seq = ack.sequence, duplicate = ack.duplicate, delivery_id = %ids.delivery_id, "stored");
            Ok(())
        }
        Ok(Err(e)) => {
            gw.metrics.publish_failures.get_or_create(&labels).inc();
            warn!(endpoint = %route.endpoint, error = %e, "publish failed; answering 503");
            Err(unavailable)
        }
        Err(_) => {
            gw.metrics.publish_failures.get_or_create(&labels).inc();
            warn!(endpoint = %route.endpoint, "publish timed out; answering 503");
            Err(unavailable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{MAX_ORDERING_KEY_BYTES, safe_ordering_key};
    use crate::route::EndpointDef;
    use axum::http::HeaderValue;
    use spillway_api::SecretKeyRef;
    use spillway_api::names::partition_of;
    use spillway_api::wire;
    use tower::ServiceExt;

    const SECRET: &[u8] = b"It's a Secret to Everybody";

    /// A body in one frame is kept as it came; in several, they are joined
    /// in order; either way the budget holds its size and the limits apply.
    #[tokio::test]
    async fn bodies_in_one_or_many_frames_are_read_whole() {
        let limits = Limits::default();
        let budget = Semaphore::new(64);
        let frames = |parts: &[&'static str]| {
            let chunks: Vec<Result<Bytes, std::convert::Infallible>> = parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p.as_bytes())))
                .collect();
            Body::from_stream(futures::stream::iter(chunks))
        };
        let (b, permit) = read_body(frames(&["{\"a\":1}"]), 1 << 20, None, &limits, &budget)
            .await
            .unwrap();
        assert_eq!(b.as_ref(), b"{\"a\":1}");
        assert_eq!(permit.map(|p| p.num_permits()), Some(1));
        let many = ["{\"a\"", ":", "", "1}"];
        let (b, _) = read_body(frames(&many), 1 << 20, Some(7), &limits, &budget)
            .await
            .unwrap();
        assert_eq!(b.as_ref(), b"{\"a\":1}");
        let big = [
            "x".repeat(1500).leak() as &'static str,
            "y".repeat(1500).leak(),
        ];
        let (b, permit) = read_body(frames(&big), 1 << 20, None, &limits, &budget)
            .await
            .unwrap();
        assert_eq!(b.len(), 3000);
        assert!(b.starts_with(b"xxx") && b.ends_with(b"yyy"));
        assert_eq!(
            permit.map(|p| p.num_permits()),
            Some(3),
            "3000 bytes: 3 KiB held"
        );
        // Over the limit, or more than declared, in either shape.
        for (parts, declared) in [(&["12345678"][..], None), (&["1234", "5678"][..], None)] {
            let r = read_body(frames(parts), 7, declared, &limits, &budget).await;
            assert!(matches!(r, Err(ApiError::PayloadTooLarge)));
        }
        let r = read_body(frames(&["12", "34"]), 100, Some(3), &limits, &budget).await;
        assert!(matches!(r, Err(ApiError::BadRequest)));
        assert_eq!(budget.available_permits(), 64, "every permit returned");
    }

    fn def(name: &str, extra: &str) -> EndpointDef {
        let yaml = format!(
            "path: /{name}\nverification: {{scheme: github, secretRefs: [{{name: s, key: k}}]}}\nprocessor: {{sink: {{url: \"http://sink\"}}}}\n{extra}"
        );
        EndpointDef {
            namespace: "ns".into(),
            name: name.into(),
            created: Some(1),
            spec: serde_saphyr::from_str(&yaml).expect("spec"),
            partitions_ready: None,
            stored_format: spillway_api::stored::CURRENT,
        }
    }

    /// A NATS client for a server that does not exist.
    async fn unreachable_nats() -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("nats://127.0.0.1:1")
            .await
            .expect("client")
    }

    /// A gateway whose NATS server does not exist: everything before the
    /// publish is testable without a socket.
    async fn gateway() -> Arc<Gateway> {
        let nats = unreachable_nats().await;
        let router = Arc::new(route::Router::default());
        let defs = [
            def("plain", "ingress: {maxBodyBytes: 16}\n"),
            def(
                "rated",
                "ingress: {rateLimit: {requestsPerSecond: 1, burst: 1}}\n",
            ),
            def("paused", "suspend: true\n"),
            def("graph", "handshake: {type: msGraphValidationToken}\n"),
            {
                let mut d = def("blank", "");
                d.spec.verification.secret_refs[0].name = "empty".into();
                d
            },
        ];
        let secrets = |_: &str, r: &SecretKeyRef| match r.name.as_str() {
            "s" => Some(SECRET.to_vec()),
            "empty" => Some(Vec::new()),
            _ => None,
        };
        router.rebuild(&defs, &secrets, None);
        Arc::new(Gateway::new(
            nats,
            router,
            Arc::new(Metrics::new()),
            Arc::new(AtomicBool::new(true)),
            Limits {
                publish_timeout: Duration::from_millis(300),
                ..Limits::default()
            },
        ))
    }

    fn signed(path: &str, body: &'static [u8]) -> Request {
        let sig = hex::encode(crate::verify::sign(
            ring::hmac::HMAC_SHA256,
            SECRET,
            &[body],
        ));
        Request::post(path)
            .header("x-hub-signature-256", format!("sha256={sig}"))
            .header("content-length", body.len())
            .body(Body::from(body))
            .expect("request")
    }

    async fn body_text(r: Response) -> String {
        let b = r.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    #[tokio::test]
    async fn handler_answers_without_a_socket() {
        let gw = gateway().await;
        let app = app(gw.clone());

        let r = app
            .clone()
            .oneshot(Request::post("/nope").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(body_text(r).await, "");

        let r = app
            .clone()
            .oneshot(Request::post("/plain").body(Body::from("{}")).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(body_text(r).await, r#"{"error":"missing_signature"}"#);

        let mut bad = signed("/plain", b"{}");
        *bad.body_mut() = Body::from("{ }");
        bad.headers_mut()
            .insert("content-length", HeaderValue::from(3));
        let r = app.clone().oneshot(bad).await.unwrap();
        assert_eq!(body_text(r).await, r#"{"error":"bad_signature"}"#);

        let r = app
            .clone()
            .oneshot(Request::get("/plain").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);

        // Declared too large, and streamed too large without a length.
        let r = app
            .clone()
            .oneshot(signed("/plain", b"0123456789abcdefX"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"0123456789")),
            Ok(Bytes::from_static(b"abcdefghij")),
        ];
        let streamed = Request::post("/plain")
            .body(Body::from_stream(futures::stream::iter(chunks)))
            .unwrap();
        let r = app.clone().oneshot(streamed).await.unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

        // Verified, but NATS is not there: 503 with Retry-After, never 2xx.
        let r = app.clone().oneshot(signed("/plain", b"{}")).await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");

        // An empty secret value is no key: a signature made with the empty
        // key is answered like a missing secret, never accepted.
        let forged = hex::encode(crate::verify::sign(ring::hmac::HMAC_SHA256, b"", &[b"{}"]));
        let r = app
            .clone()
            .oneshot(
                Request::post("/blank")
                    .header("x-hub-signature-256", format!("sha256={forged}"))
                    .body(Body::from("{}"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
        assert_eq!(body_text(r).await, r#"{"error":"not_ready"}"#);

        let r = app.clone().oneshot(signed("/paused", b"{}")).await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body_text(r).await, r#"{"error":"suspended"}"#);

        let _ = app.clone().oneshot(signed("/rated", b"{}")).await.unwrap();
        let r = app.clone().oneshot(signed("/rated", b"{}")).await.unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");

        let r = app
            .clone()
            .oneshot(
                Request::post("/graph?validationToken=abc%20d")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body_text(r).await, "abc d");

        let m = gw.metrics.encode();
        assert!(
            m.contains(
                r#"verify_failures_total{webhook_endpoint="ns/plain",reason="missing_signature"} 1"#
            ),
            "{m}"
        );
        assert!(
            m.contains(r#"requests_total{webhook_endpoint="",status="404"} 1"#),
            "{m}"
        );
        assert!(
            m.contains(r#"requests_total{webhook_endpoint="ns/rated",status="429"} 1"#),
            "{m}"
        );
        assert!(!gw.ready(), "not ready without NATS");
    }

    #[tokio::test]
    async fn readyz_turns_503_when_draining_while_webhooks_are_served() {
        let gw = gateway().await;
        let admin = admin_app(gw.clone());
        let readyz = || Request::get("/readyz").body(Body::empty()).unwrap();
        assert!(!gw.draining());
        gw.start_draining();
        assert!(gw.draining() && !gw.ready());
        let r = admin.clone().oneshot(readyz()).await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        // Still handled like before (here: verified, then 503 only because
        // this NATS does not exist).
        let r = app(gw.clone())
            .oneshot(signed("/plain", b"{}"))
            .await
            .unwrap();
        assert_eq!(body_text(r).await, r#"{"error":"store_unavailable"}"#);
    }

    #[tokio::test]
    async fn requests_over_the_global_cap_get_503_before_their_body_is_read() {
        let nats = unreachable_nats().await;
        let router = Arc::new(route::Router::default());
        let secrets = |_: &str, _: &SecretKeyRef| Some(SECRET.to_vec());
        router.rebuild(&[def("capped", "")], &secrets, None);
        let gw = Arc::new(Gateway::new(
            nats,
            router,
            Arc::new(Metrics::new()),
            Arc::new(AtomicBool::new(true)),
            Limits {
                publish_timeout: Duration::from_millis(300),
                max_concurrent_requests: 1,
                ..Limits::default()
            },
        ));
        let app = app(gw.clone());
        // A sender whose body never ends holds the only slot.
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let stalled = Request::post("/capped")
            .body(Body::from_stream(tokio_stream_from(rx)))
            .unwrap();
        let held = tokio::spawn(app.clone().oneshot(stalled));
        for _ in 0..1000 {
            if gw.requests.available_permits() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(gw.requests.available_permits(), 0, "slot taken");
        let r = app.clone().oneshot(signed("/capped", b"{}")).await.unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
        assert_eq!(body_text(r).await, r#"{"error":"overloaded"}"#);
        // Once it is gone, requests are handled again (here: verified, then
        // refused only because this NATS does not exist).
        held.abort();
        let _ = held.await;
        assert_eq!(gw.requests.available_permits(), 1, "slot released");
        let r = app.clone().oneshot(signed("/capped", b"{}")).await.unwrap();
        assert_eq!(body_text(r).await, r#"{"error":"store_unavailable"}"#);
        let mut bad = signed("/capped", b"{}");
        // Another body of the declared length.
        *bad.body_mut() = Body::from("[]");
        let r = app.clone().oneshot(bad).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            gw.requests.available_permits(),
            1,
            "released after answering"
        );
    }

    /// A stream of body chunks fed by `rx`.
    fn tokio_stream_from(
        rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
    }

    #[test]
    fn ordering_keys_with_control_characters_or_too_long_are_hashed() {
        assert_eq!(safe_ordering_key("cus_42".into()), "cus_42");
        let at_limit = "k".repeat(MAX_ORDERING_KEY_BYTES);
        assert_eq!(safe_ordering_key(at_limit.clone()), at_limit);
        let hashed = |k: &str| format!("sha256:{}", delivery::body_hash(k.as_bytes()));
        for k in [
            "a\nb".to_owned(),
            "a\r\nX-Injected: 1".to_owned(),
            "nul\0".to_owned(),
            "k".repeat(MAX_ORDERING_KEY_BYTES + 1),
            "x".repeat(4 << 20),
        ] {
            let safe = safe_ordering_key(k.clone());
            assert_eq!(safe, hashed(&k));
            assert_eq!(safe.len(), "sha256:".len() + 64);
        }

        // Through the request path: a JSON field with a newline becomes a
        // valid header and partitions on the hashed key.
        let router = route::Router::default();
        let d = def(
            "o",
            "ordering: {keyJsonPointer: /customer, partitions: 4}\n",
        );
        router.rebuild(
            &[d],
            &|_: &str, _: &SecretKeyRef| Some(SECRET.to_vec()),
            None,
        );
        let r = router.table().get("/o").expect("route");
        let body = br#"{"customer":"line1\nline2"}"#;
        let (key, partition) = ordering_key(&r, &HeaderMap::new(), body).expect("key");
        assert_eq!(key, hashed("line1\nline2"));
        assert_eq!(partition, partition_of(key.as_bytes(), 4));
        let ids = delivery::Ids {
            delivery_id: "d".into(),
            msg_id: None,
        };
        let none = HeaderMap::new();
        let accepted = Accepted {
            route: &r,
            headers: &none,
            ids: &ids,
            ordering: Some(&key),
            now: jiff::Timestamp::now(),
            trace: None,
        };
        let (h, p) = stored_message(&accepted, Bytes::from_static(body));
        let w = spillway_api::stored::decode(Some(&h), &p).unwrap();
        assert_eq!(w.ordering_key.as_deref(), Some(key.as_str()));
        assert_eq!(w.body(&p), body);
    }

    #[test]
    fn received_at_is_the_given_time_in_milliseconds() {
        let router = route::Router::default();
        router.rebuild(
            &[def("o", "")],
            &|_: &str, _: &SecretKeyRef| Some(SECRET.to_vec()),
            None,
        );
        let r = router.table().get("/o").expect("route");
        let ids = delivery::Ids {
            delivery_id: "d".into(),
            msg_id: None,
        };
        let now = jiff::Timestamp::from_millisecond(1_700_000_000_123).unwrap();
        let none = HeaderMap::new();
        let accepted = Accepted {
            route: &r,
            headers: &none,
            ids: &ids,
            ordering: None,
            now,
            trace: None,
        };
        let (h, p) = stored_message(&accepted, Bytes::new());
        let w = spillway_api::stored::decode(Some(&h), &p).unwrap();
        assert_eq!(w.received_at.as_deref(), Some("2023-11-14T22:13:20.123Z"));
        // Format 1 (an endpoint the operator has not moved yet) says the same.
        let h = crate::message::message_headers_v1(&accepted);
        assert_eq!(
            h.get(wire::RECEIVED_AT).map(|v| v.as_str()),
            Some("2023-11-14T22:13:20.123Z")
        );
    }
}
