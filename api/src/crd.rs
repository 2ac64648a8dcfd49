use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::GoDuration;
use crate::schema;

/// A public HTTPS entry point for one webhook provider, and the capped,
/// retrying worker pool that drains it into your service.
///
/// The shared ingress gateway verifies each request, stores it durably in a
/// NATS JetStream stream and only then answers the provider. A processor
/// delivers stored webhooks to `processor.sink` with at most
/// `processor.concurrency` requests in flight, retrying with backoff and
/// parking what cannot be delivered in a dead-letter stream.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "spillway.dev",
    version = "v1alpha1",
    kind = "WebhookEndpoint",
    plural = "webhookendpoints",
    singular = "webhookendpoint",
    shortname = "whe",
    category = "spillway",
    namespaced,
    status = "WebhookEndpointStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Path","type":"string","jsonPath":".status.path"}"#,
    printcolumn = r#"{"name":"Scheme","type":"string","jsonPath":".spec.verification.scheme"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Backlog","type":"integer","jsonPath":".status.backlog.pending"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.deduplication) || !has(self.stream) || duration(self.deduplication.window) <= duration(self.stream.maxAge)",
        "message": "deduplication.window must not be longer than stream.maxAge"
    },
    {
        "rule": "self.verification.scheme != 'twitch' || (has(self.handshake) && self.handshake.type == 'twitchCallbackVerification')",
        "message": "scheme twitch needs handshake type twitchCallbackVerification: Twitch enables a subscription only once its webhook_callback_verification challenge is echoed"
    }
]))]
pub struct WebhookEndpointSpec {
    /// URL path the shared gateway serves this endpoint on, for example
    /// `/github/acme`. Defaults to `/<namespace>/<name>`. Must start with `/`;
    /// only URL-safe characters; at most 256 characters. When two endpoints
    /// claim one path, the older keeps it and the newer reports PathConflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")
    )]
    pub path: Option<String>,

    /// Stop taking webhooks: the gateway answers 503 with Retry-After so
    /// providers retry later. Nothing already stored is dropped and the
    /// processor keeps draining the backlog.
    #[serde(default)]
    pub suspend: bool,

    /// How the gateway authenticates requests before storing them.
    pub verification: Verification,

    /// Answer a provider's URL-ownership probe (Slack url_verification,
    /// Meta hub.challenge, Zoom endpoint.url_validation, Microsoft Graph
    /// validationToken, Twitch webhook_callback_verification). Handshakes
    /// are answered synchronously and never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake: Option<Handshake>,

    /// Limits the gateway enforces before anything is stored.
    #[serde(default)]
    pub ingress: IngressSpec,

    /// Collapse provider retries of the same delivery into one stored
    /// message.
    #[serde(default)]
    pub deduplication: Deduplication,

    /// Deliver webhooks that share a key strictly in order (FIFO per key,
    /// parallel across keys). Unset: no ordering, maximum parallelism.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<Ordering>,

    /// The JetStream stream that holds accepted webhooks.
    #[serde(default)]
    pub stream: StreamSpec,

    /// The worker pool that delivers stored webhooks to your service (the
    /// endpoint's built-in listener, named `processor`).
    pub processor: ProcessorSpec,

    /// Which namespaces may attach WebhookListeners (more receivers of
    /// these webhooks) to this endpoint. Default: only its own.
    #[serde(
        default,
        skip_serializing_if = "crate::listener::AllowedListeners::is_default"
    )]
    pub allowed_listeners: crate::listener::AllowedListeners,
}

/// Request authentication.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.scheme == 'none' || (has(self.secretRefs) && size(self.secretRefs) > 0)",
        "message": "secretRefs needs at least one Secret reference unless scheme is none"
    },
    {
        "rule": "self.scheme != 'none' || !has(self.secretRefs) || size(self.secretRefs) == 0",
        "message": "scheme none takes no secretRefs; remove them or choose a scheme"
    },
    {
        "rule": "(self.scheme == 'hmac') == has(self.hmac)",
        "message": "hmac settings are required when scheme is hmac and not allowed otherwise"
    }
]))]
pub struct Verification {
    /// Signature scheme: `github` (X-Hub-Signature-256), `stripe`
    /// (Stripe-Signature), `slack` (X-Slack-Signature), `standardWebhooks`
    /// (webhook-signature, as sent by Svix and others), `shopify`
    /// (X-Shopify-Hmac-Sha256), `gitlab` (X-Gitlab-Token shared token),
    /// `twilio` (X-Twilio-Signature), `twitch` (Twitch EventSub
    /// Twitch-Eventsub-Message-Signature over message id, timestamp and body;
    /// needs `handshake.type: twitchCallbackVerification`), `hmac` (generic,
    /// see `hmac`), or `none` (accept unauthenticated requests; must be chosen
    /// explicitly).
    pub scheme: Scheme,

    /// Secrets holding the signing secret, in this namespace. A request is
    /// accepted when it verifies against any of them, so a secret is rotated
    /// by adding the new one, switching the provider, then removing the old.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub secret_refs: Vec<SecretKeyRef>,

    /// For timestamped schemes (stripe, slack, standardWebhooks, twitch, hmac
    /// with a timestamp header): how far the signed timestamp may be from the
    /// gateway's clock, in seconds. Older requests are rejected as replays.
    #[serde(default = "defaults::tolerance_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub tolerance_seconds: u32,

    /// For `twilio`: the public URL Twilio posts to (it is part of what
    /// Twilio signs), as configured in Twilio, with or without its query
    /// (the query Twilio signs is the one the request carries). Defaults to
    /// the gateway's configured public base URL followed by the endpoint's
    /// path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub public_url: Option<String>,

    /// Generic HMAC settings, required when scheme is `hmac`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac: Option<GenericHmac>,
}

/// A supported signature scheme.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Scheme {
    Github,
    Stripe,
    Slack,
    StandardWebhooks,
    Shopify,
    Gitlab,
    Twilio,
    Twitch,
    Hmac,
    None,
}

impl Scheme {
    /// The name used in the API (and in metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Github => "github",
            Scheme::Stripe => "stripe",
            Scheme::Slack => "slack",
            Scheme::StandardWebhooks => "standardWebhooks",
            Scheme::Shopify => "shopify",
            Scheme::Gitlab => "gitlab",
            Scheme::Twilio => "twilio",
            Scheme::Twitch => "twitch",
            Scheme::Hmac => "hmac",
            Scheme::None => "none",
        }
    }

    /// Schemes whose signature covers a timestamp checked against
    /// `toleranceSeconds`.
    pub fn is_timestamped(self) -> bool {
        matches!(
            self,
            Scheme::Stripe | Scheme::Slack | Scheme::StandardWebhooks | Scheme::Twitch
        )
    }
}

/// A key in a Kubernetes Secret in the endpoint's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret (a DNS subdomain, as Kubernetes requires of
    /// Secret names: a name that cannot exist is refused here instead of
    /// leaving a watch that can never sync).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key inside the Secret's data whose value is the secret (letters,
    /// digits, `-`, `_`, `.`, as Kubernetes requires of data keys).
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A generic HMAC signature carried in one header.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.timestampHeader) == (has(self.signedContent) && self.signedContent.contains('{timestamp}'))",
        "message": "hmac.timestampHeader and a {timestamp} placeholder in hmac.signedContent go together: a timestamp that is not signed protects nothing against replays, and {timestamp} needs the header it is read from"
    }
]))]
pub struct GenericHmac {
    /// Request header carrying the signature, for example `X-Signature`.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub header: String,
    /// Hash function of the HMAC.
    #[serde(default)]
    pub algorithm: HmacAlgorithm,
    /// How the signature bytes are written in the header.
    #[serde(default)]
    pub encoding: SignatureEncoding,
    /// Text before the encoded signature in the header, for example
    /// `sha256=`. Compared exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub prefix: Option<String>,
    /// What is signed, as a template: `{body}` is the raw request body and
    /// `{timestamp}` the value of `timestampHeader`. Default `{body}`.
    /// Example for Zoom: `v0:{timestamp}:{body}`.
    #[serde(default = "defaults::signed_content")]
    #[schemars(length(min = 1, max = 256))]
    pub signed_content: String,
    /// Header carrying a Unix timestamp (seconds) that is part of the signed
    /// content; it must be within `toleranceSeconds`. Required exactly when
    /// `signedContent` contains `{timestamp}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub timestamp_header: Option<String>,
}

/// HMAC hash function.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HmacAlgorithm {
    Sha1,
    #[default]
    Sha256,
    Sha512,
}

/// Signature encoding.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    #[default]
    Hex,
    Base64,
}

/// A provider's URL-ownership probe and how to answer it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.type != 'metaHubChallenge' || has(self.verifyTokenSecretRef)",
        "message": "handshake type metaHubChallenge needs verifyTokenSecretRef (the verify token you entered at Meta)"
    }
]))]
pub struct Handshake {
    /// Which probe to answer: `slackUrlVerification`, `metaHubChallenge`
    /// (GET with hub.mode=subscribe), `zoomUrlValidation`,
    /// `msGraphValidationToken` or `twitchCallbackVerification`.
    #[serde(rename = "type")]
    pub kind: HandshakeType,
    /// For `metaHubChallenge`: Secret key holding the verify token you
    /// configured at Meta; the challenge is echoed only when it matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_token_secret_ref: Option<SecretKeyRef>,
    /// For `zoomUrlValidation`: Secret key holding the Zoom secret token used
    /// to compute encryptedToken. Defaults to the first of
    /// `verification.secretRefs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// Supported handshakes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum HandshakeType {
    SlackUrlVerification,
    MetaHubChallenge,
    ZoomUrlValidation,
    MsGraphValidationToken,
    TwitchCallbackVerification,
}

/// Limits applied by the gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    /// Largest accepted request body in bytes; larger requests get 413
    /// without being read past the limit. NATS `max_payload` must exceed it.
    #[serde(default = "defaults::max_body_bytes")]
    #[schemars(range(min = 1, max = 8388608))]
    pub max_body_bytes: u64,
    /// Token-bucket limit on verified requests for this endpoint (requests
    /// that fail verification are answered 401 and spend nothing); beyond
    /// it the gateway answers 429 with Retry-After. Enforced by each gateway
    /// pod on its share: the limit divided by the gateway's
    /// `rateLimitReplicas` (the chart sets its replica count, or
    /// `autoscaling.minReplicas`), so the total holds with an even spread of
    /// requests and is exceeded by at most the ratio of running pods to that
    /// count. Unset: no per-endpoint limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<IngressRateLimit>,
    /// HTTP status answered once a webhook is stored: 200, 202 or 204.
    #[serde(default = "defaults::response_status")]
    #[schemars(extend("enum" = [200, 202, 204]))]
    pub response_status: u16,
    /// Request headers that are never stored (credentials a sender puts in
    /// `Authorization`, `Cookie`, an API-key header): the gateway verifies
    /// with them, then drops them, so they reach no stream, sink, replay or
    /// dead letter. Names, case-insensitive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(regex(pattern = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$"))
    )]
    pub redact_headers: Vec<String>,
}

impl Default for IngressSpec {
    fn default() -> Self {
        Self {
            max_body_bytes: defaults::max_body_bytes(),
            rate_limit: None,
            response_status: defaults::response_status(),
            redact_headers: Vec::new(),
        }
    }
}

/// Token bucket for incoming requests.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.burst >= self.requestsPerSecond", "message": "rateLimit.burst must be at least requestsPerSecond"}
]))]
pub struct IngressRateLimit {
    /// Sustained requests per second.
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_second: u32,
    /// Requests allowed at once above the sustained rate.
    #[schemars(range(min = 1, max = 1000000))]
    pub burst: u32,
}

/// Deduplication of provider retries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(self.source == 'header') == has(self.header)", "message": "deduplication.header is required when source is header and not allowed otherwise"},
    {"rule": "duration(self.window) >= duration('1s') && duration(self.window) <= duration('168h')", "message": "deduplication.window must be between 1s and 168h"}
]))]
pub struct Deduplication {
    /// How long a delivery id is remembered (JetStream's duplicate window).
    /// A Go-style duration such as `2m` or `24h`.
    #[serde(default = "defaults::dedup_window")]
    pub window: GoDuration,
    /// Where the delivery id comes from: `provider` (the scheme's own id:
    /// X-GitHub-Delivery, the Stripe event id, webhook-id,
    /// X-Shopify-Webhook-Id, the Slack event_id,
    /// Twitch-Eventsub-Message-Id, ...; falls back to a body hash),
    /// `header` (the header named in `header`), `bodyHash` (SHA-256 of the
    /// body) or `none` (no deduplication). With a body hash (the
    /// fallback for `hmac`, `none` and requests without a provider id), two
    /// requests with byte-identical bodies within `window` are one delivery:
    /// the second is answered 2xx and not stored again. Use `header` or
    /// `none` for senders that can send the same body twice on purpose.
    #[serde(default)]
    pub source: DedupSource,
    /// Header carrying the delivery id when source is `header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub header: Option<String>,
}

impl Default for Deduplication {
    fn default() -> Self {
        Self {
            window: defaults::dedup_window(),
            source: DedupSource::default(),
            header: None,
        }
    }
}

/// Source of the deduplication id.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum DedupSource {
    #[default]
    Provider,
    Header,
    BodyHash,
    None,
}

/// Per-key FIFO delivery.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.keyHeader) != has(self.keyJsonPointer)", "message": "ordering needs exactly one of keyHeader or keyJsonPointer"},
    {"rule": "self.partitions >= oldSelf.partitions", "message": "ordering.partitions cannot be reduced: webhooks already stored on the removed partitions would never be delivered; keep the number, or create a new endpoint"}
]))]
pub struct Ordering {
    /// Request header whose value is the ordering key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub key_header: Option<String>,
    /// JSON pointer (RFC 6901) into the body whose value is the ordering key,
    /// for example `/data/object/customer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = r"^(/[^/]*)+$"))]
    pub key_json_pointer: Option<String>,
    /// Number of partitions keys are hashed into. Each partition is
    /// delivered one message at a time, so this bounds ordered parallelism.
    /// It can grow but not shrink (stored webhooks stay on their partition).
    #[serde(default = "defaults::partitions")]
    #[schemars(range(min = 1, max = 256))]
    pub partitions: u16,
}

/// The JetStream stream behind the endpoint. Field names follow JetStream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.maxAge) >= duration('1m')", "message": "stream.maxAge must be at least 1m"}
]))]
pub struct StreamSpec {
    /// How long webhooks are kept in the history (how far back `spillway
    /// replay` can go), and how long one may wait undelivered: a webhook
    /// older than this is dead-lettered with reason `expired` instead of
    /// being delivered (never dropped silently). A Go-style duration such as
    /// `72h`.
    #[serde(default = "defaults::stream_max_age")]
    pub max_age: GoDuration,
    /// Most bytes of undelivered webhooks (the work stream); -1 for no
    /// limit other than the server's. Delivered webhooks do not count. When
    /// reached, the gateway answers 503 with Retry-After (providers retry)
    /// and `StreamReady` is False with reason `BacklogFull` until the
    /// backlog drains. Lowering it below what is stored now is refused
    /// (`LimitsWouldDropWebhooks`).
    #[serde(default = "defaults::stream_max_bytes")]
    #[schemars(range(min = -1))]
    pub max_bytes: i64,
    /// Most undelivered webhooks (the work stream); -1 for no limit. As
    /// `maxBytes`.
    #[serde(default = "defaults::unlimited")]
    #[schemars(range(min = -1))]
    pub max_messages: i64,
    /// Most bytes the history (for `spillway replay`) keeps; the oldest are
    /// dropped to make room, and it never blocks intake. -1 for no limit
    /// other than the server's.
    #[serde(default = "defaults::stream_max_bytes")]
    #[schemars(range(min = -1))]
    pub history_max_bytes: i64,
    /// Most bytes of attempt records (one per delivery attempt, shown by
    /// `spillway attempts`) kept; the oldest are dropped to make room, and
    /// recording never delays a delivery. Records are kept for `maxAge` at
    /// most. -1 for no limit other than the server's.
    #[serde(default = "defaults::attempts_max_bytes")]
    #[schemars(range(min = -1))]
    pub attempts_max_bytes: i64,
    /// Copies JetStream keeps (1, 3 or 5 are sensible; a cluster of that
    /// size is needed). With 1, an acknowledged webhook lives on one server.
    #[serde(default = "defaults::replicas")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: u8,
    /// `file` (survives restarts) or `memory`.
    #[serde(default)]
    pub storage: StorageType,
    /// Kept for compatibility and ignored: undelivered webhooks are never
    /// dropped to make room (a full work stream refuses new ones with 503),
    /// and the history always drops its oldest.
    #[serde(default)]
    pub discard: DiscardPolicy,
    /// What happens to the streams when the WebhookEndpoint is deleted:
    /// `Retain` (default; undelivered and dead-lettered webhooks stay in
    /// NATS for you to inspect or move) or `Delete`.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

impl Default for StreamSpec {
    fn default() -> Self {
        Self {
            max_age: defaults::stream_max_age(),
            max_bytes: defaults::stream_max_bytes(),
            max_messages: defaults::unlimited(),
            history_max_bytes: defaults::stream_max_bytes(),
            attempts_max_bytes: defaults::attempts_max_bytes(),
            replicas: defaults::replicas(),
            storage: StorageType::default(),
            discard: DiscardPolicy::default(),
            deletion_policy: DeletionPolicy::default(),
        }
    }
}

/// JetStream storage backend.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StorageType {
    #[default]
    File,
    Memory,
}

/// JetStream discard policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiscardPolicy {
    Old,
    #[default]
    New,
}

/// What to do with the streams on deletion.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Retain,
    Delete,
}

/// The delivery worker pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.timeout) >= duration('1s') && duration(self.timeout) <= duration('15m')", "message": "processor.timeout must be between 1s and 15m"}
]))]
pub struct ProcessorSpec {
    /// Where webhooks are delivered (HTTP POST).
    pub sink: Sink,
    /// Optional pod template for shipping your handler as a container beside
    /// Spillway's processor (point `sink.url` at `http://localhost:PORT`).
    /// Merged into the processor Deployment's pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "schema::preserve_unknown_object")]
    pub template: Option<serde_json::Value>,
    /// Hard cap on deliveries in flight to the sink, across all replicas,
    /// and the drain rate's only limit: enforced by JetStream
    /// (maxAckPending), so any single replica may use all of it. A failed
    /// delivery waiting for its retry does not count against it (unordered
    /// endpoints: it waits in the endpoint's retry stream). With ordering,
    /// split between replicas.
    #[serde(default = "defaults::concurrency")]
    #[schemars(range(min = 1, max = 10000))]
    pub concurrency: u32,
    /// How many processor pods run, scaled on the backlog.
    #[serde(default)]
    pub replicas: ReplicaSpec,
    /// Longest a single delivery may take before it counts as failed (also
    /// the JetStream ack wait). A Go-style duration such as `30s`.
    #[serde(default = "defaults::timeout")]
    pub timeout: GoDuration,
    /// Retries of failed deliveries.
    #[serde(default)]
    pub retry: RetrySpec,
    /// Optional cap on the delivery rate, for sinks that can only take so
    /// many requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<DeliveryRateLimit>,
    /// Where deliveries that cannot succeed are parked.
    #[serde(default)]
    pub dead_letter: DeadLetterSpec,
    /// Sign deliveries to the sink with Standard Webhooks headers
    /// (webhook-id, webhook-timestamp, webhook-signature) so it can check
    /// they came from Spillway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<SigningSpec>,
    /// Stop delivering (webhooks keep being accepted and stored); resume
    /// where it left off when set back to false.
    #[serde(default)]
    pub paused: bool,
    /// Keep the first 256 bytes of the sink's answer in each attempt
    /// record (`spillway attempts`). Set false for sinks that answer with
    /// data nobody should keep; status, timing and errors are still
    /// recorded.
    #[serde(default = "defaults::yes")]
    pub record_response_body: bool,
}

/// The delivery target. Exactly one of `url` or `service`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.url) != has(self.service)", "message": "sink needs exactly one of url or service"}
]))]
pub struct Sink {
    /// Absolute http(s) URL of the sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub url: Option<String>,
    /// A Service in the endpoint's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSink>,
}

/// A Service target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSink {
    /// Service name in the endpoint's namespace.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Service port number.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// HTTP path on the service. Default `/`.
    #[serde(default = "defaults::slash")]
    #[schemars(length(max = 1024), regex(pattern = r"^/"))]
    pub path: String,
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: UrlScheme,
}

/// Scheme of a Service sink.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UrlScheme {
    #[default]
    Http,
    Https,
}

/// Replica bounds and backlog-driven scaling.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.min <= self.max", "message": "processor.replicas.min must not exceed processor.replicas.max"}
]))]
pub struct ReplicaSpec {
    /// Fewest processor pods; 0 lets an idle endpoint scale to zero.
    #[serde(default = "defaults::min_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub min: u32,
    /// Most processor pods. Never more than `concurrency` run, since each
    /// needs at least one delivery slot.
    #[serde(default = "defaults::max_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub max: u32,
    /// Backlog (pending plus in-flight messages) one pod is expected to
    /// handle; replicas = ceil(backlog / this), within [min, max].
    #[serde(default = "defaults::target_backlog")]
    #[schemars(range(min = 1, max = 1000000))]
    pub target_backlog_per_replica: u32,
    /// `builtin` (the operator scales the Deployment) or `keda` (the
    /// operator emits a KEDA ScaledObject; needs KEDA installed).
    #[serde(default)]
    pub autoscaler: Autoscaler,
}

impl Default for ReplicaSpec {
    fn default() -> Self {
        Self {
            min: defaults::min_replicas(),
            max: defaults::max_replicas(),
            target_backlog_per_replica: defaults::target_backlog(),
            autoscaler: Autoscaler::default(),
        }
    }
}

/// Who scales the processor.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Autoscaler {
    #[default]
    Builtin,
    Keda,
}

/// Retry policy (JetStream max deliveries and backoff).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "size(self.backoff) <= self.maxAttempts", "message": "retry.backoff may list at most maxAttempts durations"},
    {"rule": "self.backoff.all(d, duration(d) >= duration('100ms') && duration(d) <= duration('24h'))", "message": "each retry.backoff duration must be between 100ms and 24h"}
]))]
pub struct RetrySpec {
    /// Deliveries attempted before a webhook is dead-lettered (the first
    /// attempt counts).
    #[serde(default = "defaults::max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: u32,
    /// Wait before each retry, as Go-style durations; the last entry repeats
    /// for further attempts. Default `1s, 5s, 30s, 2m, 10m`. The wait holds
    /// no concurrency slot (unordered endpoints); once it is over the
    /// webhook queues again behind what is already waiting.
    #[serde(default = "defaults::backoff")]
    #[schemars(length(min = 1, max = 100))]
    pub backoff: Vec<GoDuration>,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            max_attempts: defaults::max_attempts(),
            backoff: defaults::backoff(),
        }
    }
}

/// Outgoing rate cap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRateLimit {
    /// Deliveries started per second, across all replicas.
    #[schemars(range(min = 1, max = 100000))]
    pub per_second: u32,
}

/// Dead-letter stream settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.maxAge) >= duration('1m')", "message": "deadLetter.maxAge must be at least 1m"}
]))]
pub struct DeadLetterSpec {
    /// Keep undeliverable webhooks in a dead-letter stream. When false they
    /// are dropped after the last attempt (and counted).
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// How long dead letters are kept. A Go-style duration such as `336h`.
    #[serde(default = "defaults::dead_letter_max_age")]
    pub max_age: GoDuration,
}

impl Default for DeadLetterSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            max_age: defaults::dead_letter_max_age(),
        }
    }
}

/// Outbound signing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SigningSpec {
    /// Secret key holding the signing secret (`whsec_`-prefixed base64, or
    /// raw bytes).
    pub secret_ref: SecretKeyRef,
}

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEndpointStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Accepted, StreamReady and ProcessorReady, with reasons; and
    /// SinkAvailable, False (reason SinkGone) while the sink answers 410
    /// Gone. SinkAvailable does not affect Ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// URL path the gateway serves this endpoint on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Name of the JetStream stream holding accepted webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// Name of the dead-letter stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_stream: Option<String>,
    /// Stored webhooks not yet delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<Backlog>,
    /// Webhooks currently in the dead-letter stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<u64>,
    /// Processor replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaStatus>,
    /// Ordered endpoints: the partitions whose consumers are in place. The
    /// gateway spreads keys over at most this many, so when
    /// `ordering.partitions` grows it uses the new partitions only once
    /// their consumers exist (a webhook on a partition no consumer reads
    /// would leave the work stream undelivered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u16>,
    /// The format the gateway stores this endpoint's webhooks in: 2 once
    /// every processor the operator runs reads it (absent: 1, the format
    /// of earlier releases). Set by the operator during an upgrade; see
    /// docs/operations.md, "Stored format".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_format: Option<u8>,
}

/// Consumer backlog.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backlog {
    /// Messages waiting to be delivered.
    pub pending: u64,
    /// Messages being delivered (handed out, not yet acknowledged).
    pub ack_pending: u64,
    /// Messages handed out more than once (redelivered after a pod died
    /// or, on ordered endpoints, retried in place).
    pub redelivered: u64,
    /// Failed deliveries waiting out their retry delay, off the delivery
    /// cap (unordered endpoints).
    #[serde(default)]
    pub retrying: u64,
}

/// Replica counts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Replicas the operator asks for.
    pub desired: i32,
    /// Replicas that are ready.
    pub ready: i32,
}

impl WebhookEndpointSpec {
    /// The path the gateway serves this endpoint on: `spec.path`, or
    /// `/<namespace>/<name>`.
    pub fn effective_path(&self, namespace: &str, name: &str) -> String {
        self.path
            .clone()
            .unwrap_or_else(|| crate::names::default_path(namespace, name))
    }

    /// Every Secret reference of the spec, with the field that holds it
    /// (`verification.secretRefs[0]`, `handshake.secretRef`, …): what the
    /// operator checks and, except `processor.*`, what the gateway loads.
    pub fn secret_refs(&self) -> Vec<(String, &SecretKeyRef)> {
        let mut out: Vec<(String, &SecretKeyRef)> = self
            .verification
            .secret_refs
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("verification.secretRefs[{i}]"), r))
            .collect();
        if let Some(h) = &self.handshake {
            if let Some(r) = &h.verify_token_secret_ref {
                out.push(("handshake.verifyTokenSecretRef".into(), r));
            }
            if let Some(r) = &h.secret_ref {
                out.push(("handshake.secretRef".into(), r));
            }
        }
        if let Some(sig) = &self.processor.signing {
            out.push(("processor.signing.secretRef".into(), &sig.secret_ref));
        }
        out
    }

    /// The Secret references the gateway needs (verification and
    /// handshake, not the processor's signing secret).
    pub fn gateway_secret_refs(&self) -> impl Iterator<Item = &SecretKeyRef> {
        self.secret_refs()
            .into_iter()
            .filter(|(field, _)| !field.starts_with("processor."))
            .map(|(_, r)| r)
    }

    /// The processor's durable consumers (see
    /// [`EndpointNames::consumers`](crate::names::EndpointNames::consumers)).
    pub fn consumers(&self, names: &crate::names::EndpointNames) -> Vec<String> {
        names.consumers(self.ordering.as_ref().map(|o| o.partitions))
    }
}

impl WebhookEndpoint {
    /// [`WebhookEndpointSpec::effective_path`] with this object's namespace
    /// and name.
    pub fn effective_path(&self) -> String {
        self.spec.effective_path(
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default(),
        )
    }
}

pub(crate) mod defaults {
    use crate::duration::GoDuration;

    pub fn tolerance_seconds() -> u32 {
        300
    }
    pub fn signed_content() -> String {
        "{body}".into()
    }
    pub fn max_body_bytes() -> u64 {
        1024 * 1024
    }
    pub fn response_status() -> u16 {
        200
    }
    pub fn dedup_window() -> GoDuration {
        GoDuration::from_secs(120)
    }
    pub fn partitions() -> u16 {
        8
    }
    pub fn stream_max_age() -> GoDuration {
        GoDuration::from_secs(72 * 3600)
    }
    pub fn stream_max_bytes() -> i64 {
        1024 * 1024 * 1024
    }
    pub fn attempts_max_bytes() -> i64 {
        256 * 1024 * 1024
    }
    pub fn unlimited() -> i64 {
        -1
    }
    pub fn replicas() -> u8 {
        1
    }
    pub fn concurrency() -> u32 {
        10
    }
    pub fn timeout() -> GoDuration {
        GoDuration::from_secs(30)
    }
    pub fn slash() -> String {
        "/".into()
    }
    pub fn min_replicas() -> u32 {
        1
    }
    pub fn max_replicas() -> u32 {
        3
    }
    pub fn target_backlog() -> u32 {
        100
    }
    pub fn max_attempts() -> u32 {
        10
    }
    pub fn backoff() -> Vec<GoDuration> {
        [1, 5, 30, 120, 600]
            .into_iter()
            .map(GoDuration::from_secs)
            .collect()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn dead_letter_max_age() -> GoDuration {
        GoDuration::from_secs(336 * 3600)
    }
}
