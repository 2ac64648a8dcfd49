//! `--port-forward`: reach NATS through the Kubernetes API, as the chart
//! was told to reach it, without a NATS URL or credentials on the
//! workstation.
//!
//! 1. Find the installation: the operator Deployment the chart made
//!    (`app.kubernetes.io/name=spillway`, `component=operator`).
//! 2. Read what the chart told it: `SPILLWAY_NATS_URL` and the
//!    credentials and TLS files, which are keys of mounted Secrets; read
//!    those Secrets (when RBAC allows; otherwise say so and go on).
//! 3. Resolve the URL's Service to a ready pod through its EndpointSlices
//!    (the pod list by the Service's selector when there are none).
//! 4. Listen on 127.0.0.1 (an ephemeral port) and open one port-forward to
//!    that pod per connection; NATS connects there, checking TLS
//!    certificates against the Service's name, not 127.0.0.1.
//!
//! What the user needs: get/list deployments in the installation's
//! namespace, get secrets (for the credentials), get services, list
//! endpointslices (or pods) and create pods/portforward in NATS' namespace.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};

/// Labels of the chart's operator Deployment.
pub const OPERATOR_SELECTOR: &str =
    "app.kubernetes.io/name=spillway,app.kubernetes.io/component=operator";

/// One key of a Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretKey {
    /// Secret name (in the installation's namespace).
    pub name: String,
    /// Key.
    pub key: String,
}

/// What an installation's operator was told about NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installation {
    /// Namespace of the operator (and of the Secrets below).
    pub namespace: String,
    /// The operator Deployment's name.
    pub deployment: String,
    /// `SPILLWAY_NATS_URL` (possibly several, comma-separated).
    pub url: String,
    /// The credentials (`.creds`) file's Secret key.
    pub creds: Option<SecretKey>,
    /// The CA file's Secret key.
    pub tls_ca: Option<SecretKey>,
    /// The client certificate's and key's Secret keys.
    pub tls_client: Option<(SecretKey, SecretKey)>,
    /// TLS is required.
    pub tls_required: bool,
}

/// Read an operator Deployment of the chart: its NATS URL and which Secret
/// key each NATS file is (a file path in the environment, under a mount of
/// a Secret volume).
pub fn installation(d: &Deployment) -> Result<Installation, String> {
    let name = d.metadata.name.clone().unwrap_or_default();
    let namespace = d.metadata.namespace.clone().unwrap_or_default();
    let pod = d
        .spec
        .template
        .spec
        .as_ref()
        .ok_or_else(|| format!("deployment {namespace}/{name} has no pod template"))?;
    let c = pod
        .containers
        .iter()
        .find(|c| c.name == "operator")
        .or_else(|| pod.containers.first())
        .ok_or_else(|| format!("deployment {namespace}/{name} has no container"))?;
    let var = |n: &str| -> Option<String> {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == n)
            .and_then(|e| e.value.clone())
            .filter(|v| !v.trim().is_empty())
    };
    let url = var(spillway_api::nats::env::URL).ok_or_else(|| {
        format!(
            "deployment {namespace}/{name} sets no {}",
            spillway_api::nats::env::URL
        )
    })?;
    // A file path → the Secret volume mounted above it and the key below.
    let secret_key = |env: &str| -> Result<Option<SecretKey>, String> {
        let Some(path) = var(env) else {
            return Ok(None);
        };
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| {
                path.strip_prefix(m.mount_path.trim_end_matches('/'))
                    .is_some_and(|rest| rest.starts_with('/'))
            })
            .max_by_key(|m| m.mount_path.len())
            .ok_or_else(|| format!("{env}={path} is not under a mounted volume"))?;
        let key = path[mount.mount_path.trim_end_matches('/').len() + 1..].to_owned();
        let secret = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .and_then(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.clone())
            .ok_or_else(|| format!("{env}: volume {} is not a Secret", mount.name))?;
        Ok(Some(SecretKey { name: secret, key }))
    };
    use spillway_api::nats::env;
    let tls_client = match (
        secret_key(env::TLS_CERT_FILE)?,
        secret_key(env::TLS_KEY_FILE)?,
    ) {
        (Some(c), Some(k)) => Some((c, k)),
        _ => None,
    };
    Ok(Installation {
        namespace,
        deployment: name,
        url,
        creds: secret_key(env::CREDS_FILE)?,
        tls_ca: secret_key(env::TLS_CA_FILE)?,
        tls_client,
        tls_required: var(env::TLS_REQUIRED).is_some_and(|v| v == "true"),
    })
}

/// Find the installation: in `namespace` when given, else in every
/// namespace the user may list (then exactly one must exist).
pub async fn find_installation(
    client: &kube::Client,
    namespace: Option<&str>,
) -> Result<Installation> {
    let api: Api<Deployment> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let found = api
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await
        .with_context(|| {
            format!(
                "listing Spillway operator Deployments ({OPERATOR_SELECTOR}) in {}",
                namespace.map_or("all namespaces".to_owned(), |n| format!("namespace {n}"))
            )
        })?
        .items;
    match found.as_slice() {
        [] => bail!(
            "no Spillway installation found ({OPERATOR_SELECTOR} in {}); pass --spillway-namespace, or --nats-url",
            namespace.map_or("any namespace".to_owned(), |n| format!("namespace {n}"))
        ),
        [one] => installation(one).map_err(anyhow::Error::msg),
        many => bail!(
            "{} Spillway installations found ({}); pass --spillway-namespace",
            many.len(),
            many.iter()
                .map(|d| format!(
                    "{}/{}",
                    d.metadata.namespace.as_deref().unwrap_or_default(),
                    d.metadata.name.as_deref().unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The Service a NATS URL names: `(namespace, name, port)`. Host forms:
/// `name`, `name.namespace`, `name.namespace.svc`,
/// `name.namespace.svc.<cluster domain>`; a bare name is in
/// `default_namespace` (the installation's). The first of several URLs is
/// used. An IP address or outside name is not a Service.
pub fn service_of(url: &str, default_namespace: &str) -> Result<(String, String, u16), String> {
    let first = url.split(',').next().unwrap_or_default().trim();
    let rest = first.split_once("://").map_or(first, |(_, r)| r);
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = hostport.split('/').next().unwrap_or_default();
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("NATS URL {first}: bad port {p:?}"))?,
        ),
        None => (hostport, 4222),
    };
    if host.is_empty() || host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return Err(format!(
            "NATS URL {first}: {host:?} is not a Kubernetes Service name; pass --nats-url instead"
        ));
    }
    let labels: Vec<&str> = host.split('.').collect();
    match labels.as_slice() {
        [name] => Ok((default_namespace.to_owned(), (*name).to_owned(), port)),
        [name, ns] | [name, ns, "svc"] => Ok(((*ns).to_owned(), (*name).to_owned(), port)),
        [name, ns, "svc", ..] => Ok(((*ns).to_owned(), (*name).to_owned(), port)),
        _ => Err(format!(
            "NATS URL {first}: {host} is not a Service name (name.namespace.svc); pass --nats-url instead"
        )),
    }
}

/// A ready pod behind the Service port: from its EndpointSlices, the
/// first ready endpoint backed by a Pod, and the slice's port of the same
/// name as the Service port.
pub fn pick_from_slices(slices: &[EndpointSlice], port: &ServicePort) -> Option<(String, u16)> {
    for s in slices {
        let Some(p) = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name == port.name || (s.ports.as_ref().is_some_and(|v| v.len() == 1)))
            .and_then(|p| p.port)
        else {
            continue;
        };
        for e in s.endpoints.iter().flatten() {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let terminating = e
                .conditions
                .as_ref()
                .and_then(|c| c.terminating)
                .unwrap_or(false);
            if let Some(r) = &e.target_ref
                && r.kind.as_deref() == Some("Pod")
                && ready
                && !terminating
                && let Some(name) = &r.name
                && let Ok(p) = u16::try_from(p)
            {
                return Some((name.clone(), p));
            }
        }
    }
    None
}

/// A ready pod from a list (the Service's selector), with the container
/// port the Service port targets.
pub fn pick_from_pods(pods: &[Pod], port: &ServicePort) -> Option<(String, u16)> {
    for pod in pods {
        let status = pod.status.as_ref();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !running || !ready || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let target = match &port.target_port {
            None => u16::try_from(port.port).ok(),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            Some(IntOrString::String(name)) => pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        };
        if let (Some(name), Some(p)) = (&pod.metadata.name, target) {
            return Some((name.clone(), p));
        }
    }
    None
}

/// The pod and container port behind `namespace/service:port`.
pub async fn resolve_pod(
    client: &kube::Client,
    namespace: &str,
    service: &str,
    port: u16,
) -> Result<(String, u16)> {
    let svc = Api::<Service>::namespaced(client.clone(), namespace)
        .get(service)
        .await
        .with_context(|| format!("reading Service {namespace}/{service}"))?;
    let spec = svc.spec.unwrap_or_default();
    let sport = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == i32::from(port))
        .cloned()
        .with_context(|| format!("Service {namespace}/{service} has no port {port}"))?;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    if let Some(found) = pick_from_slices(&slices, &sport) {
        return Ok(found);
    }
    let selector = spec.selector.unwrap_or_default();
    if selector.is_empty() {
        bail!("Service {namespace}/{service} has no ready endpoint and no selector");
    }
    let labels = selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&labels))
        .await
        .with_context(|| format!("listing the pods of Service {namespace}/{service}"))?
        .items;
    pick_from_pods(&pods, &sport)
        .with_context(|| format!("Service {namespace}/{service} has no ready pod"))
}

/// Forward 127.0.0.1:<ephemeral> to `pod:port`, one port-forward per
/// connection. The first port-forward is opened before returning, so an
/// unreachable pod (or missing RBAC) is an error here, not a NATS timeout.
pub async fn forward(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    port: u16,
) -> Result<SocketAddr> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let first = pods
        .portforward(pod, &[port])
        .await
        .with_context(|| format!("port-forward to pod {namespace}/{pod} port {port}"))?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("listening on 127.0.0.1")?;
    let local = listener.local_addr()?;
    let (pod, mut first) = (Arc::new(pod.to_owned()), Some(first));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let pf = match first.take() {
                Some(pf) => Ok(pf),
                None => pods.portforward(&pod, &[port]).await,
            };
            tokio::spawn(async move {
                let mut pf = match pf {
                    Ok(pf) => pf,
                    Err(e) => {
                        eprintln!("spillway: port-forward failed: {e}");
                        return;
                    }
                };
                if let Some(mut upstream) = pf.take_stream(port) {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                }
                let _ = pf.join().await;
            });
        }
    });
    Ok(local)
}

/// One key of a Secret in `namespace`, as bytes.
pub async fn secret_value(
    client: &kube::Client,
    namespace: &str,
    k: &SecretKey,
) -> Result<Vec<u8>> {
    let s = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(&k.name)
        .await
        .with_context(|| format!("reading Secret {namespace}/{}", k.name))?;
    s.data
        .and_then(|d| d.get(&k.key).map(|v| v.0.clone()))
        .with_context(|| format!("Secret {namespace}/{} has no key {}", k.name, k.key))
}

/// TLS for a connection to 127.0.0.1 that checks the server's certificate
/// against `host` (the Service's name in the NATS URL).
pub fn tls_config(
    host: &str,
    ca_pem: Option<&[u8]>,
    client: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = ca_pem.context(
        "NATS uses TLS: port forwarding needs the CA (the chart's nats.tls.caSecretName, or --nats-tls-ca-file)",
    )?;
    for c in CertificateDer::pem_slice_iter(ca) {
        roots
            .add(c.map_err(|_| anyhow::anyhow!("the NATS CA is not valid PEM"))?)
            .context("adding the NATS CA")?;
    }
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("building the certificate verifier")?;
    let host = ServerName::try_from(host.to_owned())
        .map_err(|_| anyhow::anyhow!("{host} is not a TLS server name"))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ForHost { inner, host }));
    Ok(match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| anyhow::anyhow!("the NATS client certificate is not valid PEM"))?,
                PrivateKeyDer::from_pem_slice(key)
                    .map_err(|_| anyhow::anyhow!("the NATS client key is not valid PEM"))?,
            )
            .context("the NATS client certificate and key")?,
        None => builder.with_no_client_auth(),
    })
}

/// Full WebPKI verification, against the Service's name instead of the
/// address connected to (127.0.0.1).
#[derive(Debug)]
struct ForHost {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    host: rustls::pki_types::ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for ForHost {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.host, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::{
        Endpoint, EndpointConditions, EndpointPort as SlicePort,
    };

    #[test]
    fn service_names_in_nats_urls() {
        for (url, want) in [
            ("nats://nats.nats.svc:4222", Ok(("nats", "nats", 4222))),
            (
                "nats://nats.nats.svc.cluster.local:4223",
                Ok(("nats", "nats", 4223)),
            ),
            ("nats://nats:4222", Ok(("spillway", "nats", 4222))),
            ("nats", Ok(("spillway", "nats", 4222))),
            ("nats://nats.msg", Ok(("msg", "nats", 4222))),
            ("tls://u:p@nats.msg.svc:4222", Ok(("msg", "nats", 4222))),
            (
                "nats://a.x.svc:4222,nats://b.x.svc:4222",
                Ok(("x", "a", 4222)),
            ),
            ("nats://10.0.0.7:4222", Err("not a Kubernetes Service")),
            ("nats://nats.example.com:4222", Err("not a Service name")),
            ("nats://nats.nats.svc:http", Err("bad port")),
        ] {
            let got = service_of(url, "spillway");
            match (got, want) {
                (Ok(g), Ok((ns, n, p))) => assert_eq!(g, (ns.into(), n.into(), p), "{url}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{url}: {e}"),
                (g, w) => panic!("{url}: {g:?} vs {w:?}"),
            }
        }
    }

    fn slice(
        port_name: Option<&str>,
        port: i32,
        eps: &[(&str, Option<bool>, bool)],
    ) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            ports: Some(vec![SlicePort {
                name: port_name.map(Into::into),
                port: Some(port),
                ..Default::default()
            }]),
            endpoints: Some(
                eps.iter()
                    .map(|(pod, ready, terminating)| Endpoint {
                        addresses: vec!["10.0.0.1".into()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            terminating: Some(*terminating),
                            ..Default::default()
                        }),
                        target_ref: Some(ObjectReference {
                            kind: Some("Pod".into()),
                            name: Some((*pod).into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn a_ready_pod_is_picked_from_the_slices() {
        let sport = ServicePort {
            name: Some("nats".into()),
            port: 4222,
            ..Default::default()
        };
        let s = slice(
            Some("nats"),
            4322,
            &[
                ("nats-0", Some(false), false),
                ("nats-1", Some(true), true),
                ("nats-2", Some(true), false),
            ],
        );
        assert_eq!(
            pick_from_slices(&[s], &sport),
            Some(("nats-2".into(), 4322))
        );
        let none = slice(Some("nats"), 4222, &[("nats-0", Some(false), false)]);
        assert_eq!(pick_from_slices(&[none], &sport), None);
    }

    #[test]
    fn the_operator_deployment_tells_url_and_secret_keys() {
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "spw-operator", "namespace": "spillway"},
            "spec": {"selector": {}, "template": {"spec": {
                "containers": [{"name": "operator",
                    "env": [
                        {"name": "SPILLWAY_NATS_URL", "value": "nats://nats.nats.svc:4222"},
                        {"name": "SPILLWAY_NATS_CREDS_FILE", "value": "/etc/spillway/nats/creds/operator.creds"},
                        {"name": "SPILLWAY_NATS_TLS_CA_FILE", "value": "/etc/spillway/nats/ca/ca.crt"},
                        {"name": "SPILLWAY_NATS_TLS_REQUIRED", "value": "true"}],
                    "volumeMounts": [
                        {"name": "nats-creds", "mountPath": "/etc/spillway/nats/creds"},
                        {"name": "nats-ca", "mountPath": "/etc/spillway/nats/ca/"}]}],
                "volumes": [
                    {"name": "nats-creds", "secret": {"secretName": "nats-operator"}},
                    {"name": "nats-ca", "secret": {"secretName": "nats-ca"}}]}}}
        }))
        .unwrap();
        let i = installation(&d).unwrap();
        assert_eq!(i.url, "nats://nats.nats.svc:4222");
        assert_eq!(
            i.creds,
            Some(SecretKey {
                name: "nats-operator".into(),
                key: "operator.creds".into()
            })
        );
        assert_eq!(
            i.tls_ca,
            Some(SecretKey {
                name: "nats-ca".into(),
                key: "ca.crt".into()
            })
        );
        assert!(i.tls_required);
        assert_eq!(i.tls_client, None);
    }
}
