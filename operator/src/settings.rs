//! Operator configuration from flags and environment variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Toleration;

fn duration(s: &str) -> Result<Duration, String> {
    spillway_api::duration::parse(s).map_err(|e| e.to_string())
}

/// A flag's value in JSON (the chart writes them with `toJson`).
fn json<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_str(s).map_err(|e| format!("not the JSON expected here: {e}"))
}

/// Labels, annotations or a node selector.
pub type StringMap = BTreeMap<String, String>;
/// Pod tolerations (an alias, so that clap takes the flag as one JSON
/// value rather than as a repeated flag).
pub type Tolerations = Vec<Toleration>;

/// The `fsGroup` of processor pods: a group ID, or none (`none`) where the
/// platform assigns one (OpenShift's restricted-v2 SCC refuses others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsGroup(pub Option<i64>);

fn fs_group(s: &str) -> Result<FsGroup, String> {
    match s {
        "none" => Ok(FsGroup(None)),
        n => n
            .parse::<i64>()
            .ok()
            .filter(|g| *g >= 0)
            .map(|g| FsGroup(Some(g)))
            .ok_or_else(|| format!("{s:?} is neither a group ID nor `none`")),
    }
}

/// Everything the operator is configured with. Every flag has an
/// environment variable (shown in `--help`), which is how the Helm chart
/// sets them.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "spillway-operator",
    version,
    about = "Reconciles WebhookEndpoints into JetStream streams, consumers and processor Deployments."
)]
pub struct Settings {
    /// NATS connection (URL default `nats://nats:4222`, credentials, TLS):
    /// the same flags as the gateway's, processor's and CLI's.
    #[command(flatten)]
    pub nats: spillway_api::nats::NatsArgs,
    /// Timeout of one JetStream API request.
    #[arg(long, env = "SPILLWAY_NATS_REQUEST_TIMEOUT", value_parser = duration, default_value = "5s")]
    pub nats_request_timeout: Duration,

    /// NATS monitoring endpoint (host:port) for KEDA's nats-jetstream
    /// scaler, used when an endpoint asks for `autoscaler: keda`.
    #[arg(
        long,
        env = "SPILLWAY_NATS_MONITORING_ENDPOINT",
        default_value = "nats:8222"
    )]
    pub nats_monitoring_endpoint: String,
    /// NATS account the KEDA scaler reads consumer lag in (`$G` is the
    /// global account of a server without accounts; with JWT or
    /// multi-account NATS, the account the streams live in).
    #[arg(long, env = "SPILLWAY_KEDA_NATS_ACCOUNT", default_value = "$G")]
    pub keda_nats_account: String,
    /// KEDA's scaler reads the monitoring endpoint over HTTPS.
    #[arg(long, env = "SPILLWAY_KEDA_NATS_USE_HTTPS", default_value_t = false, action = clap::ArgAction::Set)]
    pub keda_nats_use_https: bool,
    /// A KEDA ClusterTriggerAuthentication (CA and client certificate of a
    /// secured monitoring endpoint) every ScaledObject refers to.
    #[arg(long, env = "SPILLWAY_KEDA_CLUSTER_TRIGGER_AUTHENTICATION")]
    pub keda_cluster_trigger_authentication: Option<String>,
    /// NATS URL the processor pods connect to (defaults to --nats-url).
    #[arg(long, env = "SPILLWAY_PROCESSOR_NATS_URL")]
    pub processor_nats_url: Option<String>,
    /// Secret (looked up in each endpoint's namespace) holding NATS
    /// credentials for the processor pods; mounted read-only and passed as
    /// `SPILLWAY_NATS_CREDS_FILE`. Unset: processors connect without
    /// credentials.
    #[arg(long, env = "SPILLWAY_PROCESSOR_NATS_CREDS_SECRET")]
    pub processor_nats_creds_secret: Option<String>,
    /// Key of the credentials file in that Secret.
    #[arg(
        long,
        env = "SPILLWAY_PROCESSOR_NATS_CREDS_KEY",
        default_value = "nats.creds"
    )]
    pub processor_nats_creds_key: String,
    /// Secret (looked up in each endpoint's namespace) holding the CA
    /// certificate(s) the processor pods verify the NATS server with;
    /// mounted read-only and passed as `SPILLWAY_NATS_TLS_CA_FILE`. Unset:
    /// processors use the system roots of their image.
    #[arg(long, env = "SPILLWAY_PROCESSOR_NATS_TLS_CA_SECRET")]
    pub processor_nats_tls_ca_secret: Option<String>,
    /// Key of the CA file in that Secret.
    #[arg(
        long,
        env = "SPILLWAY_PROCESSOR_NATS_TLS_CA_KEY",
        default_value = "ca.crt"
    )]
    pub processor_nats_tls_ca_key: String,
    /// `kubernetes.io/tls` Secret (looked up in each endpoint's namespace)
    /// with the client certificate the processor pods present for NATS
    /// mutual TLS (keys `tls.crt` and `tls.key`); mounted read-only and
    /// passed as `SPILLWAY_NATS_TLS_CERT_FILE` and
    /// `SPILLWAY_NATS_TLS_KEY_FILE`. Unset: processors present none.
    #[arg(long, env = "SPILLWAY_PROCESSOR_NATS_TLS_CLIENT_SECRET")]
    pub processor_nats_tls_client_secret: Option<String>,
    /// Whether processors refuse to talk to NATS without TLS (passed as
    /// `SPILLWAY_NATS_TLS_REQUIRED`). Unset: the same as
    /// `--nats-tls-required`.
    #[arg(long, env = "SPILLWAY_PROCESSOR_NATS_TLS_REQUIRED", action = clap::ArgAction::Set)]
    pub processor_nats_tls_required: Option<bool>,
    /// Log format of the operator.
    #[arg(long, env = spillway_api::logging::FORMAT_ENV, value_enum, default_value_t)]
    pub log_format: spillway_api::logging::LogFormat,
    /// Log format of the processor pods (`SPILLWAY_LOG_FORMAT` in them).
    #[arg(
        long,
        env = "SPILLWAY_PROCESSOR_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub processor_log_format: spillway_api::logging::LogFormat,
    /// Log filter of the processor pods (`RUST_LOG` in them).
    #[arg(long, env = "SPILLWAY_PROCESSOR_LOG_LEVEL", default_value = "info")]
    pub processor_log_level: String,
    /// OTLP/HTTP endpoint the processor pods export traces to
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT` in them; `/v1/traces` is appended);
    /// empty: no export.
    #[arg(long, env = "SPILLWAY_PROCESSOR_OTLP_ENDPOINT", default_value = "")]
    pub processor_otlp_endpoint: String,
    /// `OTEL_TRACES_SAMPLER` of the processor pods (e.g.
    /// `parentbased_traceidratio`); empty: the SDK's default
    /// (`parentbased_always_on`).
    #[arg(long, env = "SPILLWAY_PROCESSOR_OTEL_SAMPLER", default_value = "")]
    pub processor_otel_sampler: String,
    /// `OTEL_TRACES_SAMPLER_ARG` of the processor pods (e.g. `0.1`).
    #[arg(long, env = "SPILLWAY_PROCESSOR_OTEL_SAMPLER_ARG", default_value = "")]
    pub processor_otel_sampler_arg: String,
    /// Processor container image.
    #[arg(long, env = "SPILLWAY_PROCESSOR_IMAGE", default_value = concat!("ghcr.io/spillway-dev/spillway-processor:", env!("CARGO_PKG_VERSION")))]
    pub processor_image: String,
    /// Processor image pull policy.
    #[arg(
        long,
        env = "SPILLWAY_PROCESSOR_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub processor_image_pull_policy: String,
    /// Processor CPU request.
    #[arg(long, env = "SPILLWAY_PROCESSOR_CPU_REQUEST", default_value = "50m")]
    pub processor_cpu_request: String,
    /// Processor memory request.
    #[arg(
        long,
        env = "SPILLWAY_PROCESSOR_MEMORY_REQUEST",
        default_value = "64Mi"
    )]
    pub processor_memory_request: String,
    /// Processor CPU limit (none when empty).
    #[arg(long, env = "SPILLWAY_PROCESSOR_CPU_LIMIT", default_value = "")]
    pub processor_cpu_limit: String,
    /// Processor memory limit (none when empty).
    #[arg(long, env = "SPILLWAY_PROCESSOR_MEMORY_LIMIT", default_value = "256Mi")]
    pub processor_memory_limit: String,
    /// Image pull Secrets (names, comma-separated) of processor pods whose
    /// endpoint template lists none. They must exist in each endpoint's
    /// namespace.
    #[arg(
        long,
        env = "SPILLWAY_PROCESSOR_IMAGE_PULL_SECRETS",
        value_delimiter = ','
    )]
    pub processor_image_pull_secrets: Vec<String>,
    /// Labels (a JSON object) of processor pods. An endpoint template's
    /// label of the same name wins; the operator's own labels win over both.
    #[arg(long, env = "SPILLWAY_PROCESSOR_POD_LABELS", value_parser = json::<StringMap>, default_value = "{}")]
    pub processor_pod_labels: StringMap,
    /// Annotations (a JSON object) of processor pods; an endpoint
    /// template's annotation of the same name wins.
    #[arg(long, env = "SPILLWAY_PROCESSOR_POD_ANNOTATIONS", value_parser = json::<StringMap>, default_value = "{}")]
    pub processor_pod_annotations: StringMap,
    /// nodeSelector (a JSON object) of processor pods whose endpoint
    /// template sets none.
    #[arg(long, env = "SPILLWAY_PROCESSOR_NODE_SELECTOR", value_parser = json::<StringMap>, default_value = "{}")]
    pub processor_node_selector: StringMap,
    /// Tolerations (a JSON array) of processor pods whose endpoint template
    /// sets none.
    #[arg(long, env = "SPILLWAY_PROCESSOR_TOLERATIONS", value_parser = json::<Tolerations>, default_value = "[]")]
    pub processor_tolerations: Tolerations,
    /// priorityClassName of processor pods whose endpoint template sets
    /// none.
    #[arg(long, env = "SPILLWAY_PROCESSOR_PRIORITY_CLASS_NAME")]
    pub processor_priority_class_name: Option<String>,
    /// fsGroup of processor pods whose endpoint template sets none (so that
    /// the image's user 65532 can read the mounted Secrets), or `none` on
    /// platforms that assign one themselves (OpenShift restricted-v2).
    #[arg(long, env = "SPILLWAY_PROCESSOR_FS_GROUP", value_parser = fs_group, default_value = "65532")]
    pub processor_fs_group: FsGroup,

    /// Address of the admin server (/healthz, /readyz, /metrics).
    #[arg(long, env = "SPILLWAY_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// Only watch this namespace (default: all namespaces).
    #[arg(long, env = "SPILLWAY_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Elect a leader through a coordination.k8s.io Lease so several
    /// replicas can run; only the leader reconciles.
    #[arg(long, env = "SPILLWAY_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, env = "SPILLWAY_LEASE_NAME", default_value = "spillway-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "spillway-system")]
    pub lease_namespace: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long a Lease is valid without renewal.
    #[arg(long, env = "SPILLWAY_LEASE_DURATION", value_parser = duration, default_value = "15s")]
    pub lease_duration: Duration,
    /// How often the leader renews the Lease.
    #[arg(long, env = "SPILLWAY_LEASE_RENEW_INTERVAL", value_parser = duration, default_value = "5s")]
    pub lease_renew_interval: Duration,

    /// How often every endpoint is re-checked (recreates streams deleted
    /// behind the operator's back, refreshes backlog and dead-letter counts).
    #[arg(long, env = "SPILLWAY_RESYNC_INTERVAL", value_parser = duration, default_value = "30s")]
    pub resync_interval: Duration,
    /// How long the backlog must ask for fewer replicas before the processor
    /// is scaled down.
    #[arg(long, env = "SPILLWAY_SCALE_DOWN_COOLDOWN", value_parser = duration, default_value = "5m")]
    pub scale_down_cooldown: Duration,
    /// How long a deleted endpoint waits for NATS to clean up its consumers
    /// and streams; after that the finalizer is released and a Warning Event
    /// names what was left behind.
    #[arg(long, env = "SPILLWAY_CLEANUP_TIMEOUT", value_parser = duration, default_value = "5m")]
    pub cleanup_timeout: Duration,
    /// How long an endpoint's `SinkAvailable` condition stays False after
    /// the last 410 Gone a processor reported, when no successful delivery
    /// follows (processors repeat the report every 30 s while the 410s go
    /// on).
    #[arg(long, env = "SPILLWAY_SINK_GONE_QUIET_PERIOD", value_parser = duration, default_value = "10m")]
    pub sink_gone_quiet_period: Duration,
    /// How long every processor must have read stored format 2 (every
    /// processor Deployment marked and rolled out, none with pods shutting
    /// down) before the gateway is told to write it: covers an earlier
    /// release's pod still finishing its last pull in its termination
    /// grace period (30 s by default).
    #[arg(long, env = "SPILLWAY_STORED_FORMAT_SETTLE", value_parser = duration, default_value = "90s")]
    pub stored_format_settle: Duration,
    /// Endpoints reconciled at once.
    #[arg(long, env = "SPILLWAY_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,
}

/// Where the operator finds NATS unless told otherwise (the chart's
/// in-cluster service).
pub const DEFAULT_NATS_URL: &str = "nats://nats:4222";

impl Settings {
    /// The settings with every default, for tests and embedding.
    pub fn defaults() -> Self {
        <Self as clap::Parser>::parse_from(["spillway-operator"])
    }

    /// The operator's own NATS credentials and TLS files.
    pub fn nats_auth(&self) -> spillway_api::nats::NatsAuth {
        self.nats.auth()
    }

    /// The NATS URL(s) the operator connects to.
    pub fn nats_url(&self) -> String {
        self.nats.url_or(DEFAULT_NATS_URL)
    }

    /// Whether processors require TLS to NATS.
    pub fn processor_nats_tls_required(&self) -> bool {
        self.processor_nats_tls_required
            .unwrap_or(self.nats.tls_required.unwrap_or(false))
    }

    /// The NATS URL processors use.
    pub fn processor_nats_url(&self) -> String {
        self.processor_nats_url
            .clone()
            .unwrap_or_else(|| self.nats_url())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_parse_and_flags_override() {
        let d = Settings::defaults();
        assert_eq!(d.resync_interval, Duration::from_secs(30));
        assert!(d.leader_elect);
        let s = Settings::parse_from([
            "x",
            "--nats-url",
            "nats://a:1",
            "--scale-down-cooldown",
            "2s",
            "--leader-elect",
            "false",
        ]);
        assert_eq!(s.scale_down_cooldown, Duration::from_secs(2));
        assert!(!s.leader_elect);
        assert_eq!(s.processor_nats_url(), "nats://a:1");
        assert!(Settings::try_parse_from(["x", "--resync-interval", "soon"]).is_err());
    }

    #[test]
    fn processor_pod_defaults_parse_from_json() {
        let d = Settings::defaults();
        assert!(d.processor_image_pull_secrets.is_empty());
        assert!(d.processor_pod_labels.is_empty() && d.processor_tolerations.is_empty());
        assert_eq!(d.processor_fs_group, FsGroup(Some(65532)));
        let s = Settings::parse_from([
            "x",
            "--processor-image-pull-secrets",
            "regcred,mirror",
            "--processor-pod-labels",
            r#"{"team":"platform"}"#,
            "--processor-node-selector",
            r#"{"kubernetes.io/os":"linux"}"#,
            "--processor-tolerations",
            r#"[{"key":"dedicated","operator":"Equal","value":"hooks","effect":"NoSchedule"}]"#,
            "--processor-priority-class-name",
            "hooks",
            "--processor-fs-group",
            "none",
        ]);
        assert_eq!(s.processor_image_pull_secrets, ["regcred", "mirror"]);
        assert_eq!(s.processor_pod_labels["team"], "platform");
        assert_eq!(s.processor_node_selector["kubernetes.io/os"], "linux");
        assert_eq!(s.processor_tolerations[0].value.as_deref(), Some("hooks"));
        assert_eq!(s.processor_priority_class_name.as_deref(), Some("hooks"));
        assert_eq!(s.processor_fs_group, FsGroup(None));
        for (flag, bad) in [
            ("--processor-pod-labels", "team=platform"),
            ("--processor-pod-labels", r#"{"n":1}"#),
            ("--processor-tolerations", r#"{"key":"x"}"#),
            ("--processor-fs-group", "-1"),
            ("--processor-fs-group", "auto"),
        ] {
            assert!(
                Settings::try_parse_from(["x", flag, bad]).is_err(),
                "{flag} {bad}"
            );
        }
    }

    #[test]
    fn processor_tls_required_follows_the_operator_unless_set() {
        let d = Settings::defaults();
        assert_eq!(d.processor_nats_tls_ca_key, "ca.crt");
        assert!(!d.processor_nats_tls_required());
        let s = Settings::parse_from(["x", "--nats-tls-required"]);
        assert!(s.processor_nats_tls_required());
        let s = Settings::parse_from([
            "x",
            "--nats-tls-required",
            "--processor-nats-tls-required",
            "false",
        ]);
        assert!(!s.processor_nats_tls_required());
        let s = Settings::parse_from([
            "x",
            "--processor-nats-tls-required",
            "true",
            "--processor-nats-tls-ca-secret",
            "nats-ca",
            "--processor-nats-tls-client-secret",
            "nats-client",
        ]);
        assert!(s.processor_nats_tls_required());
        assert_eq!(s.processor_nats_tls_ca_secret.as_deref(), Some("nats-ca"));
        assert_eq!(
            s.processor_nats_tls_client_secret.as_deref(),
            Some("nats-client")
        );
        assert!(Settings::try_parse_from(["x", "--processor-nats-tls-required", "maybe"]).is_err());
    }
}
