//! Where endpoints and secrets come from: Kubernetes (reflectors over
//! WebhookEndpoints and one narrow watch per referenced Secret) or, for local
//! use, a YAML file of WebhookEndpoint (and Secret) manifests plus secret
//! files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;
use spillway_api::{SecretKeyRef, WebhookEndpoint, WebhookEndpointSpec};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::route::{EndpointDef, Router};

/// Loading endpoints failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The endpoints file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A document in the endpoints file is not valid.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong (never secret values).
        message: String,
    },
}

/// Secret values: `(namespace, secret name)` → key → bytes.
type SecretData = HashMap<(String, String), BTreeMap<String, Vec<u8>>>;

fn lookup(data: &SecretData, namespace: &str, r: &SecretKeyRef) -> Option<Vec<u8>> {
    data.get(&(namespace.to_owned(), r.name.clone()))?
        .get(&r.key)
        .cloned()
}

fn referenced(spec: &WebhookEndpointSpec) -> impl Iterator<Item = &SecretKeyRef> {
    spec.gateway_secret_refs()
}

// ---------------------------------------------------------------- file mode

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    kind: String,
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: Option<serde_json::Value>,
    // Secret contents are taken as any YAML and checked by hand, so that no
    // error message (serde's quote the offending value) shows a secret.
    #[serde(default)]
    data: Option<serde_json::Value>,
    #[serde(default)]
    string_data: Option<serde_json::Value>,
}

/// The `field` (`data` or `stringData`) of Secret `secret` as key → text.
/// Errors name the Secret, the field and the key, never a value.
fn secret_strings(
    secret: &str,
    field: &str,
    value: Option<serde_json::Value>,
) -> Result<Vec<(String, String)>, String> {
    use serde_json::Value;
    let map = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(format!(
                "Secret {secret}: {field} must be a map of keys to strings"
            ));
        }
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(v) => Ok((k, v)),
            _ => Err(format!(
                "Secret {secret}: {field}.{k} must be a string (quote the value)"
            )),
        })
        .collect()
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// Endpoints and secrets read from files.
#[derive(Default)]
pub struct FileSource {
    /// The endpoints, in file order (earlier documents win path conflicts).
    pub endpoints: Vec<EndpointDef>,
    secrets: SecretData,
    secrets_dir: Option<PathBuf>,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("endpoints", &self.endpoints)
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .field("secrets_dir", &self.secrets_dir)
            .finish()
    }
}

impl FileSource {
    /// Read a multi-document YAML file of `WebhookEndpoint` manifests (and
    /// optionally `Secret` manifests with `data` or `stringData`; other kinds
    /// are ignored). A secret key is looked up in the file's Secrets first,
    /// then in `<secrets_dir>/<secret name>/<key>` (the layout of a mounted
    /// Secret volume; one trailing newline is stripped).
    pub fn load(path: &Path, secrets_dir: Option<&Path>) -> Result<Self, SourceError> {
        let text = std::fs::read(path).map_err(|source| SourceError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text, secrets_dir)
    }

    /// Parse the contents of the endpoints file `path` (see [`load`](Self::load)).
    pub fn parse(
        path: &Path,
        text: &[u8],
        secrets_dir: Option<&Path>,
    ) -> Result<Self, SourceError> {
        let text = std::str::from_utf8(text).map_err(|_| SourceError::Parse {
            path: path.to_owned(),
            message: "not UTF-8".into(),
        })?;
        let parse_err = |message: String| SourceError::Parse {
            path: path.to_owned(),
            message,
        };
        let mut out = FileSource {
            secrets_dir: secrets_dir.map(Path::to_owned),
            ..Default::default()
        };
        // No source snippets in errors: the file may hold Secrets.
        let mut options = serde_saphyr::Options::default();
        options.with_snippet = false;
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple_with_options(text, options)
            .map_err(|e| parse_err(e.to_string()))?;
        for (i, value) in docs.into_iter().enumerate() {
            if value.is_null() {
                continue;
            }
            let m: Manifest = serde_json::from_value(value)
                .map_err(|e| parse_err(format!("document {i}: {e}")))?;
            let namespace = m.metadata.namespace.unwrap_or_else(|| "default".into());
            match m.kind.as_str() {
                "WebhookEndpoint" => {
                    let spec: WebhookEndpointSpec =
                        serde_json::from_value(m.spec.unwrap_or_default()).map_err(|e| {
                            parse_err(format!("WebhookEndpoint {}: {e}", m.metadata.name))
                        })?;
                    if let Err(problems) = spillway_api::validate::check(&spec) {
                        return Err(parse_err(format!(
                            "WebhookEndpoint {}: {}",
                            m.metadata.name,
                            problems.join("; ")
                        )));
                    }
                    out.endpoints.push(EndpointDef {
                        namespace,
                        name: m.metadata.name,
                        created: Some(i64::try_from(i).unwrap_or(i64::MAX)),
                        spec,
                        partitions_ready: None,
                        stored_format: spillway_api::stored::CURRENT,
                    });
                }
                "Secret" => {
                    let name = &m.metadata.name;
                    let data = secret_strings(name, "data", m.data).map_err(parse_err)?;
                    let string_data =
                        secret_strings(name, "stringData", m.string_data).map_err(parse_err)?;
                    let mut values = BTreeMap::new();
                    for (k, v) in data {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(v.trim())
                            .map_err(|_| {
                                parse_err(format!(
                                    "Secret {}: data.{k} is not base64",
                                    m.metadata.name
                                ))
                            })?;
                        values.insert(k, bytes);
                    }
                    for (k, v) in string_data {
                        values.insert(k, v.into_bytes());
                    }
                    out.secrets.insert((namespace, m.metadata.name), values);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// The value of a secret key, from the file or the secrets directory.
    pub fn secret(&self, namespace: &str, r: &SecretKeyRef) -> Option<Vec<u8>> {
        lookup(&self.secrets, namespace, r).or_else(|| {
            let dir = self.secrets_dir.as_ref()?;
            // Raw, as from a Kubernetes Secret: whitespace is handled by
            // the one rule of spillway_api::secret where values are used.
            std::fs::read(dir.join(&r.name).join(&r.key)).ok()
        })
    }

    /// A digest of the secret files this source's endpoints read from the
    /// secrets directory (missing files included as missing), to notice
    /// when one changes.
    fn secrets_digest(&self) -> Vec<u8> {
        let mut refs: Vec<(&str, &str)> = self
            .endpoints
            .iter()
            .flat_map(|d| {
                referenced(&d.spec).filter(|r| lookup(&self.secrets, &d.namespace, r).is_none())
            })
            .map(|r| (r.name.as_str(), r.key.as_str()))
            .collect();
        refs.sort_unstable();
        refs.dedup();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        if let Some(dir) = &self.secrets_dir {
            for (name, key) in refs {
                for part in [name.as_bytes(), key.as_bytes()] {
                    ctx.update(&(part.len() as u64).to_le_bytes());
                    ctx.update(part);
                }
                match std::fs::read(dir.join(name).join(key)) {
                    Ok(v) => {
                        ctx.update(&[1]);
                        ctx.update(&(v.len() as u64).to_le_bytes());
                        ctx.update(&v);
                    }
                    Err(_) => ctx.update(&[0]),
                }
            }
        }
        ctx.finish().as_ref().to_vec()
    }

    /// Build the routing table from this source.
    pub fn apply(&self, router: &Router, public_base_url: Option<&str>) {
        let lookup = |ns: &str, r: &SecretKeyRef| self.secret(ns, r);
        for loser in router.rebuild(&self.endpoints, &lookup, public_base_url) {
            warn!(endpoint = %loser, "path already served by an older endpoint; not routed");
        }
    }
}

/// Contents and SHA-256 digest of the endpoints file.
fn file_digest(path: &Path) -> Result<(Vec<u8>, Vec<u8>), std::io::Error> {
    let text = std::fs::read(path)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &text)
        .as_ref()
        .to_vec();
    Ok((text, digest))
}

/// What a [`FileWatch::reload`] did.
#[derive(Debug)]
pub enum Reload {
    /// Nothing changed (or the same invalid file was already reported).
    Unchanged,
    /// The endpoints file or a secret file changed: apply
    /// [`FileWatch::source`].
    Changed,
    /// The endpoints file changed but cannot be used; the previous source
    /// stays. Reported once per distinct content.
    Failed(SourceError),
}

/// The file source plus what is needed to notice changes of the endpoints
/// file and of the secret files it references (content digests, so
/// Kubernetes' atomic symlink swaps of mounted Secrets count as changes and
/// `touch` does not).
pub struct FileWatch {
    path: PathBuf,
    secrets_dir: Option<PathBuf>,
    source: FileSource,
    applied: Vec<u8>,
    applied_secrets: Vec<u8>,
    failed: Option<Vec<u8>>,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatch")
            .field("path", &self.path)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Digest standing for "the endpoints file could not be read".
const UNREADABLE: &[u8] = b"";

impl FileWatch {
    /// Load the endpoints file (failing like [`FileSource::load`]).
    pub fn new(path: &Path, secrets_dir: Option<&Path>) -> Result<Self, SourceError> {
        let (text, digest) = file_digest(path).map_err(|source| SourceError::Read {
            path: path.to_owned(),
            source,
        })?;
        let source = FileSource::parse(path, &text, secrets_dir)?;
        Ok(Self {
            path: path.to_owned(),
            secrets_dir: secrets_dir.map(Path::to_owned),
            applied_secrets: source.secrets_digest(),
            source,
            applied: digest,
            failed: None,
        })
    }

    /// The source last loaded successfully.
    pub fn source(&self) -> &FileSource {
        &self.source
    }

    /// Whether [`reload`](Self::reload) would find something to do.
    pub fn pending(&self) -> bool {
        let digest = file_digest(&self.path).map_or_else(|_| UNREADABLE.to_vec(), |(_, d)| d);
        self.is_news(&digest) || self.source.secrets_digest() != self.applied_secrets
    }

    /// Whether the endpoints file with `digest` is neither the applied one
    /// nor the failure already reported.
    fn is_news(&self, digest: &[u8]) -> bool {
        digest != self.applied && self.failed.as_deref() != Some(digest)
    }

    /// Read the files again. A changed, valid endpoints file replaces the
    /// source; an invalid or unreadable one is reported once and the
    /// previous source stays; a changed secret file keeps the source but
    /// asks for it to be applied again.
    pub fn reload(&mut self) -> Reload {
        let read = file_digest(&self.path);
        let digest = read
            .as_ref()
            .map_or_else(|_| UNREADABLE.to_vec(), |(_, d)| d.clone());
        if self.is_news(&digest) {
            let parsed = match read {
                Err(source) => Err(SourceError::Read {
                    path: self.path.clone(),
                    source,
                }),
                Ok((text, _)) => FileSource::parse(&self.path, &text, self.secrets_dir.as_deref()),
            };
            return match parsed {
                Ok(source) => {
                    self.applied_secrets = source.secrets_digest();
                    self.source = source;
                    self.applied = digest;
                    self.failed = None;
                    Reload::Changed
                }
                Err(e) => {
                    self.failed = Some(digest);
                    Reload::Failed(e)
                }
            };
        }
        if digest == self.applied {
            // Back to the applied content: a later bad version is news again.
            self.failed = None;
        }
        let secrets = self.source.secrets_digest();
        if secrets != self.applied_secrets {
            self.applied_secrets = secrets;
            return Reload::Changed;
        }
        Reload::Unchanged
    }
}

/// Poll the endpoints file and the secret files it references every
/// `interval` and apply changes to `router`, counting them in
/// `spillway_gateway_file_reloads_total`. An invalid file is logged and
/// counted once; the routing table it would have replaced stays. Runs until
/// aborted.
pub async fn run_file(
    mut watch: FileWatch,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    public_base_url: Option<String>,
    interval: Duration,
) {
    // Time given to a writer that is still writing when a change is seen.
    const SETTLE: Duration = Duration::from_millis(100);
    let count = |result: &str| {
        metrics
            .file_reloads
            .get_or_create(&crate::metrics::ReloadLabels {
                result: result.into(),
            })
            .inc();
    };
    loop {
        tokio::time::sleep(interval).await;
        if !watch.pending() {
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        match watch.reload() {
            Reload::Unchanged => {}
            Reload::Changed => {
                let before = router.table();
                watch.source().apply(&router, public_base_url.as_deref());
                metrics.forget_removed(&before, &router.table());
                count("applied");
                info!(routes = router.table().len(), file = %watch.path.display(), "reloaded endpoints and secret files");
            }
            Reload::Failed(e) => {
                count("failed");
                warn!(error = %e, "endpoints file changed but cannot be used; keeping the previous routing table");
            }
        }
    }
}

// ---------------------------------------------------------- kubernetes mode

#[derive(Default)]
struct SecretCache {
    data: SecretData,
    /// Secrets whose watch has listed at least once.
    synced: HashSet<(String, String)>,
    /// Secrets whose watch failed (Forbidden, say) before listing: their
    /// endpoints stay without a secret (503 `not_ready`), but they do not
    /// keep the gateway unready for every other endpoint.
    failed: HashSet<(String, String)>,
}

/// Watch WebhookEndpoints (all namespaces, or `namespace`) and the Secrets
/// they reference, keeping `router` current. `synced` becomes true once the
/// endpoints and every Secret referenced at that time have been listed (or
/// their watch has failed: that endpoint answers 503 `not_ready`, the
/// others are served).
/// Runs until aborted.
pub async fn run_kubernetes(
    client: Client,
    namespace: Option<String>,
    router: Arc<Router>,
    synced: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    public_base_url: Option<String>,
) {
    let api: Api<WebhookEndpoint> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (reader, writer) = reflector::store::<WebhookEndpoint>();
    let changed = Arc::new(Notify::new());
    let cache = Arc::new(Mutex::new(SecretCache::default()));

    let endpoint_watch = {
        let changed = changed.clone();
        tokio::spawn(async move {
            let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
                .default_backoff();
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => changed.notify_one(),
                    Err(e) => warn!(error = %e, "watching WebhookEndpoints failed; retrying"),
                }
            }
        })
    };
    let _abort_endpoints = AbortOnDrop(endpoint_watch);

    let mut secret_watches: HashMap<(String, String), AbortOnDrop> = HashMap::new();
    let mut endpoints_ready = false;
    loop {
        changed.notified().await;
        // Coalesce bursts of events into one rebuild.
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !endpoints_ready {
            endpoints_ready = matches!(reader.wait_until_ready().now_or_never(), Some(Ok(())));
            if !endpoints_ready {
                continue;
            }
        }
        let defs = endpoint_defs(&reader);
        let wanted: HashSet<(String, String)> = defs
            .iter()
            .flat_map(|d| referenced(&d.spec).map(|r| (d.namespace.clone(), r.name.clone())))
            .collect();
        secret_watches.retain(|k, _| wanted.contains(k));
        {
            let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
            c.data.retain(|k, _| wanted.contains(k));
            c.synced.retain(|k| wanted.contains(k));
            c.failed.retain(|k| wanted.contains(k));
        }
        for key in &wanted {
            if !secret_watches.contains_key(key) {
                debug!(namespace = %key.0, secret = %key.1, "watching Secret");
                let task = tokio::spawn(watch_secret(
                    client.clone(),
                    key.clone(),
                    cache.clone(),
                    changed.clone(),
                ));
                secret_watches.insert(key.clone(), AbortOnDrop(task));
            }
        }
        let all_secrets_synced = {
            let c = cache.lock().unwrap_or_else(|e| e.into_inner());
            let lookup = |ns: &str, r: &SecretKeyRef| lookup(&c.data, ns, r);
            let before = router.table();
            for loser in router.rebuild(&defs, &lookup, public_base_url.as_deref()) {
                warn!(endpoint = %loser, "path already served by an older endpoint; not routed");
            }
            metrics.forget_removed(&before, &router.table());
            // Every referenced Secret listed, or known to be unreadable:
            // one endpoint's Secret never holds every endpoint back.
            wanted
                .iter()
                .all(|k| c.synced.contains(k) || c.failed.contains(k))
        };
        metrics
            .routes
            .set(i64::try_from(router.table().len()).unwrap_or(i64::MAX));
        if all_secrets_synced && !synced.swap(true, Ordering::AcqRel) {
            info!(routes = router.table().len(), "routing table synced");
        }
    }
}

fn endpoint_defs(reader: &Store<WebhookEndpoint>) -> Vec<EndpointDef> {
    reader
        .state()
        .iter()
        .filter(|e| e.metadata.deletion_timestamp.is_none())
        .map(|e| EndpointDef {
            namespace: e.namespace().unwrap_or_default(),
            name: e.name_any(),
            created: e
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second()),
            spec: e.spec.clone(),
            partitions_ready: e.status.as_ref().and_then(|s| s.partitions),
            stored_format: e.status.as_ref().and_then(|s| s.stored_format).unwrap_or(1),
        })
        .collect()
}

async fn watch_secret(
    client: Client,
    key: (String, String),
    cache: Arc<Mutex<SecretCache>>,
    changed: Arc<Notify>,
) {
    let api: Api<Secret> = Api::namespaced(client, &key.0);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", key.1));
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut seen_in_init = false;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                warn!(namespace = %key.0, secret = %key.1, error = %e, "watching Secret failed; retrying");
                let first = cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .failed
                    .insert(key.clone());
                if first {
                    changed.notify_one();
                }
                continue;
            }
        };
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Init => seen_in_init = false,
            watcher::Event::InitApply(s) | watcher::Event::Apply(s) => {
                seen_in_init = true;
                let data = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                c.data.insert(key.clone(), data);
            }
            watcher::Event::Delete(_) => {
                c.data.remove(&key);
            }
            watcher::Event::InitDone => {
                if !seen_in_init {
                    c.data.remove(&key);
                }
                c.synced.insert(key.clone());
                c.failed.remove(&key);
            }
        }
        drop(c);
        changed.notify_one();
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_watch_applies_changes_and_keeps_the_last_good_file() {
        let dir = std::env::temp_dir().join(format!("spillway-gw-watch-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("files/gh")).unwrap();
        let secret = dir.join("files/gh/secret");
        std::fs::write(&secret, "one\n").unwrap();
        let file = dir.join("endpoints.yaml");
        let endpoint = |name: &str| {
            format!(
                "---\nkind: WebhookEndpoint\nmetadata: {{name: {name}}}\nspec:\n  verification: {{scheme: github, secretRefs: [{{name: gh, key: secret}}]}}\n  processor: {{sink: {{url: \"http://sink\"}}}}\n"
            )
        };
        std::fs::write(&file, endpoint("a")).unwrap();
        let mut w = FileWatch::new(&file, Some(&dir.join("files"))).unwrap();
        let r = SecretKeyRef {
            name: "gh".into(),
            key: "secret".into(),
        };
        // Raw file contents; the one whitespace rule applies where used.
        let value = |w: &FileWatch| {
            w.source()
                .secret("default", &r)
                .map(|v| spillway_api::secret::value(&v).to_vec())
        };
        assert!(!w.pending());
        assert!(matches!(w.reload(), Reload::Unchanged));

        // Same content rewritten: no change.
        std::fs::write(&secret, "one\n").unwrap();
        std::fs::write(&file, endpoint("a")).unwrap();
        assert!(!w.pending());

        // A secret file changes.
        std::fs::write(&secret, "two\n").unwrap();
        assert!(w.pending());
        assert!(matches!(w.reload(), Reload::Changed));
        assert_eq!(value(&w).as_deref(), Some(&b"two"[..]));
        assert!(!w.pending());

        // The endpoints file changes.
        std::fs::write(&file, endpoint("a") + &endpoint("b")).unwrap();
        assert!(matches!(w.reload(), Reload::Changed));
        assert_eq!(w.source().endpoints.len(), 2);

        // An invalid file is reported once; the last good source stays.
        std::fs::write(
            &file,
            "kind: WebhookEndpoint\nmetadata: {name: x}\nspec: {}\n",
        )
        .unwrap();
        assert!(w.pending());
        let Reload::Failed(e) = w.reload() else {
            panic!("expected failure")
        };
        assert!(e.to_string().contains("WebhookEndpoint x"), "{e}");
        assert!(!w.pending(), "reported once");
        assert!(matches!(w.reload(), Reload::Unchanged));
        assert_eq!(w.source().endpoints.len(), 2);
        // So is a missing file.
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(
            w.reload(),
            Reload::Failed(SourceError::Read { .. })
        ));
        assert_eq!(w.source().endpoints.len(), 2);
        // A valid file again.
        std::fs::write(&file, endpoint("c")).unwrap();
        assert!(matches!(w.reload(), Reload::Changed));
        assert_eq!(w.source().endpoints[0].name, "c");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_source_reads_endpoints_and_secrets() {
        let dir = std::env::temp_dir().join(format!("spillway-gw-src-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("files/gl")).unwrap();
        std::fs::write(dir.join("files/gl/token"), "gl-token\n").unwrap();
        let yaml = r#"
apiVersion: v1
kind: Secret
metadata: {name: gh}
stringData: {secret: "It's a Secret to Everybody"}
---
apiVersion: v1
kind: Secret
metadata: {name: b64, namespace: other}
data: {k: aGVsbG8=}
---
apiVersion: spillway.dev/v1alpha1
kind: WebhookEndpoint
metadata: {name: gh}
spec:
  path: /gh
  verification: {scheme: github, secretRefs: [{name: gh, key: secret}]}
  processor: {sink: {url: "http://sink"}}
---
kind: WebhookEndpoint
metadata: {name: gl, namespace: team}
spec:
  verification: {scheme: gitlab, secretRefs: [{name: gl, key: token}]}
  processor: {sink: {url: "http://sink"}}
"#;
        let file = dir.join("endpoints.yaml");
        std::fs::write(&file, yaml).unwrap();
        let src = FileSource::load(&file, Some(&dir.join("files"))).unwrap();
        assert_eq!(src.endpoints.len(), 2);
        assert!(
            !format!("{src:?}").contains("Everybody"),
            "Debug redacts secrets"
        );
        let r = |name: &str, key: &str| SecretKeyRef {
            name: name.into(),
            key: key.into(),
        };
        assert_eq!(
            src.secret("default", &r("gh", "secret")).as_deref(),
            Some(&b"It's a Secret to Everybody"[..])
        );
        assert_eq!(
            src.secret("other", &r("b64", "k")).as_deref(),
            Some(&b"hello"[..])
        );
        // Files are read raw (a trailing newline kept); the one whitespace
        // rule of spillway_api::secret applies where values are used.
        assert_eq!(
            src.secret("team", &r("gl", "token"))
                .as_deref()
                .map(spillway_api::secret::value),
            Some(&b"gl-token"[..])
        );
        assert_eq!(src.secret("team", &r("gl", "nope")), None);
        let router = Router::default();
        src.apply(&router, None);
        let t = router.table();
        assert!(t.get("/gh").unwrap().verifier.is_ok());
        assert!(t.get("/team/gl").unwrap().verifier.is_ok());

        std::fs::write(
            &file,
            "kind: WebhookEndpoint\nmetadata: {name: x}\nspec: {}\n",
        )
        .unwrap();
        let err = FileSource::load(&file, None).unwrap_err().to_string();
        assert!(err.contains("WebhookEndpoint x"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secret_errors_name_the_key_but_never_the_value() {
        let path = Path::new("endpoints.yaml");
        for (contents, names) in [
            ("stringData: {token: 123456}", "stringData.token"),
            ("stringData: {token: [123456]}", "stringData.token"),
            ("stringData: {token: {v: 123456}}", "stringData.token"),
            ("data: {token: 123456}", "data.token"),
            ("data: {token: true, other: \"MTIzNDU2\"}", "data.token"),
            ("stringData: \"123456\"", "stringData must be a map"),
            ("data: [123456]", "data must be a map"),
            // Keys are strings, as Kubernetes reads them (`123: ...` is "123").
            ("stringData: {123: 123456}", "stringData.123"),
            ("data: {token: \"123456!\"}", "data.token is not base64"),
        ] {
            let yaml = format!("kind: Secret\nmetadata: {{name: gh}}\n{contents}\n");
            let err = FileSource::parse(path, yaml.as_bytes(), None)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("Secret gh") && err.contains(names),
                "{contents}: {err}"
            );
            assert!(!err.contains("123456"), "{contents}: value echoed: {err}");
        }
        let ok = "kind: Secret\nmetadata: {name: gh}\nstringData: {token: \"123456\"}\n";
        let src = FileSource::parse(path, ok.as_bytes(), None).unwrap();
        let r = SecretKeyRef {
            name: "gh".into(),
            key: "token".into(),
        };
        assert_eq!(src.secret("default", &r).as_deref(), Some(&b"123456"[..]));
    }
}
