//! `spillway`: inspect and operate WebhookEndpoints — status, dead letters,
//! redrive, replay and test sends. Also usable as `kubectl spillway` (install
//! it as `kubectl-spillway` on the PATH).
#![forbid(unsafe_code)]

mod attempts;
mod dlq;
mod endpoint;
mod events;
mod history;
mod output;
mod progress;

mod redeliver;
mod replay;
mod send;
mod status;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args as ClapArgs, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use kube::api::Api;
use spillway_api::WebhookEndpoint;
use spillway_api::nats::{NatsArgs, SettingNames};

use crate::endpoint::EndpointRef;
use spillway_cli::{reach, sign};

/// Operate Spillway WebhookEndpoints.
#[derive(Parser, Debug)]
#[command(name = "spillway", version, about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(ClapArgs, Debug)]
#[command(next_help_heading = "Cluster and NATS")]
struct Global {
    /// Kubeconfig file (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    #[arg(long, global = true)]
    context: Option<String>,
    /// Namespace of ENDPOINT given as a bare name (default: the context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// NATS connection (URL default `nats://127.0.0.1:4222`; NATS_URL and
    /// NATS_CREDS are read too), the same flags as the other components'.
    #[command(flatten)]
    nats: NatsArgs,
    /// NATS user (with --nats-password).
    #[arg(long, global = true, env = "NATS_USER")]
    nats_user: Option<String>,
    /// NATS password.
    #[arg(long, global = true, env = "NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// Reach NATS through the Kubernetes API: find the Spillway
    /// installation, the NATS URL and credentials the chart gave it, and
    /// port-forward to a ready NATS pod (instead of --nats-url).
    #[arg(long, global = true, env = "SPILLWAY_PORT_FORWARD")]
    port_forward: bool,
    /// Namespace of the Spillway installation, for --port-forward (default:
    /// found in any namespace you may list).
    #[arg(long, global = true, env = "SPILLWAY_NAMESPACE")]
    spillway_namespace: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Path, readiness, backlog, in flight, dead letters and replicas.
    Status {
        /// `name` or `namespace/name`; all endpoints in the namespace when omitted.
        endpoint: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Output format (json and yaml: see docs/cli.md for the fields).
        #[arg(short, long, value_enum, default_value_t)]
        output: output::Format,
    },
    /// Print the NATS permissions of a per-namespace user for the
    /// namespace's processors (a nats-server `permissions` block): their
    /// own streams and subjects, nothing of another namespace's. Run again
    /// when endpoints are added.
    NatsPermissions {
        /// Endpoint names in the namespace (default: every WebhookEndpoint
        /// in it, read from the cluster).
        endpoints: Vec<String>,
        /// `conf`: a nats-server `permissions` block (users in the server
        /// configuration); `nsc`: flags for `nsc add user` (JWT mode).
        #[arg(long, value_parser = ["conf", "nsc"], default_value = "conf")]
        format: String,
    },
    /// Every recorded delivery attempt at one webhook (each listener's),
    /// with the status, error or answer it got, newest last.
    Attempts {
        /// `name` or `namespace/name`.
        endpoint: String,
        /// The webhook's delivery id (`Spillway-Delivery-Id`, also shown by
        /// `dlq list`).
        #[arg(long)]
        id: String,
        /// Output format (json and yaml: see docs/cli.md for the fields).
        #[arg(short, long, value_enum, default_value_t)]
        output: output::Format,
    },
    /// Stored webhooks (from the history) with their delivery state per
    /// listener; `events show ENDPOINT ID` for one in full.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Events {
        #[command(subcommand)]
        cmd: Option<EventsCmd>,
        /// `name` or `namespace/name`.
        #[arg(required = true)]
        endpoint: Option<String>,
        /// Webhooks received within this long ago (e.g. `1h`, `30m`).
        #[arg(long, default_value = "1h")]
        since: String,
        /// Only webhooks in this state (for `--listener`, else for any).
        #[arg(long, value_enum)]
        state: Option<events::State>,
        /// Only this listener's state (`processor`, a WebhookListener's
        /// NAME or NAMESPACE/NAME).
        #[arg(long)]
        listener: Option<String>,
        /// Show the newest this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Output format (json and yaml: see docs/cli.md for the fields).
        #[arg(short, long, value_enum, default_value_t)]
        output: output::Format,
    },
    /// Dead letters.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
    /// Deliver stored webhooks again from the stream's history (new copies;
    /// the live consumer is not disturbed).
    Replay {
        /// `name` or `namespace/name`.
        endpoint: String,
        /// Replay what was stored within this long ago (e.g. `2h`, `30m`).
        #[arg(
            long,
            conflicts_with = "from_seq",
            required_unless_present = "from_seq"
        )]
        since: Option<String>,
        /// Replay from this stream sequence.
        #[arg(long)]
        from_seq: Option<u64>,
        /// Last stream sequence to replay (default: the last one stored).
        #[arg(long = "to-seq", alias = "to")]
        to_seq: Option<u64>,
        /// At most this many messages per second.
        #[arg(long)]
        rate: Option<u32>,
        /// Id of this replay; repeat it to resume an interrupted replay
        /// without duplicates (within the stream's duplicate window).
        #[arg(long)]
        replay_id: Option<String>,
        /// Replay to this listener only (`processor`, a WebhookListener's
        /// NAME or NAMESPACE/NAME), e.g. a new listener catching up; its
        /// filter still applies. Default: every listener.
        #[arg(long)]
        listener: Option<String>,
    },
    /// Deliver one stored webhook again to one listener (one new request,
    /// recorded like any other attempt; see `attempts`).
    Redeliver {
        /// `name` or `namespace/name`.
        endpoint: String,
        /// The webhook's delivery id.
        id: String,
        /// The listener to deliver it to: `processor` (the endpoint's
        /// spec.processor), a WebhookListener's NAME (in the endpoint's
        /// namespace) or NAMESPACE/NAME.
        #[arg(long, default_value = spillway_api::names::BUILTIN_LISTENER)]
        listener: String,
        /// Search the history from this long ago (e.g. `2h`) when the
        /// webhook has no attempt records to start from (default: the whole
        /// history).
        #[arg(long)]
        since: Option<String>,
    },
    /// Print a shell completion script: `source <(spillway completion
    /// bash)`, or save it where your shell loads completions from.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Sign a test webhook like the provider would and POST it to the gateway.
    Send {
        /// `name` or `namespace/name`.
        endpoint: String,
        /// Signature scheme (default: the endpoint's).
        #[arg(long)]
        scheme: Option<String>,
        /// File holding the provider's signing secret.
        #[arg(long)]
        secret_from: Option<PathBuf>,
        /// Gateway base URL, e.g. https://hooks.example.com.
        #[arg(long, env = "SPILLWAY_GATEWAY_URL")]
        gateway: String,
        /// Path on the gateway (default: the endpoint's).
        #[arg(long)]
        path: Option<String>,
        /// Content type of the body.
        #[arg(long, default_value = "application/json")]
        content_type: String,
        /// Extra header, `Name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Delivery id for schemes that carry one (default: generated).
        #[arg(long)]
        id: Option<String>,
        /// The body (`-` for stdin).
        body: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum EventsCmd {
    /// One stored webhook: its headers (signatures and credentials
    /// redacted), its body on request, and every attempt.
    Show {
        /// `name` or `namespace/name`.
        endpoint: String,
        /// The webhook's delivery id.
        id: String,
        /// Print the body too.
        #[arg(long)]
        body: bool,
        /// Search the history from this long ago when the webhook has no
        /// attempt records to start from (default: the whole history).
        #[arg(long)]
        since: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: output::Format,
    },
}

#[derive(Subcommand, Debug)]
enum DlqCmd {
    /// List dead letters: sequence, id, reason, attempts, last status, age.
    List {
        /// `name` or `namespace/name`.
        endpoint: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Output format (json and yaml: see docs/cli.md for the fields).
        #[arg(short, long, value_enum, default_value_t)]
        output: output::Format,
    },
    /// Move dead letters back for another round, each exactly once.
    Redrive {
        /// `name` or `namespace/name`.
        endpoint: String,
        /// Delivery id to redrive (repeatable).
        #[arg(long, required_unless_present_any = ["all", "seq"])]
        id: Vec<String>,
        /// Dead-letter sequence to redrive (repeatable; see `dlq list`).
        #[arg(long)]
        seq: Vec<u64>,
        /// Every dead letter present when the redrive starts.
        #[arg(long, conflicts_with_all = ["id", "seq"])]
        all: bool,
        /// At most this many per second.
        #[arg(long)]
        rate: Option<u32>,
    },
}

impl Global {
    async fn kube_config(&self) -> Result<kube::Config> {
        let opts = kube::config::KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let kc = match &self.kubeconfig {
            Some(p) => kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("reading kubeconfig {}", p.display()))?,
            None => kube::config::Kubeconfig::read()
                .context("reading ~/.kube/config (or pass --kubeconfig)")?,
        };
        kube::Config::from_custom_kubeconfig(kc, &opts)
            .await
            .context("loading the kubeconfig")
    }

    async fn kube(&self) -> Result<(kube::Client, String)> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cfg = self.kube_config().await?;
        let ns = cfg.default_namespace.clone();
        Ok((
            kube::Client::try_from(cfg).context("creating the Kubernetes client")?,
            ns,
        ))
    }

    /// The namespace for bare names, without contacting the cluster.
    async fn default_namespace(&self) -> String {
        if let Some(ns) = &self.namespace {
            return ns.clone();
        }
        match self.kube_config().await {
            Ok(c) => c.default_namespace,
            Err(_) => "default".into(),
        }
    }

    async fn endpoint(&self, s: &str) -> Result<EndpointRef> {
        let ns = if s.contains('/') {
            String::new()
        } else {
            self.default_namespace().await
        };
        EndpointRef::parse(s, &ns).map_err(anyhow::Error::msg)
    }

    async fn nats(&self) -> Result<async_nats::jetstream::Context> {
        let mut auth = self.nats.auth();
        if auth.creds_file.is_none() {
            auth.creds_file = std::env::var_os("NATS_CREDS").map(PathBuf::from);
        }
        if self.port_forward {
            return self.nats_through_port_forward(auth).await;
        }
        let url = self
            .nats
            .url
            .clone()
            .or_else(|| std::env::var("NATS_URL").ok())
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
        // The same checks as the gateway's, operator's and processor's.
        let mut opts = auth.connect_options(SettingNames::FLAGS)?;
        if let (Some(u), Some(p)) = (&self.nats_user, &self.nats_password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        let servers = spillway_api::nats::server_addrs(&url)
            .map_err(|e| anyhow::anyhow!("--nats-url: {e}"))?;
        let client = opts
            .name("spillway-cli")
            .connection_timeout(Duration::from_secs(5))
            .connect(servers)
            .await
            .with_context(|| {
                format!(
                    "connecting to NATS at {} (pass --nats-url / NATS_URL, e.g. after `kubectl port-forward svc/nats 4222`)",
                    spillway_api::nats::redact_url(&url)
                )
            })?;
        Ok(async_nats::jetstream::new(client))
    }
}

impl Global {
    /// `--port-forward` (see [`reach`]): the installation's NATS URL and
    /// credentials, through a port-forward to a ready NATS pod. Files given
    /// as flags win over the installation's Secrets.
    async fn nats_through_port_forward(
        &self,
        auth: spillway_api::nats::NatsAuth,
    ) -> Result<async_nats::jetstream::Context> {
        let (client, _) = self.kube().await?;
        let inst = reach::find_installation(&client, self.spillway_namespace.as_deref()).await?;
        let (svc_ns, svc, port) =
            reach::service_of(&inst.url, &inst.namespace).map_err(anyhow::Error::msg)?;
        let (pod, pod_port) = reach::resolve_pod(&client, &svc_ns, &svc, port).await?;
        let mut opts = auth.connect_options(SettingNames::FLAGS)?;
        let mut from = Vec::new();
        let own_auth = auth.creds_file.is_some()
            || auth.token_file.is_some()
            || auth.user_file.is_some()
            || self.nats_user.is_some();
        if let (Some(u), Some(p)) = (&self.nats_user, &self.nats_password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if !own_auth && let Some(k) = &inst.creds {
            // Without RBAC for the Secret, go on: NATS may not need it.
            match reach::secret_value(&client, &inst.namespace, k).await {
                Ok(bytes) => {
                    let text = String::from_utf8(bytes)
                        .map_err(|_| anyhow::anyhow!("Secret {}: not a .creds file", k.name))?;
                    opts = opts.credentials(&text).with_context(|| {
                        format!("Secret {}/{} key {}", inst.namespace, k.name, k.key)
                    })?;
                    from.push(format!(
                        "credentials from Secret {}/{}",
                        inst.namespace, k.name
                    ));
                }
                Err(e) => eprintln!(
                    "spillway: {e:#}; connecting without the installation's NATS credentials"
                ),
            }
        }
        let tls = inst.tls_required || inst.tls_ca.is_some() || auth.tls_ca_file.is_some();
        if tls {
            let read =
                |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let ca = match (&auth.tls_ca_file, &inst.tls_ca) {
                (Some(f), _) => Some(read(f)?),
                (None, Some(k)) => Some(reach::secret_value(&client, &inst.namespace, k).await?),
                (None, None) => None,
            };
            let client_pair = match (&auth.tls_cert_file, &auth.tls_key_file, &inst.tls_client) {
                (Some(c), Some(k), _) => Some((read(c)?, read(k)?)),
                (_, _, Some((c, k))) => Some((
                    reach::secret_value(&client, &inst.namespace, c).await?,
                    reach::secret_value(&client, &inst.namespace, k).await?,
                )),
                _ => None,
            };
            let host = format!("{svc}.{svc_ns}.svc");
            let cfg = reach::tls_config(
                &host,
                ca.as_deref(),
                client_pair
                    .as_ref()
                    .map(|(c, k)| (c.as_slice(), k.as_slice())),
            )?;
            opts = opts.tls_client_config(cfg).require_tls(true);
            from.push(format!("TLS checked against {host}"));
        }
        eprintln!(
            "spillway: NATS through port-forward to pod {svc_ns}/{pod} port {pod_port} (Service {svc}, as told to {}/{}{})",
            inst.namespace,
            inst.deployment,
            from.iter().map(|f| format!("; {f}")).collect::<String>()
        );
        let local = reach::forward(&client, &svc_ns, &pod, pod_port).await?;
        let client = opts
            .name("spillway-cli")
            .ignore_discovered_servers()
            .connection_timeout(Duration::from_secs(5))
            .connect(format!("nats://{local}"))
            .await
            .with_context(|| {
                format!("connecting to NATS through the port-forward to {svc_ns}/{pod}")
            })?;
        Ok(async_nats::jetstream::new(client))
    }
}

/// The command line; usage and help say `kubectl spillway` when run as a
/// kubectl plugin (the binary installed, or linked, as `kubectl-spillway`).
fn parse_args() -> Cli {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let mut cmd = Cli::command();
    if is_kubectl_plugin(std::path::Path::new(&argv0)) {
        cmd = cmd.bin_name("kubectl spillway");
    }
    Cli::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit())
}

/// Whether `argv0` names a kubectl plugin (`kubectl-spillway`, as kubectl
/// runs it, or anything else starting with `kubectl-`).
fn is_kubectl_plugin(argv0: &std::path::Path) -> bool {
    argv0
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("kubectl-"))
}

/// ` in 1.2s (40/s)` after a run that did something.
fn timing(run: &progress::Summary) -> String {
    if run.count == 0 {
        String::new()
    } else {
        format!(" {run}")
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = parse_args();
    let g = &cli.global;
    match cli.cmd {
        Cmd::Completion { shell } => {
            let mut cmd = Cli::command();
            let name = cmd.get_name().to_owned();
            clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
        }
        Cmd::Status {
            endpoint,
            all_namespaces,
            output,
        } => {
            let (client, ctx_ns) = g.kube().await?;
            let one = match &endpoint {
                Some(e) => Some(
                    EndpointRef::parse(e, g.namespace.as_deref().unwrap_or(&ctx_ns))
                        .map_err(anyhow::Error::msg)?,
                ),
                None => None,
            };
            let js = match g.nats().await {
                Ok(js) => Some(js),
                Err(e) => {
                    eprintln!("warning: {e:#}; showing the numbers from the endpoints' status");
                    None
                }
            };
            let ns = if all_namespaces {
                None
            } else {
                Some(g.namespace.clone().unwrap_or(ctx_ns))
            };
            status::run(client, js.as_ref(), ns.as_deref(), one.as_ref(), output).await?;
        }
        Cmd::NatsPermissions {
            mut endpoints,
            format,
        } => {
            let ns = if endpoints.is_empty() {
                let (client, ctx_ns) = g.kube().await?;
                let ns = g.namespace.clone().unwrap_or(ctx_ns);
                let api: Api<WebhookEndpoint> = Api::namespaced(client, &ns);
                endpoints = api
                    .list(&Default::default())
                    .await
                    .with_context(|| format!("listing WebhookEndpoints in {ns}"))?
                    .items
                    .into_iter()
                    .filter_map(|e| e.metadata.name)
                    .collect();
                ns
            } else {
                g.default_namespace().await
            };
            let endpoints = endpoints
                .iter()
                .map(|e| match EndpointRef::parse(e, &ns) {
                    Ok(r) if r.namespace == ns => Ok(r.name),
                    Ok(r) => bail!("{r} is not in namespace {ns}: one namespace at a time"),
                    Err(e) => Err(anyhow::Error::msg(e)),
                })
                .collect::<Result<Vec<_>>>()?;
            let perms = spillway_api::tenancy::processor_permissions(&ns, &endpoints);
            if format == "nsc" {
                println!("{}", perms.to_nsc_flags());
            } else {
                print!(
                    "# NATS permissions for the processors of namespace {ns} ({} endpoint(s))\n{}",
                    endpoints.len(),
                    perms.to_server_config()
                );
            }
        }
        Cmd::Attempts {
            endpoint,
            id,
            output,
        } => {
            let ep = g.endpoint(&endpoint).await?;
            attempts::show(&g.nats().await?, &ep, &id, output).await?;
        }
        Cmd::Dlq {
            cmd:
                DlqCmd::List {
                    endpoint,
                    limit,
                    output,
                },
        } => {
            let ep = g.endpoint(&endpoint).await?;
            dlq::list(&g.nats().await?, &ep, limit, output).await?;
        }
        Cmd::Dlq {
            cmd:
                DlqCmd::Redrive {
                    endpoint,
                    id,
                    seq,
                    all,
                    rate,
                },
        } => {
            let ep = g.endpoint(&endpoint).await?;
            let sel = if all {
                dlq::Selection::All
            } else {
                dlq::Selection::Some {
                    ids: id.into_iter().collect::<BTreeSet<_>>(),
                    seqs: seq.into_iter().collect(),
                }
            };
            let r = dlq::redrive(&g.nats().await?, &ep, &sel, rate).await?;
            println!(
                "redrove {} dead letters of {ep}{}{}{}",
                r.moved,
                timing(&r.run),
                if r.duplicates > 0 {
                    format!(
                        " ({} already redriven by an interrupted run, removed)",
                        r.duplicates
                    )
                } else {
                    String::new()
                },
                if r.skipped > 0 {
                    format!("; {} skipped (no original subject)", r.skipped)
                } else {
                    String::new()
                }
            );
        }
        Cmd::Events {
            cmd:
                Some(EventsCmd::Show {
                    endpoint,
                    id,
                    body,
                    since,
                    output,
                }),
            ..
        } => {
            let ep = g.endpoint(&endpoint).await?;
            let since = since.map(|s| ago(&s)).transpose()?;
            let shown = events::show(&g.nats().await?, &ep, &id, since, body).await?;
            events::render_shown(&mut std::io::stdout().lock(), &shown, output)?;
        }
        Cmd::Events {
            cmd: None,
            endpoint,
            since,
            state,
            listener,
            limit,
            output,
        } => {
            let ep = g
                .endpoint(&endpoint.context("ENDPOINT is required")?)
                .await?;
            let q = events::Query {
                since: ago(&since)?,
                state,
                listener: listener.map(|l| spillway_api::names::listener_arg(&ep.namespace, &l)),
                limit,
            };
            let listing = events::rows(&g.nats().await?, &ep, &q).await?;
            events::render(&mut std::io::stdout().lock(), &listing, output)?;
        }
        Cmd::Redeliver {
            endpoint,
            id,
            listener,
            since,
        } => {
            let ep = g.endpoint(&endpoint).await?;
            let since = since.map(|s| ago(&s)).transpose()?;
            let r = redeliver::redeliver(
                &g.nats().await?,
                &ep,
                &id,
                &listener,
                since,
                &replay::new_run_id(),
            )
            .await?;
            println!(
                "redelivering {id} of {ep} to listener {listener}: history sequence {} \
                 (found after reading {}), queued as work-stream sequence {}; \
                 `spillway attempts {ep} --id {id}` shows the new attempt",
                r.history_seq, r.scanned, r.work_seq
            );
        }
        Cmd::Replay {
            endpoint,
            since,
            from_seq,
            to_seq,
            rate,
            replay_id,
            listener,
        } => {
            let ep = g.endpoint(&endpoint).await?;
            let start = match (since, from_seq) {
                (Some(s), None) => history::Start::Time(ago(&s)?),
                (None, Some(n)) => history::Start::Seq(n),
                _ => bail!("pass exactly one of --since or --from-seq"),
            };
            let run = match replay_id {
                Some(id) => id,
                None => {
                    let id = replay::new_run_id();
                    eprintln!(
                        "replay id {id}: if this replay is interrupted, run it again with `--replay-id {id}` to go on without duplicates"
                    );
                    id
                }
            };
            let r = replay::replay(
                &g.nats().await?,
                &ep,
                &replay::Range { start, to: to_seq },
                &run,
                rate,
                listener.as_deref(),
            )
            .await?;
            println!(
                "replayed {} webhooks of {ep} (replay id {run}){}{}",
                r.published,
                timing(&r.run),
                if r.duplicates > 0 {
                    format!("; {} were already replayed by this replay id", r.duplicates)
                } else {
                    String::new()
                }
            );
        }
        Cmd::Send {
            endpoint,
            scheme,
            secret_from,
            gateway,
            path,
            content_type,
            headers,
            id,
            body,
        } => {
            let ep = g.endpoint(&endpoint).await?;
            let scheme = scheme
                .map(|s| sign::parse_scheme(&s))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            // The endpoint is read when something must come from it.
            let we = if scheme.is_none() || path.is_none() {
                let (client, _) = g.kube().await?;
                let api: Api<WebhookEndpoint> = Api::namespaced(client, &ep.namespace);
                Some(
                    api.get(&ep.name)
                        .await
                        .with_context(|| format!("getting WebhookEndpoint {ep}"))?,
                )
            } else {
                None
            };
            let status = send::run(
                send::SendArgs {
                    ep,
                    scheme,
                    secret_from,
                    body,
                    gateway,
                    path,
                    content_type,
                    headers,
                    id,
                },
                we,
            )
            .await?;
            if !(200..300).contains(&status) {
                bail!("the gateway answered {status}");
            }
        }
    }
    Ok(())
}

/// The time `d` (a Go-style duration such as `2h`) ago.
fn ago(d: &str) -> Result<time::OffsetDateTime> {
    let d = spillway_api::duration::parse(d).map_err(anyhow::Error::msg)?;
    replay::since(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_plugin_names() {
        assert!(is_kubectl_plugin(std::path::Path::new(
            "/usr/local/bin/kubectl-spillway"
        )));
        assert!(is_kubectl_plugin(std::path::Path::new("kubectl-spillway")));
        assert!(!is_kubectl_plugin(std::path::Path::new(
            "/usr/bin/spillway"
        )));
        assert!(!is_kubectl_plugin(std::path::Path::new("")));
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completion_scripts_know_every_command() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "spillway", &mut out);
            let text = String::from_utf8(out).unwrap();
            for sub in [
                "attempts",
                "events",
                "redeliver",
                "dlq",
                "replay",
                "completion",
            ] {
                assert!(text.contains(sub), "{shell}: {sub} missing");
            }
        }
        // The command line takes a shell and refuses others.
        assert!(Cli::try_parse_from(["spillway", "completion", "fish"]).is_ok());
        assert!(Cli::try_parse_from(["spillway", "completion", "cmd.exe"]).is_err());
    }
}
