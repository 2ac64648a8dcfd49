//! The `WebhookListener` resource: one more receiver of a WebhookEndpoint's
//! webhooks, with its own filter, sink, cap, retries, dead letters and
//! signing secret.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{Backlog, ProcessorSpec, ReplicaStatus};

/// One more receiver of a WebhookEndpoint's webhooks.
///
/// Every webhook the endpoint stores is offered to each of its listeners
/// (and to the endpoint's own `spec.processor`, its built-in listener).
/// A listener takes those its `eventTypes` and `filter` select and delivers
/// them to its own sink with its own cap, retries, dead letters and signing
/// secret; one slow or failing listener never delays another. A listener in
/// another namespace than its endpoint is accepted only when the endpoint's
/// `allowedListeners` admits that namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "spillway.dev",
    version = "v1alpha1",
    kind = "WebhookListener",
    plural = "webhooklisteners",
    singular = "webhooklistener",
    shortname = "whl",
    category = "spillway",
    namespaced,
    status = "WebhookListenerStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Backlog","type":"integer","jsonPath":".status.backlog.pending"}"#,
    printcolumn = r#"{"name":"Dead","type":"integer","jsonPath":".status.deadLetters"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct WebhookListenerSpec {
    /// The WebhookEndpoint whose webhooks this listener receives.
    pub endpoint_ref: EndpointRef,
    /// Event types this listener receives: the provider's event type
    /// (`X-GitHub-Event`, Stripe's `type`, Slack's `event.type`, …; see
    /// docs/listeners.md). An entry ending in `*` matches by prefix
    /// (`invoice.*`). Empty: every webhook.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub event_types: Vec<String>,
    /// A CEL expression over `headers` (request headers, lower-case
    /// names), `body` (the JSON body; null when not JSON) and `event` (the
    /// event type) that must be true for this listener to receive a
    /// webhook, for example `body.ref == 'refs/heads/main'`. Checked when
    /// applied (Accepted=False with the compile error); a webhook it fails
    /// on is not delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub filter: Option<String>,
    /// Where and how this listener delivers: the same fields as a
    /// WebhookEndpoint's `spec.processor` (sink, concurrency, replicas,
    /// timeout, retry, rateLimit, deadLetter, signing, paused, template).
    #[serde(flatten)]
    pub processor: ProcessorSpec,
}

/// A WebhookEndpoint, by name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRef {
    /// The WebhookEndpoint's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Its namespace; defaults to the listener's. Another namespace must
    /// admit this one in the endpoint's `allowedListeners`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// Which namespaces may attach WebhookListeners to an endpoint (in the
/// spirit of Gateway API's `allowedRoutes`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedListeners {
    /// Namespaces listeners may be in.
    #[serde(default)]
    pub namespaces: ListenerNamespaces,
}

impl AllowedListeners {
    /// Only the endpoint's own namespace (left out when serialized).
    pub fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

/// Namespaces admitted for listeners.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(self.from == 'Selector') == has(self.selector)", "message": "selector is required when from is Selector and not allowed otherwise"}
]))]
pub struct ListenerNamespaces {
    /// `Same` (the default): only the endpoint's namespace. `All`: any
    /// namespace. `Selector`: namespaces whose labels match `selector`
    /// (and the endpoint's own).
    #[serde(default)]
    pub from: FromNamespaces,
    /// Label selector of the admitted namespaces, with `from: Selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// Where listeners may come from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FromNamespaces {
    /// Only the endpoint's namespace.
    #[default]
    Same,
    /// Every namespace.
    All,
    /// Namespaces matching the selector.
    Selector,
}

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookListenerStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Accepted (reasons EndpointNotFound, NotAllowed,
    /// FilterInvalid, OrderingUnsupported, …), StreamReady and
    /// ProcessorReady.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// `namespace/name` of the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The listener's name in subjects, attempt records and
    /// `spillway attempts --listener`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    /// This listener's durable consumer on the endpoint's work stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Webhooks offered to this listener and not yet settled (filtered
    /// ones settle at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<Backlog>,
    /// This listener's dead letters in the endpoint's dead-letter stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letters: Option<u64>,
    /// Processor replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicaStatus>,
}

impl WebhookListenerSpec {
    /// The endpoint's namespace: `endpointRef.namespace`, else `own`.
    pub fn endpoint_namespace<'a>(&'a self, own: &'a str) -> &'a str {
        self.endpoint_ref.namespace.as_deref().unwrap_or(own)
    }
}
