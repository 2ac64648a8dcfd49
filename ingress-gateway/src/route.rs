//! The routing table: every served path and what the gateway needs to handle
//! it, resolved from WebhookEndpoints and their Secrets.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};

use axum::http::StatusCode;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use spillway_api::names::{EndpointNames, path_precedence};
use spillway_api::{Deduplication, HandshakeType, Ordering, SecretKeyRef, WebhookEndpointSpec};

use spillway_api::Scheme;
use tracing::warn;

use crate::verify::{ConfigError, Verifier, is_empty_secret};

/// One endpoint as read from the source (Kubernetes or a file).
#[derive(Debug, Clone)]
pub struct EndpointDef {
    /// Namespace of the WebhookEndpoint.
    pub namespace: String,
    /// Name of the WebhookEndpoint.
    pub name: String,
    /// Creation time (Unix seconds); the older endpoint keeps a contested
    /// path. `None` sorts last.
    pub created: Option<i64>,
    /// The spec.
    pub spec: WebhookEndpointSpec,
    /// `status.partitions`: partitions whose consumers exist (`None`:
    /// unknown, e.g. standalone mode, where the spec's count is used).
    pub partitions_ready: Option<u16>,
    /// The stored format to write (`status.storedFormat`: 2 once the
    /// operator has seen every processor read it, else 1; standalone mode
    /// writes the current one, `spillway_api::stored::CURRENT`).
    pub stored_format: u8,
}

/// Handshake settings with their secrets resolved.
#[derive(Clone)]
pub struct HandshakeCfg {
    /// Which probe to answer.
    pub kind: HandshakeType,
    /// Meta's verify token.
    pub meta_verify_token: Option<Vec<u8>>,
    /// Zoom's secret token.
    pub zoom_secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for HandshakeCfg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeCfg")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Everything needed to serve one path.
#[derive(Debug)]
pub struct Route {
    /// `namespace/name`, used in logs, metrics and the `Spillway-Endpoint`
    /// header.
    pub endpoint: String,
    /// `endpoint` as the metrics label (shared: no copy per request).
    pub label: Arc<String>,
    /// NATS names of the endpoint.
    pub names: EndpointNames,
    /// Answer 503 while set.
    pub suspended: bool,
    /// The verifier, or why none could be built (answered with 503 so the
    /// provider retries once the secret is there).
    pub verifier: Result<Verifier, ConfigError>,
    /// Handshake to answer, if any.
    pub handshake: Option<HandshakeCfg>,
    /// Largest accepted body.
    pub max_body_bytes: u64,
    /// Request headers never stored (lowercase).
    pub redact_headers: Vec<String>,
    /// Status answered once stored.
    pub response_status: StatusCode,
    /// Deduplication settings.
    pub dedup: Deduplication,
    /// Ordering settings.
    pub ordering: Option<Ordering>,
    /// Per-endpoint token bucket.
    pub limiter: Option<Arc<DefaultDirectRateLimiter>>,
    /// A webhook was stored on the scoped intake subject: no more copies
    /// for the previous release's subject (see `server::store`).
    pub scoped_subject_seen: std::sync::atomic::AtomicBool,
    /// The stored format written (see `EndpointDef::stored_format`).
    pub stored_format: u8,
    /// The intake subject of partition 0 (every unordered webhook's),
    /// built once.
    pub intake_subject: async_nats::Subject,
}

/// Immutable snapshot of all routes, keyed by path.
#[derive(Debug, Default)]
pub struct Table {
    routes: HashMap<String, Arc<Route>>,
}

impl Table {
    /// The route serving `path`.
    pub fn get(&self, path: &str) -> Option<Arc<Route>> {
        self.routes.get(path).cloned()
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when no route is served.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Paths and the endpoint serving each.
    pub fn paths(&self) -> impl Iterator<Item = (&str, &str)> {
        self.routes
            .iter()
            .map(|(p, r)| (p.as_str(), r.endpoint.as_str()))
    }
}

/// Looks up a secret value: `(namespace, ref)` → bytes.
pub trait SecretLookup {
    /// The value of `r` in `namespace`, if present.
    fn secret(&self, namespace: &str, r: &SecretKeyRef) -> Option<Vec<u8>>;
}

impl<F: Fn(&str, &SecretKeyRef) -> Option<Vec<u8>>> SecretLookup for F {
    fn secret(&self, namespace: &str, r: &SecretKeyRef) -> Option<Vec<u8>> {
        self(namespace, r)
    }
}

/// A rate limiter with the `(requestsPerSecond, burst)` it was built for.
type KeptLimiter = ((u32, u32), Arc<DefaultDirectRateLimiter>);

/// The live routing table, swapped as a whole when the source changes. Rate
/// limiters survive rebuilds while an endpoint's limit is unchanged.
#[derive(Debug)]
pub struct Router {
    table: RwLock<Arc<Table>>,
    limiters: Mutex<HashMap<String, KeptLimiter>>,
    conflicts: RwLock<Vec<String>>,
    /// Gateway replicas sharing each endpoint's rate limit (≥ 1).
    rate_limit_replicas: u32,
}

impl Default for Router {
    fn default() -> Self {
        Self::new(1)
    }
}

impl Router {
    /// An empty router whose endpoints' rate limits are shared by
    /// `rate_limit_replicas` gateway pods: each enforces its share.
    pub fn new(rate_limit_replicas: u32) -> Self {
        Self {
            table: RwLock::default(),
            limiters: Mutex::default(),
            conflicts: RwLock::default(),
            rate_limit_replicas: rate_limit_replicas.max(1),
        }
    }

    /// The current table.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Endpoints (`namespace/name`) that lost a path conflict in the last
    /// rebuild.
    pub fn conflicts(&self) -> Vec<String> {
        self.conflicts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rebuild the table from `endpoints` and swap it in. Returns the
    /// endpoints that lost a path conflict (`namespace/name`).
    pub fn rebuild(
        &self,
        endpoints: &[EndpointDef],
        secrets: &dyn SecretLookup,
        public_base_url: Option<&str>,
    ) -> Vec<String> {
        let mut sorted: Vec<&EndpointDef> = endpoints.iter().collect();
        sorted.sort_by_key(|d| path_precedence(d.created, &d.namespace, &d.name));
        let mut limiters = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept_limiters = HashMap::new();
        let mut routes = HashMap::new();
        let mut conflicts = Vec::new();
        for def in sorted {
            let path = def.spec.effective_path(&def.namespace, &def.name);
            let endpoint = format!("{}/{}", def.namespace, def.name);
            if routes.contains_key(&path) {
                conflicts.push(endpoint);
                continue;
            }
            let limiter = def.spec.ingress.rate_limit.as_ref().map(|rl| {
                let key = pod_share(rl.requests_per_second, rl.burst, self.rate_limit_replicas);
                let l = match limiters.remove(&endpoint) {
                    Some((k, l)) if k == key => l,
                    _ => Arc::new(limiter(key.0, key.1)),
                };
                kept_limiters.insert(endpoint.clone(), (key, l.clone()));
                l
            });
            let route = resolve(def, &path, endpoint, secrets, public_base_url, limiter);
            routes.insert(path, Arc::new(route));
        }
        *limiters = kept_limiters;
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Table { routes });
        conflicts.clone_into(&mut self.conflicts.write().unwrap_or_else(|e| e.into_inner()));
        conflicts
    }
}

/// This pod's share of an endpoint's `(requestsPerSecond, burst)` when
/// `replicas` gateway pods serve it: each rounded up, never below 1.
pub fn pod_share(rps: u32, burst: u32, replicas: u32) -> (u32, u32) {
    let n = replicas.max(1);
    (rps.div_ceil(n).max(1), burst.div_ceil(n).max(1))
}

fn limiter(rps: u32, burst: u32) -> DefaultDirectRateLimiter {
    let rps = NonZeroU32::new(rps).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst.max(rps.get())).unwrap_or(rps);
    RateLimiter::direct(Quota::per_second(rps).allow_burst(burst))
}

fn resolve(
    def: &EndpointDef,
    path: &str,
    endpoint: String,
    secrets: &dyn SecretLookup,
    public_base_url: Option<&str>,
    limiter: Option<Arc<DefaultDirectRateLimiter>>,
) -> Route {
    let spec = &def.spec;
    let v = &spec.verification;
    // Empty values (once trimmed) are dropped (and logged by Secret and
    // key, never by value): an empty key or token would let anyone pass
    // verification.
    let usable = |r: &SecretKeyRef, scheme: Scheme| {
        let value = secrets.secret(&def.namespace, r)?;
        if is_empty_secret(scheme, &value) {
            warn!(
                endpoint = %endpoint,
                secret = %format_args!("{}/{}", def.namespace, r.name),
                key = %r.key,
                "secret value is empty; not used"
            );
            return None;
        }
        // One rule for every value (spillway_api::secret): surrounding
        // whitespace is not part of it, in Kubernetes and file mode alike.
        Some(spillway_api::secret::value(&value).to_vec())
    };
    let values: Vec<Vec<u8>> = v
        .secret_refs
        .iter()
        .filter_map(|r| usable(r, v.scheme))
        .collect();
    let public_url = v
        .public_url
        .clone()
        .or_else(|| public_base_url.map(|base| format!("{}{}", base.trim_end_matches('/'), path)));
    let verifier = Verifier::new(
        v.scheme,
        values,
        v.tolerance_seconds,
        public_url,
        v.hmac.as_ref(),
    );
    let handshake = spec.handshake.as_ref().map(|h| HandshakeCfg {
        kind: h.kind,
        meta_verify_token: h
            .verify_token_secret_ref
            .as_ref()
            .and_then(|r| usable(r, Scheme::None)),
        zoom_secret: h
            .secret_ref
            .as_ref()
            .or(v.secret_refs.first())
            .and_then(|r| usable(r, Scheme::None)),
    });
    Route {
        names: EndpointNames::new(&def.namespace, &def.name),
        scoped_subject_seen: Default::default(),
        stored_format: def.stored_format,
        intake_subject: EndpointNames::new(&def.namespace, &def.name)
            .subject(0)
            .into(),
        label: Arc::new(endpoint.clone()),
        endpoint,
        suspended: spec.suspend,
        verifier,
        handshake,
        max_body_bytes: spec.ingress.max_body_bytes,
        redact_headers: spec
            .ingress
            .redact_headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        response_status: StatusCode::from_u16(spec.ingress.response_status)
            .ok()
            .filter(|s| s.is_success())
            .unwrap_or(StatusCode::OK),
        dedup: spec.deduplication.clone(),
        // Never a partition whose consumer does not exist yet.
        ordering: spec.ordering.clone().map(|mut o| {
            if let Some(ready) = def.partitions_ready.filter(|r| *r > 0) {
                o.partitions = o.partitions.min(ready);
            }
            o
        }),
        limiter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pod_enforces_its_share_of_the_rate_limit() {
        assert_eq!(pod_share(100, 200, 1), (100, 200));
        assert_eq!(pod_share(100, 200, 3), (34, 67));
        assert_eq!(pod_share(1, 1, 4), (1, 1), "never below one");
        assert_eq!(pod_share(10, 20, 0), (10, 20), "0 replicas counts as 1");
    }

    fn def(ns: &str, name: &str, created: Option<i64>, yaml: &str) -> EndpointDef {
        EndpointDef {
            namespace: ns.into(),
            name: name.into(),
            created,
            spec: serde_saphyr::from_str(yaml).unwrap(),
            partitions_ready: None,
            stored_format: spillway_api::stored::CURRENT,
        }
    }

    #[test]
    fn keys_use_only_partitions_whose_consumers_exist() {
        let yaml = format!("{GH}ordering: {{keyHeader: X-Key, partitions: 8}}\n");
        let router = Router::default();
        let mut d = def("ns", "o", Some(1), &yaml);
        let no_secrets = |_: &str, _: &SecretKeyRef| None;
        // Standalone (no status): the spec's count.
        router.rebuild(std::slice::from_ref(&d), &no_secrets, None);
        let parts = |r: &Router| {
            r.table()
                .get("/gh")
                .unwrap()
                .ordering
                .as_ref()
                .unwrap()
                .partitions
        };
        assert_eq!(parts(&router), 8);
        // Grown to 8 while the operator has 4 consumers in place: 4 until
        // it has made the others.
        d.partitions_ready = Some(4);
        router.rebuild(std::slice::from_ref(&d), &no_secrets, None);
        assert_eq!(parts(&router), 4);
        d.partitions_ready = Some(8);
        router.rebuild(std::slice::from_ref(&d), &no_secrets, None);
        assert_eq!(parts(&router), 8);
    }

    const GH: &str = r#"
path: /gh
verification: {scheme: github, secretRefs: [{name: gh, key: secret}]}
ingress: {rateLimit: {requestsPerSecond: 1, burst: 2}, responseStatus: 202}
processor: {sink: {url: "http://sink"}}
"#;

    fn secrets(_: &str, r: &SecretKeyRef) -> Option<Vec<u8>> {
        (r.name == "gh").then(|| b"s3cret".to_vec())
    }

    #[test]
    fn older_endpoint_keeps_contested_path() {
        let router = Router::default();
        let newer = def("b", "x", Some(200), GH);
        let older = def("a", "y", Some(100), GH);
        let conflicts = router.rebuild(&[newer.clone(), older.clone()], &secrets, None);
        assert_eq!(conflicts, vec!["b/x".to_string()]);
        let t = router.table();
        assert_eq!(t.len(), 1);
        let r = t.get("/gh").unwrap();
        assert_eq!(r.endpoint, "a/y");
        assert_eq!(r.response_status, StatusCode::ACCEPTED);
        assert!(r.verifier.is_ok());
        assert!(t.get("/other").is_none());
    }

    #[test]
    fn default_path_missing_secret_and_limiter_reuse() {
        let router = Router::default();
        let mut d = def("ns", "hook", Some(1), GH);
        d.spec.path = None;
        d.spec.verification.secret_refs[0].name = "absent".into();
        router.rebuild(std::slice::from_ref(&d), &secrets, None);
        let r = router.table().get("/ns/hook").unwrap();
        assert!(r.verifier.is_err(), "no secret: not ready");
        let l1 = r.limiter.clone().unwrap();
        assert!(l1.check().is_ok());
        assert!(l1.check().is_ok());
        assert!(l1.check().is_err(), "burst 2 used up");
        router.rebuild(std::slice::from_ref(&d), &secrets, None);
        let l2 = router
            .table()
            .get("/ns/hook")
            .unwrap()
            .limiter
            .clone()
            .unwrap();
        assert!(Arc::ptr_eq(&l1, &l2), "unchanged limit keeps its bucket");
        d.spec.ingress.rate_limit.as_mut().unwrap().burst = 5;
        router.rebuild(std::slice::from_ref(&d), &secrets, None);
        let l3 = router
            .table()
            .get("/ns/hook")
            .unwrap()
            .limiter
            .clone()
            .unwrap();
        assert!(!Arc::ptr_eq(&l1, &l3));
    }

    #[test]
    fn empty_secret_values_leave_the_endpoint_not_ready() {
        let router = Router::default();
        let mut d = def("ns", "gl", Some(1), GH);
        d.spec.verification.scheme = Scheme::Gitlab;
        d.spec.handshake = Some(
            serde_saphyr::from_str(
                "{type: metaHubChallenge, verifyTokenSecretRef: {name: gh, key: secret}}",
            )
            .unwrap(),
        );
        let empty = |_: &str, _: &SecretKeyRef| Some(Vec::new());
        router.rebuild(std::slice::from_ref(&d), &empty, None);
        let r = router.table().get("/gh").unwrap();
        assert_eq!(
            r.verifier.as_ref().unwrap_err(),
            &ConfigError::NoSecret("gitlab")
        );
        let h = r.handshake.as_ref().unwrap();
        assert!(h.meta_verify_token.is_none(), "empty verify token unused");
        // Another, non-empty secretRef still serves.
        d.spec.verification.secret_refs.insert(
            0,
            SecretKeyRef {
                name: "blank".into(),
                key: "k".into(),
            },
        );
        let some = |_: &str, r: &SecretKeyRef| {
            Some(if r.name == "blank" {
                Vec::new()
            } else {
                b"tok".to_vec()
            })
        };
        router.rebuild(std::slice::from_ref(&d), &some, None);
        assert!(router.table().get("/gh").unwrap().verifier.is_ok());
    }

    #[test]
    fn twilio_public_url_from_base() {
        let router = Router::default();
        let mut d = def("ns", "tw", Some(1), GH);
        d.spec.verification.scheme = spillway_api::Scheme::Twilio;
        router.rebuild(std::slice::from_ref(&d), &secrets, None);
        assert!(router.table().get("/gh").unwrap().verifier.is_err());
        router.rebuild(
            std::slice::from_ref(&d),
            &secrets,
            Some("https://hooks.example.com/"),
        );
        assert!(router.table().get("/gh").unwrap().verifier.is_ok());
    }
}
