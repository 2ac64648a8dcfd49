//! The processor Deployment and its configuration, rendered from a
//! WebhookEndpoint (pure).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction,
    LocalObjectReference, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use spillway_api::logging;
use spillway_api::names::{BUILTIN_LISTENER, EndpointNames, fnv1a64};
use spillway_api::validate::Timings;
use spillway_api::wire::{
    AttemptsConfig, DrainConfig, FilterConfig, PROCESSOR_CONFIG_ENV, ProcessorConfig, RetryConfig,
};
use spillway_api::{ProcessorSpec, UrlScheme, WebhookEndpoint, WebhookListener};

use crate::settings::Settings;

pub mod keda;

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "spillway-operator";
/// Name of the processor container.
pub const CONTAINER: &str = "processor";
/// Pod template annotation that changes whenever the processor's
/// configuration does, so a change rolls the pods.
pub const CONFIG_HASH: &str = "spillway.dev/config-hash";
/// Deployment annotation: hash of everything the operator renders, to skip
/// writes when nothing changed.
pub const RENDER_HASH: &str = "spillway.dev/render-hash";
/// Pod template and Deployment annotation: the stored format
/// (`spillway_api::stored`) the processor this operator renders reads.
/// The template's copy rolls the pods of an earlier release's template; the
/// Deployment's copy is what the operator's cache (which drops templates)
/// sees, to tell when every processor reads format 2 (`status.storedFormat`).
pub const READS_STORED_FORMAT: &str = "spillway.dev/reads-stored-format";
/// Deployment annotation: `keda` while a KEDA ScaledObject scales it (its
/// replicas are left to KEDA's HPA), `builtin` otherwise.
pub const AUTOSCALER: &str = "spillway.dev/autoscaler";
/// Group of the processor image's user (Dockerfile `USER 65532:65532`):
/// the pod's `fsGroup` (the default of `--processor-fs-group`), so mounted
/// Secrets are readable.
pub const PROCESSOR_GID: i64 = 65532;
/// Field manager that briefly holds `spec.replicas` when scaling is handed
/// over to KEDA, so the operator's next apply (without replicas) does not
/// reset them to 1.
pub const HANDOVER_FIELD_MANAGER: &str = "spillway-operator-handover";
/// Label naming the owning endpoint (`instance` may be shortened).
pub const ENDPOINT_LABEL: &str = "spillway.dev/endpoint";
/// Environment variable with the NATS URL for the processor.
pub const NATS_URL_ENV: &str = spillway_api::nats::env::URL;
/// Port of the processor's /healthz, /readyz and /metrics (its default).
pub const ADMIN_PORT: i32 = 9090;
/// Environment variable with the processor's NATS credentials file (the
/// processor still reads the older `SPILLWAY_NATS_CREDS` too).
pub const NATS_CREDS_ENV: &str = spillway_api::nats::env::CREDS_FILE;
/// Where the processor's NATS credentials are mounted.
pub const NATS_CREDS_DIR: &str = "/var/run/spillway/nats";
/// Environment variable with the CA file processors verify NATS with.
pub const NATS_TLS_CA_ENV: &str = spillway_api::nats::env::TLS_CA_FILE;
/// Environment variable with the processor's NATS client certificate.
pub const NATS_TLS_CERT_ENV: &str = spillway_api::nats::env::TLS_CERT_FILE;
/// Environment variable with the processor's NATS client key.
pub const NATS_TLS_KEY_ENV: &str = spillway_api::nats::env::TLS_KEY_FILE;
/// Environment variable making the processor refuse plaintext NATS.
pub const NATS_TLS_REQUIRED_ENV: &str = spillway_api::nats::env::TLS_REQUIRED;
/// Where the CA Secret for NATS is mounted in processor pods.
pub const NATS_TLS_CA_DIR: &str = "/var/run/spillway/nats-ca";
/// Where the `kubernetes.io/tls` client Secret for NATS is mounted in
/// processor pods (`tls.crt`, `tls.key`).
pub const NATS_TLS_CLIENT_DIR: &str = "/var/run/spillway/nats-tls";
/// Where the signing secret is mounted.
pub const SIGNING_DIR: &str = "/var/run/spillway/signing";

/// Kubernetes names and label values are limited to 63 characters; longer
/// ones are cut and suffixed with a hash of the whole.
pub fn short(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let h = format!("{:08x}", fnv1a64(name.as_bytes()) as u32);
    let cut = name[..max - 9].trim_end_matches(['-', '.']);
    format!("{cut}-{h}")
}

/// Name of the processor Deployment of endpoint `name`.
pub fn deployment_name(name: &str) -> String {
    format!("{}-processor", short(name, 63 - "-processor".len()))
}

/// Labels on the Deployment and its pods (the first two select the pods).
pub fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "spillway-processor".into()),
        ("app.kubernetes.io/instance".into(), short(name, 63)),
        ("app.kubernetes.io/component".into(), "processor".into()),
        ("app.kubernetes.io/part-of".into(), "spillway".into()),
        (
            "app.kubernetes.io/managed-by".into(),
            "spillway-operator".into(),
        ),
        (ENDPOINT_LABEL.into(), short(name, 63)),
    ])
}

fn selector(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "spillway-processor".into()),
        ("app.kubernetes.io/instance".into(), short(name, 63)),
    ])
}

/// The sink URL for the processor.
pub fn sink_url(ep: &WebhookEndpoint) -> Option<String> {
    let sink = &ep.spec.processor.sink;
    if let Some(u) = &sink.url {
        return Some(u.clone());
    }
    let s = sink.service.as_ref()?;
    let scheme = match s.scheme {
        UrlScheme::Http => "http",
        UrlScheme::Https => "https",
    };
    Some(format!(
        "{scheme}://{}.{}.svc:{}{}",
        s.name,
        ep.namespace().unwrap_or_default(),
        s.port,
        s.path
    ))
}

/// The processor pods an endpoint may run, `(min, max)`: the spec's bounds
/// with `max` at most `concurrency` (each pod needs at least one delivery
/// slot; more pods would each take one and exceed the cap together).
pub fn replica_bounds(p: &ProcessorSpec) -> (u32, u32) {
    let max = p.replicas.max.min(p.concurrency).max(1);
    (p.replicas.min.min(max), max)
}

/// Each pod's share of `concurrency`: pods at `max` never exceed it together.
/// Only ordered endpoints need it (see [`slots_per_pod`]).
pub fn per_replica(p: &ProcessorSpec) -> u32 {
    (p.concurrency / replica_bounds(p).1).max(1)
}

/// Delivery slots of one processor pod. Unordered: the whole
/// `concurrency`, since the shared consumer's `maxAckPending` caps all pods
/// together and a pod pulls only as many messages as it has free slots, so
/// one pod alone can use the whole cap. Ordered: the per-pod share, because
/// there JetStream caps the total at the partition count, not at
/// `concurrency`.
pub fn slots_per_pod(ep: &WebhookEndpoint) -> u32 {
    let p = &ep.spec.processor;
    match ep.spec.ordering {
        None => p.concurrency.max(1),
        Some(_) => per_replica(p),
    }
}

/// The durable consumers the processor pulls from (one rule:
/// [`EndpointNames::consumers`]).
pub fn consumer_names(ep: &WebhookEndpoint, names: &EndpointNames) -> Vec<String> {
    ep.spec.consumers(names)
}

/// The processor's configuration for endpoint `ep`.
pub fn processor_config(
    ep: &WebhookEndpoint,
    names: &EndpointNames,
    t: &Timings,
) -> ProcessorConfig {
    let p = &ep.spec.processor;
    ProcessorConfig {
        endpoint: format!("{}/{}", ep.namespace().unwrap_or_default(), ep.name_any()),
        stream: names.stream(),
        consumers: consumer_names(ep, names),
        dead_letter_subject: p.dead_letter.enabled.then(|| names.dead_letter_subject()),
        sink_url: sink_url(ep).unwrap_or_default(),
        concurrency: p.concurrency,
        concurrency_per_replica: slots_per_pod(ep),
        max_replicas: replica_bounds(p).1,
        retry: ep.spec.ordering.is_none().then(|| RetryConfig {
            stream: names.retry_stream(),
            subject: names.retry_subject(BUILTIN_LISTENER),
            consumer: names.retry_consumer(BUILTIN_LISTENER),
            due_subject: names.due_subject(BUILTIN_LISTENER),
        }),
        timeout: t.delivery_timeout.into(),
        max_attempts: p.retry.max_attempts,
        backoff: t.backoff.iter().map(|d| (*d).into()).collect(),
        drain: None,
        expire_after: Some(t.stream_max_age.into()),
        rate_limit_per_second: p.rate_limit.as_ref().map(|r| r.per_second),
        paused: p.paused,
        signing_secret_file: p
            .signing
            .as_ref()
            .map(|s| format!("{SIGNING_DIR}/{}", s.secret_ref.key)),
        attempts: Some(AttemptsConfig {
            listener: BUILTIN_LISTENER.to_owned(),
            record_response_body: p.record_response_body,
        }),
        filter: None,
    }
}

/// The endpoint as a WebhookListener's processor sees it: the listener's
/// processor settings (so [`spillway_api::validate::check`] gives its
/// timings) and namespace (a `sink.service` is in the listener's
/// namespace), the endpoint's stream settings.
pub fn listener_view(l: &WebhookListener, ep: &WebhookEndpoint) -> WebhookEndpoint {
    let mut view = ep.clone();
    view.spec.processor = l.spec.processor.clone();
    view.metadata.namespace = l.namespace();
    view
}

/// The processor configuration of WebhookListener `l` (named `token` in
/// subjects) on endpoint `ep`; `t` are the timings of
/// [`listener_view`]'s spec.
pub fn listener_config(
    l: &WebhookListener,
    ep: &WebhookEndpoint,
    names: &EndpointNames,
    token: &str,
    t: &Timings,
) -> ProcessorConfig {
    let view = listener_view(l, ep);
    let p = &l.spec.processor;
    let mut c = processor_config(&view, names, t);
    c.endpoint = format!("{}/{}", ep.namespace().unwrap_or_default(), ep.name_any());
    c.consumers = vec![names.listener_consumer(token)];
    c.dead_letter_subject = p
        .dead_letter
        .enabled
        .then(|| names.listener_dead_letter_subject(token));
    c.retry = Some(RetryConfig {
        stream: names.retry_stream(),
        subject: names.retry_subject(token),
        consumer: names.retry_consumer(token),
        due_subject: names.due_subject(token),
    });
    c.attempts = Some(AttemptsConfig {
        listener: token.to_owned(),
        record_response_body: p.record_response_body,
    });
    let f = &l.spec;
    c.filter = (!f.event_types.is_empty() || f.filter.is_some()).then(|| FilterConfig {
        event_types: f.event_types.clone(),
        expression: f.filter.clone(),
    });
    c
}

/// Parse the user's pod template (`spec.processor.template`).
pub fn user_template(ep: &WebhookEndpoint) -> Result<Option<PodTemplateSpec>, String> {
    template_of(&ep.spec.processor)
}

/// Parse a listener's pod template (`template`).
pub fn template_of(p: &ProcessorSpec) -> Result<Option<PodTemplateSpec>, String> {
    match &p.template {
        None => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| format!("processor.template is not a valid pod template: {e}")),
    }
}

fn quantity(s: &str) -> Option<Quantity> {
    (!s.is_empty()).then(|| Quantity(s.to_owned()))
}

fn resources(settings: &Settings) -> ResourceRequirements {
    let pair = |cpu: &str, mem: &str| {
        let m: BTreeMap<String, Quantity> = [("cpu", quantity(cpu)), ("memory", quantity(mem))]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
            .collect();
        (!m.is_empty()).then_some(m)
    };
    ResourceRequirements {
        requests: pair(
            &settings.processor_cpu_request,
            &settings.processor_memory_request,
        ),
        limits: pair(
            &settings.processor_cpu_limit,
            &settings.processor_memory_limit,
        ),
        ..Default::default()
    }
}

fn probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Default::default()
    }
}

fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An owner reference making the endpoint the controller of a child.
pub fn owner_ref(ep: &WebhookEndpoint) -> OwnerReference {
    ep.controller_owner_ref(&())
        .expect("stored endpoints have a uid")
}

/// The NATS credentials and TLS environment of processor pods (file paths
/// inside the Secrets the operator mounts, and whether TLS is required).
pub fn processor_nats_env(settings: &Settings) -> Vec<(&'static str, String)> {
    let mut env = Vec::new();
    if settings.processor_nats_creds_secret.is_some() {
        env.push((
            NATS_CREDS_ENV,
            format!("{NATS_CREDS_DIR}/{}", settings.processor_nats_creds_key),
        ));
    }
    if settings.processor_nats_tls_ca_secret.is_some() {
        env.push((
            NATS_TLS_CA_ENV,
            format!("{NATS_TLS_CA_DIR}/{}", settings.processor_nats_tls_ca_key),
        ));
    }
    if settings.processor_nats_tls_client_secret.is_some() {
        env.push((NATS_TLS_CERT_ENV, format!("{NATS_TLS_CLIENT_DIR}/tls.crt")));
        env.push((NATS_TLS_KEY_ENV, format!("{NATS_TLS_CLIENT_DIR}/tls.key")));
    }
    if settings.processor_nats_tls_required() {
        env.push((NATS_TLS_REQUIRED_ENV, "true".into()));
    }
    env
}

/// A Secret the processor pods mount from the endpoint's namespace to reach
/// NATS, with the keys they read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessorSecret {
    /// The operator flag that names it (for messages).
    pub flag: &'static str,
    /// The Secret's name.
    pub name: String,
    /// The keys the processor reads.
    pub keys: Vec<String>,
}

/// The NATS credentials and TLS Secrets processor pods mount, from the
/// operator's settings.
pub fn processor_nats_secrets(settings: &Settings) -> Vec<ProcessorSecret> {
    let mut out = Vec::new();
    if let Some(name) = &settings.processor_nats_creds_secret {
        out.push(ProcessorSecret {
            flag: "--processor-nats-creds-secret",
            name: name.clone(),
            keys: vec![settings.processor_nats_creds_key.clone()],
        });
    }
    if let Some(name) = &settings.processor_nats_tls_ca_secret {
        out.push(ProcessorSecret {
            flag: "--processor-nats-tls-ca-secret",
            name: name.clone(),
            keys: vec![settings.processor_nats_tls_ca_key.clone()],
        });
    }
    if let Some(name) = &settings.processor_nats_tls_client_secret {
        out.push(ProcessorSecret {
            flag: "--processor-nats-tls-client-secret",
            name: name.clone(),
            keys: vec!["tls.crt".into(), "tls.key".into()],
        });
    }
    out
}

/// The platform's defaults for processor pods (`--processor-node-selector`
/// and the like) where the endpoint's template sets none. Unset defaults
/// leave the pod spec as it was, so Deployments of operators without them
/// keep their render hash.
fn apply_pod_defaults(pod: &mut PodSpec, settings: &Settings) {
    if pod.image_pull_secrets.as_ref().is_none_or(Vec::is_empty)
        && !settings.processor_image_pull_secrets.is_empty()
    {
        pod.image_pull_secrets = Some(
            settings
                .processor_image_pull_secrets
                .iter()
                .map(|name| LocalObjectReference { name: name.clone() })
                .collect(),
        );
    }
    if pod.node_selector.as_ref().is_none_or(BTreeMap::is_empty)
        && !settings.processor_node_selector.is_empty()
    {
        pod.node_selector = Some(settings.processor_node_selector.clone());
    }
    if pod.tolerations.as_ref().is_none_or(Vec::is_empty)
        && !settings.processor_tolerations.is_empty()
    {
        pod.tolerations = Some(settings.processor_tolerations.clone());
    }
    if pod
        .priority_class_name
        .as_ref()
        .is_none_or(String::is_empty)
        && let Some(p) = settings
            .processor_priority_class_name
            .as_ref()
            .filter(|p| !p.is_empty())
    {
        pod.priority_class_name = Some(p.clone());
    }
}

/// Render the processor Deployment. `replicas` is `None` when someone else
/// (KEDA) owns the replica count; `legacy` names the consumers of the
/// endpoint's legacy stream that still drain it (see
/// [`EndpointNames::legacy_stream`]).
pub fn deployment(
    ep: &WebhookEndpoint,
    names: &EndpointNames,
    t: &Timings,
    settings: &Settings,
    replicas: Option<i32>,
    legacy: &[String],
) -> Result<Deployment, String> {
    let mut config = processor_config(ep, names, t);
    if !legacy.is_empty() {
        config.drain = Some(DrainConfig {
            stream: names.legacy_stream(),
            consumers: legacy.to_vec(),
        });
    }
    workload_deployment(
        &Workload {
            name: ep.name_any(),
            namespace: ep.namespace().unwrap_or_default(),
            owner: owner_ref(ep),
            processor: &ep.spec.processor,
            ordered: ep.spec.ordering.is_some(),
            config,
        },
        settings,
        replicas,
    )
}

/// What a processor Deployment is rendered from: an endpoint's built-in
/// listener or a WebhookListener.
#[derive(Debug)]
pub struct Workload<'a> {
    /// Base of the Deployment's name and instance label (the endpoint's
    /// name, or `<listener>-listener`).
    pub name: String,
    /// Namespace of the Deployment (its owner's).
    pub namespace: String,
    /// The owning resource (garbage-collects the Deployment).
    pub owner: OwnerReference,
    /// Pod template, signing, paused, … of the listener.
    pub processor: &'a ProcessorSpec,
    /// The endpoint is ordered (no surge during rollouts).
    pub ordered: bool,
    /// The processor's configuration.
    pub config: ProcessorConfig,
}

/// The `OTEL_*` variables of a processor pod: none unless the operator was
/// given an OTLP endpoint; then the endpoint, the sampler when set, and
/// resource attributes naming the namespace and Deployment.
fn otel_env(w: &Workload<'_>, settings: &Settings) -> Vec<(&'static str, String)> {
    let endpoint = settings.processor_otlp_endpoint.trim();
    if endpoint.is_empty() {
        return Vec::new();
    }
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_SERVICE_NAME", "spillway-processor".to_owned()),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            format!(
                "k8s.namespace.name={},k8s.deployment.name={}",
                w.namespace,
                deployment_name(&w.name)
            ),
        ),
    ];
    for (name, value) in [
        ("OTEL_TRACES_SAMPLER", &settings.processor_otel_sampler),
        (
            "OTEL_TRACES_SAMPLER_ARG",
            &settings.processor_otel_sampler_arg,
        ),
    ] {
        if !value.trim().is_empty() {
            env.push((name, value.trim().to_owned()));
        }
    }
    env
}

/// Render a processor Deployment for `w`.
pub fn workload_deployment(
    w: &Workload<'_>,
    settings: &Settings,
    replicas: Option<i32>,
) -> Result<Deployment, String> {
    let name = w.name.clone();
    let config_json = serde_json::to_string(&w.config).map_err(|e| e.to_string())?;
    let user = template_of(w.processor)?.unwrap_or_default();

    let mut env = vec![
        EnvVar {
            name: PROCESSOR_CONFIG_ENV.into(),
            value: Some(config_json.clone()),
            ..Default::default()
        },
        EnvVar {
            name: NATS_URL_ENV.into(),
            value: Some(settings.processor_nats_url()),
            ..Default::default()
        },
        EnvVar {
            name: logging::FORMAT_ENV.into(),
            value: Some(settings.processor_log_format.as_str().into()),
            ..Default::default()
        },
        EnvVar {
            name: logging::LEVEL_ENV.into(),
            value: Some(settings.processor_log_level.clone()),
            ..Default::default()
        },
    ];
    env.extend(
        otel_env(w, settings)
            .into_iter()
            .map(|(name, value)| EnvVar {
                name: name.into(),
                value: Some(value),
                ..Default::default()
            }),
    );
    let nats_env = processor_nats_env(settings);
    env.extend(nats_env.iter().map(|(name, value)| EnvVar {
        name: (*name).into(),
        value: Some(value.clone()),
        ..Default::default()
    }));
    env.sort_by(|a, b| a.name.cmp(&b.name));
    let mut mounts = vec![VolumeMount {
        name: "spillway-tmp".into(),
        mount_path: "/tmp".into(),
        ..Default::default()
    }];
    let mut volumes = vec![Volume {
        name: "spillway-tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    if let Some(secret) = &settings.processor_nats_creds_secret {
        mounts.push(VolumeMount {
            name: "spillway-nats-creds".into(),
            mount_path: NATS_CREDS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "spillway-nats-creds".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    // The TLS Secrets are mounted with `optional: false`: when one is
    // missing in the endpoint's namespace the pod stays in ContainerCreating
    // with a FailedMount event naming it, and ProcessorReady stays False.
    let tls_secrets = [
        (
            "spillway-nats-ca",
            NATS_TLS_CA_DIR,
            &settings.processor_nats_tls_ca_secret,
        ),
        (
            "spillway-nats-tls",
            NATS_TLS_CLIENT_DIR,
            &settings.processor_nats_tls_client_secret,
        ),
    ];
    for (volume, dir, secret) in tls_secrets {
        let Some(secret) = secret else { continue };
        mounts.push(VolumeMount {
            name: volume.into(),
            mount_path: dir.into(),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: volume.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                default_mode: Some(0o440),
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(signing) = &w.processor.signing {
        mounts.push(VolumeMount {
            name: "spillway-signing".into(),
            mount_path: SIGNING_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "spillway-signing".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(signing.secret_ref.name.clone()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let ours = Container {
        name: CONTAINER.into(),
        image: Some(settings.processor_image.clone()),
        image_pull_policy: Some(settings.processor_image_pull_policy.clone()),
        env: Some(env),
        resources: Some(resources(settings)),
        security_context: Some(restricted()),
        volume_mounts: Some(mounts),
        ports: Some(vec![ContainerPort {
            name: Some("admin".into()),
            container_port: ADMIN_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        ..Default::default()
    };

    // The user's template is the base; our container, volumes, labels and
    // security defaults are merged in (ours win on name clashes). The
    // platform's defaults for processor pods (operator settings) come
    // under the template: labels and annotations per key, the rest only
    // where the template sets none.
    let mut pod_meta = user.metadata.unwrap_or_default();
    let mut pod_labels = settings.processor_pod_labels.clone();
    pod_labels.extend(pod_meta.labels.take().unwrap_or_default());
    pod_labels.extend(labels(&name));
    pod_meta.labels = Some(pod_labels);
    let mut pod_spec: PodSpec = user.spec.unwrap_or_default();
    apply_pod_defaults(&mut pod_spec, settings);
    let mut containers = vec![ours];
    containers.extend(
        pod_spec
            .containers
            .into_iter()
            .filter(|c| c.name != CONTAINER),
    );
    pod_spec.containers = containers;
    let mut all_volumes = pod_spec.volumes.take().unwrap_or_default();
    all_volumes.retain(|v| !volumes.iter().any(|o| o.name == v.name));
    all_volumes.extend(volumes);
    pod_spec.volumes = Some(all_volumes);
    let mut psc = pod_spec.security_context.take().unwrap_or_default();
    psc.run_as_non_root.get_or_insert(true);
    // Mounted Secrets (mode 0440, root-owned otherwise) must be readable by
    // the image's non-root user (65532, see the Dockerfile); unless the
    // platform assigns the fsGroup itself (`--processor-fs-group none`).
    if let Some(gid) = settings.processor_fs_group.0 {
        psc.fs_group.get_or_insert(gid);
    }
    psc.seccomp_profile.get_or_insert_with(|| SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    });
    pod_spec.security_context = Some(PodSecurityContext { ..psc });
    pod_spec
        .automount_service_account_token
        .get_or_insert(false);

    // The processor's NATS Secrets and files are hashed only when one of
    // them is set, so pods of operators without any keep their hash.
    let mut hashed = format!(
        "{config_json}\n{}\n{:?}",
        settings.processor_image, w.processor.template
    );
    if !nats_env.is_empty() {
        hashed.push_str(&format!(
            "\n{nats_env:?}\n{:?}\n{:?}\n{:?}",
            settings.processor_nats_creds_secret,
            settings.processor_nats_tls_ca_secret,
            settings.processor_nats_tls_client_secret
        ));
    }
    let config_hash = format!("{:016x}", fnv1a64(hashed.as_bytes()));
    let mut annotations = settings.processor_pod_annotations.clone();
    annotations.extend(pod_meta.annotations.take().unwrap_or_default());
    annotations.insert(CONFIG_HASH.into(), config_hash);
    annotations.insert(
        READS_STORED_FORMAT.into(),
        spillway_api::stored::CURRENT.to_string(),
    );
    pod_meta.annotations = Some(annotations);

    let mut d = Deployment {
        metadata: ObjectMeta {
            name: Some(deployment_name(&name)),
            namespace: Some(w.namespace.clone()),
            labels: Some(labels(&name)),
            owner_references: Some(vec![w.owner.clone()]),
            ..Default::default()
        },
        spec: DeploymentSpec {
            replicas,
            selector: LabelSelector {
                match_labels: Some(selector(&name)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(if w.ordered {
                    // Ordered: JetStream caps in-flight per partition, not
                    // in total, so the per-pod shares are the cap: no extra
                    // pod during a rollout.
                    RollingUpdateDeployment {
                        max_surge: Some(IntOrString::Int(0)),
                        max_unavailable: Some(IntOrString::Int(1)),
                    }
                } else {
                    // Unordered: maxAckPending caps the total; roll without
                    // losing capacity.
                    RollingUpdateDeployment {
                        max_surge: Some(IntOrString::String("25%".into())),
                        max_unavailable: Some(IntOrString::Int(0)),
                    }
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(pod_meta),
                spec: Some(pod_spec),
            },
            ..Default::default()
        },
        status: None,
    };
    let render_hash = format!(
        "{:016x}",
        fnv1a64(
            serde_json::to_string(&d)
                .map_err(|e| e.to_string())?
                .as_bytes()
        )
    );
    let autoscaler = if replicas.is_none() {
        "keda"
    } else {
        "builtin"
    };
    d.metadata.annotations = Some(BTreeMap::from([
        (RENDER_HASH.into(), render_hash),
        (AUTOSCALER.into(), autoscaler.into()),
        (
            READS_STORED_FORMAT.into(),
            spillway_api::stored::CURRENT.to_string(),
        ),
    ]));
    Ok(d)
}

/// Whether a Deployment from the cluster was last applied for KEDA.
pub fn scaled_by_keda(d: &Deployment) -> bool {
    d.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(AUTOSCALER))
        .is_some_and(|v| v == "keda")
}

/// Whether `have` (from the cluster) already carries what was rendered.
pub fn up_to_date(have: &Deployment, want: &Deployment) -> bool {
    let annotation = |d: &Deployment, k: &str| {
        d.meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(k).cloned())
    };
    let hash = |d: &Deployment| annotation(d, RENDER_HASH);
    // Replicas are compared too, so a manual scale is put back; with KEDA
    // (`None`) they belong to the HPA.
    hash(have).is_some()
        && hash(have) == hash(want)
        && annotation(have, AUTOSCALER) == annotation(want, AUTOSCALER)
        && (want.spec.replicas.is_none() || have.spec.replicas == want.spec.replicas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_api::duration::GoDuration;
    use spillway_api::validate::check;

    #[test]
    fn pods_never_hold_more_slots_than_the_concurrency() {
        let spec = |c: u32, min: u32, max: u32| -> ProcessorSpec {
            serde_json::from_value(serde_json::json!({
                "sink": {"url": "http://s/"}, "concurrency": c,
                "replicas": {"min": min, "max": max}
            }))
            .unwrap()
        };
        for (c, min, max) in [
            (1, 1, 3),
            (2, 0, 3),
            (2, 3, 3),
            (5, 1, 3),
            (10, 1, 3),
            (7, 2, 7),
        ] {
            let p = spec(c, min, max);
            let (lo, hi) = replica_bounds(&p);
            assert!(
                lo <= hi && hi <= max && hi <= c,
                "{c} {min} {max}: {lo} {hi}"
            );
            assert!(hi * per_replica(&p) <= c, "{c} {min} {max}");
            assert!(per_replica(&p) >= 1);
        }
        assert_eq!(replica_bounds(&spec(2, 0, 3)), (0, 2));
        assert_eq!(replica_bounds(&spec(2, 3, 3)), (2, 2));
        assert_eq!(per_replica(&spec(10, 1, 3)), 3);
    }

    fn endpoint(yaml: &str) -> WebhookEndpoint {
        let mut ep: WebhookEndpoint = serde_saphyr::from_str(yaml).unwrap();
        ep.metadata.uid = Some("uid-1".into());
        ep
    }

    const EP: &str = r#"
apiVersion: spillway.dev/v1alpha1
kind: WebhookEndpoint
metadata: {name: gh, namespace: team}
spec:
  verification: {scheme: github, secretRefs: [{name: gh, key: secret}]}
  processor:
    sink: {service: {name: app, port: 8080, path: /hooks}}
    concurrency: 10
    replicas: {min: 0, max: 4}
    signing: {secretRef: {name: sign, key: key}}
    template:
      metadata: {labels: {team: a}}
      spec:
        containers: [{name: handler, image: "example/handler:1"}]
"#;

    /// The pod template's config hash annotation.
    fn hash(d: &Deployment) -> String {
        d.spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[CONFIG_HASH]
            .clone()
    }

    fn render(ep: &WebhookEndpoint, replicas: Option<i32>) -> Deployment {
        let names = EndpointNames::new("team", "gh");
        let t = check(&ep.spec).unwrap();
        let mut s = Settings::defaults();
        s.processor_image = "proc:1".into();
        deployment(ep, &names, &t, &s, replicas, &[]).unwrap()
    }

    #[test]
    fn config_points_at_service_and_signing_file() {
        let ep = endpoint(EP);
        let t = check(&ep.spec).unwrap();
        let c = processor_config(&ep, &EndpointNames::new("team", "gh"), &t);
        assert_eq!(c.sink_url, "http://app.team.svc:8080/hooks");
        assert_eq!(c.endpoint, "team/gh");
        assert_eq!(c.consumers, vec!["processor".to_owned()]);
        // Unordered: any pod may use the whole cap (JetStream holds the
        // total to it), not a floor(10/4) = 2 share.
        assert_eq!(c.concurrency_per_replica, 10);
        assert_eq!(c.max_replicas, 4);
        let r = c.retry.expect("unordered endpoints park their retries");
        assert_eq!(r.stream, "spillway-retry_team_gh");
        assert_eq!(c.expire_after, Some(GoDuration::from_secs(72 * 3600)));
        assert_eq!(r.consumer, "retry-processor");
        assert_eq!(r.due_subject, "spillway.due.team.gh.processor");
        // Ordered: the per-pod share, and retries wait on the partition.
        let mut ordered = ep.clone();
        ordered.spec.ordering = serde_saphyr::from_str("{partitions: 4}").unwrap();
        let c = processor_config(&ordered, &EndpointNames::new("team", "gh"), &t);
        assert_eq!(c.concurrency_per_replica, 2);
        assert!(c.retry.is_none());
        assert_eq!(
            c.signing_secret_file.as_deref(),
            Some("/var/run/spillway/signing/key")
        );
        assert_eq!(c.timeout.to_string(), "30s");
    }

    #[test]
    fn deployment_merges_user_template_and_is_restricted() {
        let ep = endpoint(EP);
        let d = render(&ep, Some(2));
        assert_eq!(d.metadata.name.as_deref(), Some("gh-processor"));
        assert_eq!(
            d.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        let spec = &d.spec;
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.as_ref().unwrap();
        let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["processor", "handler"]);
        let ours = &pod.containers[0];
        assert_eq!(ours.image.as_deref(), Some("proc:1"));
        let sc = ours.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
            &["ALL"]
        );
        let env = ours.env.as_ref().unwrap();
        let cfg = env.iter().find(|e| e.name == PROCESSOR_CONFIG_ENV).unwrap();
        let parsed: ProcessorConfig = serde_json::from_str(cfg.value.as_ref().unwrap()).unwrap();
        assert_eq!(parsed.stream, "spillway-work_team_gh");
        let meta = spec.template.metadata.as_ref().unwrap();
        assert_eq!(meta.labels.as_ref().unwrap()["team"], "a");
        assert_eq!(
            meta.labels.as_ref().unwrap()["app.kubernetes.io/instance"],
            "gh"
        );
        assert!(meta.annotations.as_ref().unwrap().contains_key(CONFIG_HASH));
        assert!(
            pod.volumes
                .as_ref()
                .unwrap()
                .iter()
                .any(|v| v.name == "spillway-signing")
        );
        assert_eq!(
            pod.security_context
                .as_ref()
                .unwrap()
                .seccomp_profile
                .as_ref()
                .unwrap()
                .type_,
            "RuntimeDefault"
        );
        // The signing Secret (mode 0440) is readable by the image's user.
        assert_eq!(
            pod.security_context.as_ref().unwrap().fs_group,
            Some(PROCESSOR_GID)
        );
    }

    #[test]
    fn config_change_changes_pod_hash_but_replicas_do_not() {
        let ep = endpoint(EP);
        let a = render(&ep, Some(1));
        let b = render(&ep, Some(3));
        assert_eq!(hash(&a), hash(&b));
        assert!(!up_to_date(&a, &b), "replica change must be written");
        assert!(up_to_date(&a, &render(&ep, Some(1))));
        let mut scaled_by_hand = a.clone();
        scaled_by_hand.spec.replicas = Some(5);
        assert!(
            !up_to_date(&scaled_by_hand, &a),
            "manual scaling is reverted"
        );
        let keda = render(&ep, None);
        let mut by_hpa = keda.clone();
        by_hpa.spec.replicas = Some(4);
        assert!(
            up_to_date(&by_hpa, &keda),
            "the HPA owns replicas under KEDA"
        );
        let mut ep2 = ep.clone();
        ep2.spec.processor.concurrency = 20;
        assert_ne!(hash(&a), hash(&render(&ep2, Some(1))));
    }

    #[test]
    fn processor_nats_credentials_are_mounted_when_configured() {
        let ep = endpoint(EP);
        let names = EndpointNames::new("team", "gh");
        let t = check(&ep.spec).unwrap();
        let mut s = Settings::defaults();
        let plain = deployment(&ep, &names, &t, &s, Some(1), &[]).unwrap();
        let env_of = |d: &Deployment| {
            d.spec.template.spec.as_ref().unwrap().containers[0]
                .env
                .clone()
                .unwrap()
        };
        assert!(!env_of(&plain).iter().any(|e| e.name == NATS_CREDS_ENV));
        s.processor_nats_creds_secret = Some("nats-creds".into());
        let d = deployment(&ep, &names, &t, &s, Some(1), &[]).unwrap();
        let creds = env_of(&d)
            .into_iter()
            .find(|e| e.name == NATS_CREDS_ENV)
            .unwrap();
        assert_eq!(
            creds.value.as_deref(),
            Some("/var/run/spillway/nats/nats.creds")
        );
        let vols = d
            .spec
            .template
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .clone()
            .unwrap();
        let v = vols
            .iter()
            .find(|v| v.name == "spillway-nats-creds")
            .unwrap();
        assert_eq!(
            v.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("nats-creds")
        );
    }

    #[test]
    fn processor_nats_tls_is_mounted_when_configured() {
        let ep = endpoint(EP);
        let names = EndpointNames::new("team", "gh");
        let t = check(&ep.spec).unwrap();
        let render = |s: &Settings| deployment(&ep, &names, &t, s, Some(1), &[]).unwrap();
        let pod = |d: &Deployment| d.spec.template.spec.clone().unwrap();
        let env = |d: &Deployment| -> BTreeMap<String, String> {
            pod(d).containers[0]
                .env
                .clone()
                .unwrap()
                .into_iter()
                .map(|e| (e.name, e.value.unwrap_or_default()))
                .collect()
        };
        let tls_envs = [
            NATS_TLS_CA_ENV,
            NATS_TLS_CERT_ENV,
            NATS_TLS_KEY_ENV,
            NATS_TLS_REQUIRED_ENV,
        ];
        let tls_volumes = ["spillway-nats-ca", "spillway-nats-tls"];

        let mut s = Settings::defaults();
        let plain = render(&s);
        for name in tls_envs {
            assert!(!env(&plain).contains_key(name), "{name} without settings");
        }
        // The processor logs as the operator was told processors log.
        assert_eq!(env(&plain)[logging::FORMAT_ENV], "json");
        assert_eq!(env(&plain)[logging::LEVEL_ENV], "info");
        let mut text = Settings::defaults();
        text.processor_log_format = logging::LogFormat::Text;
        text.processor_log_level = "debug,async_nats=warn".into();
        assert_eq!(env(&render(&text))[logging::FORMAT_ENV], "text");
        assert_eq!(
            env(&render(&text))[logging::LEVEL_ENV],
            "debug,async_nats=warn"
        );
        // No OTEL_* unless the operator was given an OTLP endpoint.
        assert!(env(&plain).keys().all(|k| !k.starts_with("OTEL_")));
        let mut traced = Settings::defaults();
        traced.processor_otlp_endpoint = "http://collector.obs:4318".into();
        traced.processor_otel_sampler = "parentbased_traceidratio".into();
        traced.processor_otel_sampler_arg = "0.25".into();
        let e = env(&render(&traced));
        assert_eq!(
            e["OTEL_EXPORTER_OTLP_ENDPOINT"],
            "http://collector.obs:4318"
        );
        assert_eq!(e["OTEL_SERVICE_NAME"], "spillway-processor");
        assert_eq!(e["OTEL_TRACES_SAMPLER"], "parentbased_traceidratio");
        assert_eq!(e["OTEL_TRACES_SAMPLER_ARG"], "0.25");
        assert!(
            e["OTEL_RESOURCE_ATTRIBUTES"].starts_with("k8s.namespace.name="),
            "{e:?}"
        );
        let plain_pod = pod(&plain);
        for name in tls_volumes {
            assert!(
                !plain_pod
                    .volumes
                    .as_ref()
                    .unwrap()
                    .iter()
                    .any(|v| v.name == name)
            );
            assert!(
                !plain_pod.containers[0]
                    .volume_mounts
                    .as_ref()
                    .unwrap()
                    .iter()
                    .any(|m| m.name == name)
            );
        }

        s.processor_nats_tls_ca_secret = Some("nats-ca".into());
        s.processor_nats_tls_ca_key = "bundle.pem".into();
        s.processor_nats_tls_client_secret = Some("nats-client".into());
        s.processor_nats_tls_required = Some(true);
        let d = render(&s);
        let e = env(&d);
        assert_eq!(e[NATS_TLS_CA_ENV], "/var/run/spillway/nats-ca/bundle.pem");
        assert_eq!(e[NATS_TLS_CERT_ENV], "/var/run/spillway/nats-tls/tls.crt");
        assert_eq!(e[NATS_TLS_KEY_ENV], "/var/run/spillway/nats-tls/tls.key");
        assert_eq!(e[NATS_TLS_REQUIRED_ENV], "true");
        assert!(!e.contains_key(NATS_CREDS_ENV));
        let p = pod(&d);
        for (volume, secret, dir) in [
            ("spillway-nats-ca", "nats-ca", NATS_TLS_CA_DIR),
            ("spillway-nats-tls", "nats-client", NATS_TLS_CLIENT_DIR),
        ] {
            let v = p
                .volumes
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.name == volume)
                .unwrap();
            let src = v.secret.as_ref().unwrap();
            assert_eq!(src.secret_name.as_deref(), Some(secret));
            assert_eq!(src.optional, Some(false));
            let m = p.containers[0]
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .find(|m| m.name == volume)
                .unwrap();
            assert_eq!(m.mount_path, dir);
            assert_eq!(m.read_only, Some(true));
        }
        // The user's containers get none of it.
        assert!(p.containers[1].volume_mounts.is_none());

        // Any change rolls the pods.
        assert_ne!(hash(&plain), hash(&d));
        let mut other = s.clone();
        other.processor_nats_tls_client_secret = Some("nats-client-2".into());
        assert_ne!(hash(&d), hash(&render(&other)));
        let mut other = s.clone();
        other.processor_nats_tls_ca_key = "ca.crt".into();
        assert_ne!(hash(&d), hash(&render(&other)));
        let mut other = s.clone();
        other.processor_nats_tls_required = Some(false);
        let relaxed = render(&other);
        assert!(!env(&relaxed).contains_key(NATS_TLS_REQUIRED_ENV));
        assert_ne!(hash(&d), hash(&relaxed));

        // Unset, "required" follows the operator's own setting.
        let mut s = Settings::defaults();
        s.nats.tls_required = Some(true);
        assert_eq!(env(&render(&s))[NATS_TLS_REQUIRED_ENV], "true");
    }

    /// The platform's processor pod defaults (operator settings) fill in
    /// what the endpoint's template leaves out, never override it, and
    /// never override the operator's own labels.
    #[test]
    fn processor_pod_defaults_fill_what_the_template_leaves_out() {
        use clap::Parser;
        use serde_json::json;
        let platform = |s: &mut Settings| {
            s.processor_image_pull_secrets = vec!["regcred".into()];
            s.processor_pod_labels = BTreeMap::from([
                ("team".into(), "platform".into()),
                ("cost-center".into(), "42".into()),
                ("app.kubernetes.io/name".into(), "mine".into()),
            ]);
            s.processor_pod_annotations =
                BTreeMap::from([("example.com/owner".into(), "platform".into())]);
            s.processor_node_selector = BTreeMap::from([("pool".into(), "hooks".into())]);
            s.processor_tolerations = serde_json::from_value(json!([
                {"key": "dedicated", "operator": "Equal", "value": "hooks", "effect": "NoSchedule"}
            ]))
            .unwrap();
            s.processor_priority_class_name = Some("hooks".into());
        };
        let own_template = json!({
            "metadata": {"labels": {"team": "a"}, "annotations": {"example.com/owner": "team-a"}},
            "spec": {
                "containers": [{"name": "handler", "image": "example/handler:1"}],
                "imagePullSecrets": [{"name": "team-a-registry"}],
                "nodeSelector": {"pool": "team-a"},
                "tolerations": [{"key": "team-a", "operator": "Exists"}],
                "priorityClassName": "team-a",
                "securityContext": {"fsGroup": 1000}
            }
        });
        // (case, platform settings, fsGroup setting, endpoint template,
        //  expected pod fields, labels and annotations as JSON)
        type Setup = fn(&mut Settings);
        let none: Setup = |_| {};
        let cases: Vec<(
            &str,
            Setup,
            &str,
            Option<serde_json::Value>,
            serde_json::Value,
        )> = vec![
            (
                "no defaults: nothing added",
                none,
                "65532",
                None,
                json!({"imagePullSecrets": null, "nodeSelector": null, "tolerations": null,
                       "priorityClassName": null, "fsGroup": 65532,
                       "team": null, "owner": null, "name": "spillway-processor"}),
            ),
            (
                "defaults fill an empty template",
                platform,
                "65532",
                None,
                json!({"imagePullSecrets": [{"name": "regcred"}], "nodeSelector": {"pool": "hooks"},
                       "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "hooks", "effect": "NoSchedule"}],
                       "priorityClassName": "hooks", "fsGroup": 65532,
                       "team": "platform", "owner": "platform", "name": "spillway-processor"}),
            ),
            (
                "the template wins",
                platform,
                "65532",
                Some(own_template.clone()),
                json!({"imagePullSecrets": [{"name": "team-a-registry"}], "nodeSelector": {"pool": "team-a"},
                       "tolerations": [{"key": "team-a", "operator": "Exists"}],
                       "priorityClassName": "team-a", "fsGroup": 1000,
                       "team": "a", "owner": "team-a", "name": "spillway-processor"}),
            ),
            (
                "platform assigns fsGroup",
                none,
                "none",
                None,
                json!({"imagePullSecrets": null, "nodeSelector": null, "tolerations": null,
                       "priorityClassName": null, "fsGroup": null,
                       "team": null, "owner": null, "name": "spillway-processor"}),
            ),
            (
                "platform assigns fsGroup, the template still sets one",
                none,
                "none",
                Some(own_template),
                json!({"imagePullSecrets": [{"name": "team-a-registry"}], "nodeSelector": {"pool": "team-a"},
                       "tolerations": [{"key": "team-a", "operator": "Exists"}],
                       "priorityClassName": "team-a", "fsGroup": 1000,
                       "team": "a", "owner": "team-a", "name": "spillway-processor"}),
            ),
        ];
        let names = EndpointNames::new("team", "gh");
        let mut plain_hash = None;
        for (case, setup, fs_group, template, want) in cases {
            let mut ep = endpoint(EP);
            ep.spec.processor.template = template;
            let t = check(&ep.spec).unwrap();
            let mut s = Settings::parse_from(["x", "--processor-fs-group", fs_group]);
            setup(&mut s);
            let d = deployment(&ep, &names, &t, &s, Some(1), &[]).unwrap();
            let pod = serde_json::to_value(d.spec.template.spec.as_ref().unwrap()).unwrap();
            let meta = d.spec.template.metadata.as_ref().unwrap();
            let label = |k: &str| meta.labels.as_ref().unwrap().get(k).cloned();
            let got = json!({
                "imagePullSecrets": pod["imagePullSecrets"],
                "nodeSelector": pod["nodeSelector"],
                "tolerations": pod["tolerations"],
                "priorityClassName": pod["priorityClassName"],
                "fsGroup": pod["securityContext"]["fsGroup"],
                "team": label("team"),
                "owner": meta.annotations.as_ref().unwrap().get("example.com/owner"),
                "name": label("app.kubernetes.io/name"),
            });
            assert_eq!(got, want, "{case}");
            // The selector's labels are the operator's whatever the defaults.
            assert_eq!(
                d.spec.selector.match_labels.as_ref().unwrap()["app.kubernetes.io/name"],
                "spillway-processor",
                "{case}"
            );
            assert!(
                meta.annotations.as_ref().unwrap().contains_key(CONFIG_HASH),
                "{case}"
            );
            if case == "no defaults: nothing added" {
                plain_hash = d
                    .metadata
                    .annotations
                    .as_ref()
                    .unwrap()
                    .get(RENDER_HASH)
                    .cloned();
            } else if case == "defaults fill an empty template" {
                // Setting defaults rewrites (and so rolls) the Deployment.
                assert_ne!(
                    d.metadata.annotations.as_ref().unwrap().get(RENDER_HASH),
                    plain_hash.as_ref(),
                );
            }
        }
    }

    #[test]
    fn long_names_are_shortened_stably() {
        let long = "a".repeat(200);
        let n = deployment_name(&long);
        assert!(n.len() <= 63, "{n}");
        assert_eq!(n, deployment_name(&long));
        assert_ne!(n, deployment_name(&format!("{long}b")));
        assert_eq!(short("abc", 63), "abc");
    }
}
