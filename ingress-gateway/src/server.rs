//! The HTTP side: the webhook handler, the admin endpoints and a server loop
//! with header limits, timeouts and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use governor::clock::{Clock, DefaultClock};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use spillway_api::names::partition_of;
use spillway_api::wire;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::delivery;
use crate::handshake::{self, Reply};
use crate::metrics::{EndpointLabels, Metrics, RequestLabels, VerifyLabels};
use crate::route::{self, Route};
use crate::verify::{Failure, Inbound};

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

/// The address a request's connection comes from (set per connection by
/// [`serve`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::IpAddr);

/// Requests in progress per client address, capped.
#[derive(Debug, Default)]
pub struct ClientSlots {
    max: usize,
    used: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One request's slot of its client; given back on drop.
#[derive(Debug)]
pub struct ClientSlot<'a> {
    slots: &'a ClientSlots,
    /// `None` when there is no limit (nothing to give back).
    addr: Option<std::net::IpAddr>,
}

impl ClientSlots {
    /// At most `max` requests per address (0: no limit).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            used: Default::default(),
        }
    }

    /// A slot for `addr`, unless it holds `max` already (`None`).
    pub fn take(&self, addr: std::net::IpAddr) -> Option<ClientSlot<'_>> {
        if self.max == 0 {
            return Some(ClientSlot {
                slots: self,
                addr: None,
            });
        }
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let n = used.entry(addr).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: self,
            addr: Some(addr),
        })
    }

    /// Addresses holding slots now.
    pub fn clients(&self) -> usize {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let Some(addr) = self.addr else { return };
        let mut used = self.slots.used.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = used.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                used.remove(&addr);
            }
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

/// Everything that ends a request without storing it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No route for the path.
    #[error("not found")]
    NotFound,
    /// Method not accepted.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Verification failed.
    #[error("unauthorized: {0}")]
    Unauthorized(Failure),
    /// A handshake's verify token did not match.
    #[error("forbidden")]
    Forbidden,
    /// Body over the endpoint's limit.
    #[error("payload too large")]
    PayloadTooLarge,
    /// The body did not arrive in time.
    #[error("request timeout")]
    RequestTimeout,
    /// The body could not be read (malformed framing, client went away).
    #[error("bad request")]
    BadRequest,
    /// The client address has its share of request slots in use.
    #[error("client busy")]
    ClientBusy {
        /// Seconds to wait.
        retry_after: u64,
    },
    /// Token bucket empty.
    #[error("rate limited")]
    RateLimited {
        /// Seconds until a token is available.
        retry_after: u64,
    },
    /// Not storing right now (suspended, secrets not loaded, JetStream
    /// unavailable); the provider should retry.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// Short machine-readable reason.
        reason: &'static str,
        /// Seconds to wait.
        retry_after: u64,
    },
    /// Anything else; answered without detail.
    #[error("internal error")]
    Internal,
}

fn json_error(status: StatusCode, reason: &str) -> Response {
    (status, Json(serde_json::json!({ "error": reason }))).into_response()
}

fn with_retry_after(mut r: Response, secs: u64) -> Response {
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::NotFound => StatusCode::NOT_FOUND.into_response(),
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED.into_response(),
            ApiError::Unauthorized(f) => json_error(StatusCode::UNAUTHORIZED, f.reason()),
            ApiError::Forbidden => json_error(StatusCode::FORBIDDEN, "bad_verify_token"),
            ApiError::PayloadTooLarge => {
                json_error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
            }
            ApiError::RequestTimeout => json_error(StatusCode::REQUEST_TIMEOUT, "timeout"),
            ApiError::BadRequest => json_error(StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::ClientBusy { retry_after } => with_retry_after(
                json_error(StatusCode::TOO_MANY_REQUESTS, "client_busy"),
                retry_after,
            ),
            ApiError::RateLimited { retry_after } => with_retry_after(
                json_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
                retry_after,
            ),
            ApiError::Unavailable {
                reason,
                retry_after,
            } => with_retry_after(
                json_error(StatusCode::SERVICE_UNAVAILABLE, reason),
                retry_after,
            ),
            ApiError::Internal => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal"),
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
        .map(|r| r.endpoint.clone())
        .unwrap_or_default();
    let span = info_span!("webhook", endpoint = %endpoint, method = %req.method());
    let response = match route {
        None => ApiError::NotFound.into_response(),
        Some(route) => match handle_route(&gw, &route, req)
            .instrument(span.clone())
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if let ApiError::Unauthorized(f) = &e {
                    gw.metrics
                        .verify_failures
                        .get_or_create(&VerifyLabels {
                            endpoint: endpoint.clone(),
                            reason: f.reason().to_owned(),
                        })
                        .inc();
                }
                span.in_scope(|| debug!(error = %e, "rejected"));
                e.into_response()
            }
        },
    };
    gw.metrics
        .requests
        .get_or_create(&RequestLabels {
            endpoint,
            status: response.status().as_u16(),
        })
        .inc();
    response
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
    verifier
        .verify(&Inbound {
            headers: &parts.headers,
            body: &body,
            query,
            now_unix,
        })
        .map_err(ApiError::Unauthorized)?;
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
    let mut buf: Vec<u8> = Vec::with_capacity(usize::try_from(first).unwrap_or(0));
    let start = tokio::time::Instant::now();
    let hard = start + limits.body_timeout;
    let rate = limits.min_body_bytes_per_second;
    loop {
        // The next frame must come before the body timeout and, after the
        // grace, before the minimum rate is missed with what has arrived.
        let deadline = if rate == 0 {
            hard
        } else {
            let earned = Duration::from_secs_f64(buf.len() as f64 / rate as f64);
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
        let len = (buf.len() + data.len()) as u64;
        if len > max {
            return Err(ApiError::PayloadTooLarge);
        }
        // More than declared: it drew on the budget its declaration chose.
        if declared.is_some_and(|d| len > d) {
            return Err(ApiError::BadRequest);
        }
        if len as usize > buf.capacity() {
            let grown = (len.max(2 * buf.capacity() as u64)).min(max);
            reserve(grown)?;
            buf.reserve_exact(usize::try_from(grown).unwrap_or(usize::MAX) - buf.len());
        }
        buf.extend_from_slice(&data);
    }
    Ok((Bytes::from(buf), held))
}

/// Headers never copied into the stored message.
const DROPPED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "content-type",
    "cookie",
    "set-cookie",
    "authorization",
    "traceparent",
    "tracestate",
    // GitLab sends the shared secret itself.
    "x-gitlab-token",
];

/// `x-github-event` → `X-Github-Event`.
fn title_case(name: &str) -> String {
    name.split('-')
        .map(|seg| {
            let mut c = seg.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn traceparent(headers: &HeaderMap) -> String {
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        let parts: Vec<&str> = tp.split('-').collect();
        if parts.len() == 4
            && parts[0].len() == 2
            && parts[1].len() == 32
            && parts[2].len() == 16
            && parts[3].len() == 2
            && tp.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit())
        {
            return tp.to_owned();
        }
    }
    let mut id = [0u8; 24];
    // The system RNG does not fail on supported platforms; an all-zero id is
    // only a poorer trace id.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
    format!(
        "00-{}-{}-01",
        hex::encode(&id[..16]),
        hex::encode(&id[16..])
    )
}

/// Longest ordering key stored (and partitioned on) as it is.
pub const MAX_ORDERING_KEY_BYTES: usize = 256;

/// The ordering key as stored in `Spillway-Ordering-Key` and partitioned on.
/// A key with control characters (which cannot be a NATS header value) or
/// longer than [`MAX_ORDERING_KEY_BYTES`] is replaced by `sha256:<hex>` of
/// its bytes: equal keys still land on the same partition, and the header
/// stays small and valid.
pub fn safe_ordering_key(key: String) -> String {
    if key.len() <= MAX_ORDERING_KEY_BYTES && !key.chars().any(char::is_control) {
        key
    } else {
        format!("sha256:{}", delivery::body_hash(key.as_bytes()))
    }
}

fn ordering_key(route: &Route, headers: &HeaderMap, body: &[u8]) -> Option<(String, u16)> {
    let o = route.ordering.as_ref()?;
    let key = if let Some(h) = &o.key_header {
        headers.get(h.as_str())?.to_str().ok()?.to_owned()
    } else {
        let p = o.key_json_pointer.as_deref()?;
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        match v.pointer(p)? {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => return None,
            other => other.to_string(),
        }
    };
    let key = safe_ordering_key(key);
    let p = partition_of(key.as_bytes(), o.partitions);
    Some((key, p))
}

/// Build the NATS headers of a stored webhook.
pub fn message_headers(
    route: &Route,
    headers: &HeaderMap,
    ids: &delivery::Ids,
    ordering: Option<&str>,
) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert(wire::ENDPOINT, route.endpoint.as_str());
    h.insert(wire::DELIVERY_ID, ids.delivery_id.as_str());
    if let Some(id) = &ids.msg_id {
        h.insert(wire::NATS_MSG_ID, id.as_str());
    }
    let received = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string();
    h.insert(wire::RECEIVED_AT, received);
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        h.insert(wire::CONTENT_TYPE, ct);
    }
    h.insert(wire::TRACEPARENT, traceparent(headers));
    if let Some(k) = ordering {
        h.insert(wire::ORDERING_KEY, k);
    }
    for (name, value) in headers {
        let n = name.as_str();
        if DROPPED_HEADERS.contains(&n) || route.redact_headers.iter().any(|r| r == n) {
            continue;
        }
        if let Ok(v) = value.to_str() {
            h.append(
                format!("{}{}", wire::ORIGINAL_HEADER_PREFIX, title_case(n)),
                v,
            );
        }
    }
    h
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
    let subject = route.names.subject(partition);
    let nats_headers = message_headers(
        route,
        headers,
        &ids,
        ordering.as_ref().map(|(k, _)| k.as_str()),
    );
    let unavailable = ApiError::Unavailable {
        reason: "store_unavailable",
        retry_after: gw.limits.retry_after_secs,
    };
    let labels = EndpointLabels {
        endpoint: route.endpoint.clone(),
    };
    if gw.nats.connection_state() != async_nats::connection::State::Connected {
        gw.metrics.publish_failures.get_or_create(&labels).inc();
        warn!("NATS is not connected; answering 503");
        return Err(unavailable);
    }
    let started = Instant::now();
    let result = tokio::time::timeout(gw.limits.publish_timeout, async {
        let _permit = gw
            .permits
            .acquire()
            .await
            .map_err(|_| "closed".to_owned())?;
        let first = match gw
            .js
            .publish_with_headers(subject, nats_headers.clone(), body.clone())
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match first {
            // No stream takes the scoped subject yet: an operator of the
            // previous release still runs (an upgrade in progress), whose
            // stream takes the one-token subject.
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                debug!("no stream for the scoped subject; trying the previous release's");
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
    .await;
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
            warn!(error = %e, "publish failed; answering 503");
            Err(unavailable)
        }
        Err(_) => {
            gw.metrics.publish_failures.get_or_create(&labels).inc();
            warn!("publish timed out; answering 503");
            Err(unavailable)
        }
    }
}

/// Connection-level limits of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Time allowed to send the request head.
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1 read buffer; HTTP/2 header list).
    pub max_header_bytes: usize,
    /// A connection that sends nothing for this long is closed (after any
    /// request in progress is answered).
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// HTTP/2 streams one connection may have open at once.
    pub max_streams_per_connection: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(25),
            max_streams_per_connection: 64,
        }
    }
}

/// A TCP stream that remembers when it last received bytes.
struct Tracked {
    inner: tokio::net::TcpStream,
    epoch: Instant,
    last_read_ms: Arc<AtomicU64>,
}

impl tokio::io::AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.last_read_ms.store(now, AtomicOrdering::Relaxed);
        }
        r
    }
}

impl tokio::io::AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serve `router` on `listener` until `shutdown` resolves, then stop
/// accepting and wait (up to the grace period) for in-flight requests, and so
/// their publishes, to finish. Idle connections are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(opts.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(opts.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(opts.max_streams_per_connection.max(1));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        while conns.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let epoch = Instant::now();
        let last_read_ms = Arc::new(AtomicU64::new(0));
        let io = Tracked {
            inner: stream,
            epoch,
            last_read_ms: last_read_ms.clone(),
        };
        let service =
            TowerToHyperService::new(router.clone().layer(axum::Extension(ClientAddr(peer.ip()))));
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let mut stop = stop_rx.clone();
        let idle = opts.idle_timeout;
        conns.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut closing = false;
            let check = (idle / 2).max(Duration::from_millis(100));
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            debug!(error = %e, "connection ended with an error");
                        }
                        return;
                    }
                    _ = stop.wait_for(|v| *v), if !closing => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    () = tokio::time::sleep(check), if !closing => {
                        let last = Duration::from_millis(last_read_ms.load(AtomicOrdering::Relaxed));
                        if epoch.elapsed().saturating_sub(last) >= idle {
                            conn.as_mut().graceful_shutdown();
                            closing = true;
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    info!("shutting down: draining in-flight requests");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(opts.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("grace period over with requests still in flight");
        conns.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::EndpointDef;
    use spillway_api::SecretKeyRef;
    use tower::ServiceExt;

    #[test]
    fn each_client_address_gets_its_share() {
        let slots = ClientSlots::new(2);
        let a = std::net::Ipv4Addr::new(10, 0, 0, 1).into();
        let b = std::net::Ipv4Addr::new(10, 0, 0, 2).into();
        let a1 = slots.take(a).expect("first");
        let a2 = slots.take(a).expect("second");
        assert!(slots.take(a).is_none(), "a third is refused");
        let _b1 = slots.take(b).expect("another address is not affected");
        drop(a1);
        let _a3 = slots.take(a).expect("a slot given back is free again");
        drop(a2);
        assert_eq!(slots.clients(), 2);
        let none = ClientSlots::new(0);
        let held: Vec<_> = (0..1000).map(|_| none.take(a)).collect();
        assert!(held.iter().all(Option::is_some), "0: no limit");
        assert_eq!(none.clients(), 0);
    }

    const SECRET: &[u8] = b"It's a Secret to Everybody";

    fn def(name: &str, extra: &str) -> EndpointDef {
        let yaml = format!(
            "path: /{name}\nverification: {{scheme: github, secretRefs: [{{name: s, key: k}}]}}\nprocessor: {{sink: {{url: \"http://sink\"}}}}\n{extra}"
        );
        EndpointDef {
            namespace: "ns".into(),
            name: name.into(),
            created: Some(1),
            spec: serde_yaml_ng::from_str(&yaml).expect("spec"),
            partitions_ready: None,
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
                r#"verify_failures_total{endpoint="ns/plain",reason="missing_signature"} 1"#
            ),
            "{m}"
        );
        assert!(
            m.contains(r#"requests_total{endpoint="",status="404"} 1"#),
            "{m}"
        );
        assert!(
            m.contains(r#"requests_total{endpoint="ns/rated",status="429"} 1"#),
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
        let h = message_headers(&r, &HeaderMap::new(), &ids, Some(&key));
        assert_eq!(
            h.get(wire::ORDERING_KEY).map(|v| v.as_str()),
            Some(key.as_str())
        );
    }

    #[test]
    fn header_names_are_title_cased() {
        assert_eq!(title_case("x-github-event"), "X-Github-Event");
        assert_eq!(title_case("webhook-id"), "Webhook-Id");
    }

    #[test]
    fn traceparent_is_kept_or_made() {
        let mut h = HeaderMap::new();
        let made = traceparent(&h);
        assert_eq!(made.len(), 55);
        assert!(made.starts_with("00-") && made.ends_with("-01"));
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", HeaderValue::from_static(tp));
        assert_eq!(traceparent(&h), tp);
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        assert_ne!(traceparent(&h), "garbage");
    }

    #[test]
    fn received_at_format() {
        let s = jiff::Timestamp::from_millisecond(1_700_000_000_123)
            .unwrap()
            .strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string();
        assert_eq!(s, "2023-11-14T22:13:20.123Z");
    }
}
