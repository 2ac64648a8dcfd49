//! The gateway against nats-servers that insist on who connects: JWT
//! credentials (`.creds`, operator mode with a memory resolver, the JWTs made
//! here with the `nkeys` crate) and mutual TLS (certificates made here with
//! `rcgen`). With the right files the gateway becomes ready and stores
//! webhooks; without them it stays not ready and answers 503; unusable files
//! stop it at start with the setting's name and without their contents.
//! The processor and CLI binaries, which share those checks
//! (`spillway_api::nats`), connect over mutual TLS the same way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use nkeys::KeyPair;
use spillway_api::names::EndpointNames;
use spillway_gateway::config::{Config, SourceKind};
use spillway_gateway::run::{Running, StartError, start};
use spillway_gateway::verify::{ring_hmac, sign};
use spillway_tests::{NatsServer, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GH_SECRET: &str = "It's a Secret to Everybody";

// ------------------------------------------------------------------ helpers

/// A directory with an endpoints file: one GitHub endpoint `local/gh` at
/// `/gh`, its secret inline.
fn site() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("endpoints.yaml"),
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: gh, namespace: local}}\nstringData: {{secret: \"{GH_SECRET}\"}}\n---\napiVersion: spillway.dev/v1alpha1\nkind: WebhookEndpoint\nmetadata: {{name: gh, namespace: local}}\nspec:\n  path: /gh\n  verification: {{scheme: github, secretRefs: [{{name: gh, key: secret}}]}}\n  processor: {{sink: {{url: \"http://sink.invalid/hook\"}}}}\n"
        ),
    )?;
    Ok(dir)
}

fn config(site: &Path, nats_url: &str) -> Config {
    Config {
        listen: ([127, 0, 0, 1], 0).into(),
        admin_listen: ([127, 0, 0, 1], 0).into(),
        nats_url: nats_url.to_owned(),
        source: SourceKind::File,
        endpoints_file: Some(site.join("endpoints.yaml")),
        publish_timeout: Duration::from_secs(2),
        retry_after: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(1),
        drain_delay: Duration::ZERO,
        ..Config::default()
    }
}

/// Status and body of one HTTP/1.1 request on a fresh connection.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .context("response timed out")??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("response head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("status line")?;
    Ok((status, body.to_owned()))
}

async fn readyz(gw: &Running) -> u16 {
    http(gw.admin_addr, "GET", "/readyz", &[], b"")
        .await
        .map_or(0, |(s, _)| s)
}

/// POST a correctly signed GitHub delivery.
async fn deliver(gw: &Running, delivery: &str) -> Result<(u16, String)> {
    let body = format!(r#"{{"zen":"{delivery}"}}"#);
    let sig: String = sign(
        ring_hmac::HMAC_SHA256,
        GH_SECRET.as_bytes(),
        &[body.as_bytes()],
    )
    .as_ref()
    .iter()
    .map(|b| format!("{b:02x}"))
    .collect();
    http(
        gw.addr,
        "POST",
        "/gh",
        &[
            ("X-Hub-Signature-256", format!("sha256={sig}")),
            ("X-GitHub-Delivery", delivery.to_owned()),
            ("Content-Type", "application/json".to_owned()),
        ],
        body.as_bytes(),
    )
    .await
}

/// Create the endpoint's stream through `nc` (as the operator would).
async fn stream(nc: async_nats::Client) -> Result<jetstream::stream::Stream> {
    let names = EndpointNames::new("local", "gh");
    Ok(jetstream::new(nc)
        .create_stream(jetstream::stream::Config {
            name: names.stream(),
            subjects: vec![names.stream_subjects()],
            ..Default::default()
        })
        .await?)
}

/// Start the gateway with `config`: it becomes ready and stores one
/// delivery (the stream then holds one message).
async fn stores_one(
    config: &Config,
    stream: &mut jetstream::stream::Stream,
    delivery: &str,
) -> Result<()> {
    let gw = start(config, None).await?;
    eventually(Duration::from_secs(10), "gateway ready", || async {
        readyz(&gw).await == 200
    })
    .await?;
    let (status, body) = deliver(&gw, delivery).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(stream.info().await?.state.messages, 1);
    gw.shutdown().await;
    Ok(())
}

/// Start the gateway with `config` and wait until NATS refuses it (one more
/// line containing `needle` in the server's log); then it is not ready and
/// deliveries get 503.
async fn refused(nats: &NatsServer, needle: &str, config: &Config) -> Result<()> {
    let before = nats.log().matches(needle).count();
    let gw = start(config, None).await?;
    eventually(Duration::from_secs(10), needle, || async {
        nats.log().matches(needle).count() > before
    })
    .await
    .with_context(|| nats.log())?;
    assert_eq!(readyz(&gw).await, 503, "not ready without access to NATS");
    let (status, body) = deliver(&gw, "refused").await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store_unavailable"), "{body}");
    gw.shutdown().await;
    Ok(())
}

fn start_error(r: Result<Running, StartError>) -> String {
    match r {
        Ok(_) => panic!("the gateway started with an unusable file"),
        Err(e) => e.to_string(),
    }
}

// ------------------------------------------------------------- NATS JWTs

/// A NATS JWT (v2) for `subject`, issued and signed by `issuer`.
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = B64URL.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{name}{iat}").to_uppercase(),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!("{header}.{}", B64URL.encode(claims.to_string()));
    let sig = issuer.sign(signed.as_bytes()).expect("ed25519 signs");
    format!("{signed}.{}", B64URL.encode(sig))
}

/// A `.creds` file as `nsc` writes it.
pub(crate) fn creds(user_jwt: &str, user: &KeyPair) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().expect("user seed")
    )
}

/// An operator, one JetStream-enabled account, and users of that account.
struct Trust {
    operator_jwt: String,
    account: KeyPair,
    account_jwt: String,
    system: KeyPair,
    system_jwt: String,
}

impl Trust {
    fn new() -> Self {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let operator_jwt = jwt(
            &operator,
            &operator.public_key(),
            "spillway-test",
            serde_json::json!({"type": "operator", "version": 2}),
        );
        let account_jwt = jwt(
            &operator,
            &account.public_key(),
            "spillway",
            serde_json::json!({"type": "account", "version": 2, "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
            }}),
        );
        // JetStream in operator mode needs a system account.
        let system = KeyPair::new_account();
        let system_jwt = jwt(
            &operator,
            &system.public_key(),
            "SYS",
            serde_json::json!({"type": "account", "version": 2, "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
            }}),
        );
        Self {
            operator_jwt,
            account,
            account_jwt,
            system,
            system_jwt,
        }
    }

    /// nats-server configuration trusting this operator.
    fn server_config(&self) -> String {
        format!(
            "operator: {}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{ {}: {}, {}: {} }}\n",
            self.operator_jwt,
            self.system.public_key(),
            self.account.public_key(),
            self.account_jwt,
            self.system.public_key(),
            self.system_jwt
        )
    }

    /// A `.creds` for a user of the account, signed by `signer` (the
    /// account itself, or an untrusted key), with `permissions`.
    fn user(&self, signer: &KeyPair, name: &str, permissions: serde_json::Value) -> String {
        let user = KeyPair::new_user();
        let mut nats = serde_json::json!({
            "type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1,
        });
        if let (Some(n), Some(p)) = (nats.as_object_mut(), permissions.as_object()) {
            n.extend(p.clone());
        }
        if signer.public_key() != self.account.public_key() {
            // Claim the trusted account as issuer, signed by another key.
            nats["issuer_account"] = self.account.public_key().into();
        }
        creds(&jwt(signer, &user.public_key(), name, nats), &user)
    }
}

// ------------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_gets_a_publish_only_user_in_and_nothing_else_does() -> Result<()> {
    let trust = Trust::new();
    let nats = NatsServer::start_with(&trust.server_config()).await?;
    let site = site()?;
    let admin_creds = site.path().join("admin.creds");
    std::fs::write(
        &admin_creds,
        trust.user(&trust.account, "admin", serde_json::json!({})),
    )?;
    // Exactly what docs/security.md grants the gateway: publish to
    // spillway.in.>, receive the PubAck on its inbox.
    let gw_creds = site.path().join("gateway.creds");
    std::fs::write(
        &gw_creds,
        trust.user(
            &trust.account,
            "gateway",
            serde_json::json!({
                "pub": {"allow": ["spillway.in.>"]},
                "sub": {"allow": ["_INBOX.>"]},
            }),
        ),
    )?;
    let admin = async_nats::ConnectOptions::with_credentials_file(&admin_creds)
        .await?
        .connect(&nats.url)
        .await
        .with_context(|| nats.log())?;
    let mut stream = stream(admin).await?;

    // The right credentials: ready, stored once.
    stores_one(
        &Config {
            nats_creds_file: Some(gw_creds.clone()),
            ..config(site.path(), &nats.url)
        },
        &mut stream,
        "with-creds",
    )
    .await?;

    // No credentials: NATS refuses the connection; not ready, 503.
    refused(
        &nats,
        "authentication error",
        &config(site.path(), &nats.url),
    )
    .await?;

    // A user JWT the account did not sign: refused as well.
    let forged = site.path().join("forged.creds");
    std::fs::write(
        &forged,
        trust.user(&KeyPair::new_account(), "forged", serde_json::json!({})),
    )?;
    refused(
        &nats,
        "authentication error",
        &Config {
            nats_creds_file: Some(forged),
            ..config(site.path(), &nats.url)
        },
    )
    .await?;
    assert_eq!(
        stream.info().await?.state.messages,
        1,
        "nothing else stored"
    );
    Ok(())
}

/// User and password, or a token, from files (mounted Secret keys, with
/// the one whitespace rule), never from a URL or a flag's value: the right
/// ones get the gateway in, wrong ones are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_and_token_come_from_files() -> Result<()> {
    let site = site()?;
    let file = |name: &str, text: &str| -> Result<PathBuf> {
        let p = site.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    let nats = NatsServer::start_with(
        r#"authorization { users = [ {user: admin, password: admin-pw}, {user: gateway, password: "gw pw"} ] }"#,
    )
    .await?;
    let admin =
        async_nats::ConnectOptions::with_user_and_password("admin".into(), "admin-pw".into())
            .connect(&nats.url)
            .await?;
    let mut users = stream(admin).await?;
    stores_one(
        &Config {
            nats_user_file: Some(file(
                "user", "gateway
",
            )?),
            nats_password_file: Some(file(
                "password", "gw pw
",
            )?),
            ..config(site.path(), &nats.url)
        },
        &mut users,
        "with-password",
    )
    .await?;
    refused(
        &nats,
        "authentication error",
        &Config {
            nats_user_file: Some(file("user", "gateway")?),
            nats_password_file: Some(file("wrong", "not it")?),
            ..config(site.path(), &nats.url)
        },
    )
    .await?;

    let nats = NatsServer::start_with(r#"authorization { token: "t0ken-value" }"#).await?;
    let admin = async_nats::ConnectOptions::with_token("t0ken-value".into())
        .connect(&nats.url)
        .await?;
    let mut tokens = stream(admin).await?;
    stores_one(
        &Config {
            nats_token_file: Some(file(
                "token",
                "t0ken-value
",
            )?),
            ..config(site.path(), &nats.url)
        },
        &mut tokens,
        "with-token",
    )
    .await?;
    // A user file without its password stops the gateway at start, naming
    // the settings.
    let e = start_error(
        start(
            &Config {
                nats_user_file: Some(file("user", "gateway")?),
                ..config(site.path(), &nats.url)
            },
            None,
        )
        .await,
    );
    assert!(
        e.contains("natsUserFile") && e.contains("natsPasswordFile"),
        "{e}"
    );
    Ok(())
}

/// nats-server's NKey users (`authorization { users = [{nkey: U...}] }`)
/// expect the public key in CONNECT; a `.creds` file makes async-nats send
/// the user JWT instead, so such a server refuses it even with the matching
/// seed. Pinned here so the docs' "use operator/JWT mode" stays true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creds_file_is_refused_by_plain_nkey_users() -> Result<()> {
    let user = KeyPair::new_user();
    let nats = NatsServer::start_with(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
        user.public_key()
    ))
    .await?;
    let site = site()?;
    // The same seed works as an NKey: the server is set up right.
    async_nats::ConnectOptions::with_nkey(user.seed()?)
        .connect(&nats.url)
        .await
        .with_context(|| nats.log())?;
    let account = KeyPair::new_account();
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "nkey-user",
        serde_json::json!({"type": "user", "version": 2}),
    );
    let path = site.path().join("nkey.creds");
    std::fs::write(&path, creds(&user_jwt, &user))?;
    refused(
        &nats,
        "authentication error",
        &Config {
            nats_creds_file: Some(path),
            ..config(site.path(), &nats.url)
        },
    )
    .await?;
    Ok(())
}

/// Certificates for a CA, the server (127.0.0.1) and two clients.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Result<Self> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair as RcKey, KeyUsagePurpose,
        };
        let dir = dir.join("pki");
        std::fs::create_dir_all(&dir)?;
        let write = |name: &str, s: String| std::fs::write(dir.join(name), s);

        let ca_key = RcKey::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "spillway test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key)?;
        write("ca.pem", ca_cert.pem())?;
        let issuer = Issuer::new(ca, ca_key);

        let server_key = RcKey::generate()?;
        let mut server = CertificateParams::new(vec![
            "127.0.0.1".into(),
            "localhost".into(),
            // The Service name `spillway --port-forward` checks.
            "nats.nats.svc".into(),
        ])?;
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        write("server.pem", server.signed_by(&server_key, &issuer)?.pem())?;
        write("server-key.pem", server_key.serialize_pem())?;

        for name in ["client", "other"] {
            let key = RcKey::generate()?;
            let mut client = CertificateParams::new(Vec::<String>::new())?;
            client
                .distinguished_name
                .push(DnType::CommonName, format!("spillway-gateway-{name}"));
            client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            write(
                &format!("{name}.pem"),
                client.signed_by(&key, &issuer)?.pem(),
            )?;
            write(&format!("{name}-key.pem"), key.serialize_pem())?;
        }
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A `tls {}` block requiring client certificates from this CA.
    fn server_config(&self) -> String {
        format!(
            "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 2 }}\n",
            self.path("server.pem"),
            self.path("server-key.pem"),
            self.path("ca.pem")
        )
    }

    /// A `tls {}` block without client certificates.
    fn server_only_config(&self) -> String {
        format!(
            "tls {{ cert_file: {:?}, key_file: {:?}, timeout: 2 }}\n",
            self.path("server.pem"),
            self.path("server-key.pem"),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_verified_with_the_ca_file() -> Result<()> {
    let site = site()?;
    let pki = Pki::new(site.path())?;
    let nats = NatsServer::start_with(&pki.server_only_config()).await?;
    let admin = async_nats::ConnectOptions::new()
        .add_root_certificates(pki.path("ca.pem"))
        .connect(&nats.url)
        .await
        .with_context(|| nats.log())?;
    let mut stream = stream(admin).await?;
    stores_one(
        &Config {
            nats_tls_ca_file: Some(pki.path("ca.pem")),
            nats_tls_required: true,
            ..config(site.path(), &nats.url)
        },
        &mut stream,
        "server-tls",
    )
    .await?;

    // Without the CA file the server's certificate is not trusted.
    refused(
        &nats,
        "TLS handshake error",
        &Config {
            nats_tls_required: true,
            ..config(site.path(), &nats.url)
        },
    )
    .await?;
    Ok(())
}

/// `spillway --port-forward` connects to 127.0.0.1 and checks the
/// server's certificate against the NATS Service's name (with the CA and
/// client certificate from the chart's Secrets): a real nats-server
/// requiring mutual TLS accepts it, and a certificate for another name is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_tls_checks_the_service_name_not_the_local_address() -> Result<()> {
    let site = site()?;
    let pki = Pki::new(site.path())?;
    let nats = NatsServer::start_with(&pki.server_config()).await?;
    let read = |n: &str| std::fs::read(pki.path(n));
    let (ca, cert, key) = (
        read("ca.pem")?,
        read("client.pem")?,
        read("client-key.pem")?,
    );
    let connect = |host: &str| {
        let cfg = spillway_cli::reach::tls_config(host, Some(&ca), Some((&cert, &key)));
        let url = nats.url.clone();
        async move {
            async_nats::ConnectOptions::new()
                .tls_client_config(cfg?)
                .require_tls(true)
                .connection_timeout(Duration::from_secs(3))
                .connect(url)
                .await
                .map_err(anyhow::Error::from)
        }
    };
    let client = connect("nats.nats.svc").await.with_context(|| nats.log())?;
    client.flush().await?;
    let wrong = tokio::time::timeout(Duration::from_secs(10), async {
        let c = connect("other.nats.svc").await?;
        c.flush().await.map_err(anyhow::Error::from)
    })
    .await;
    assert!(
        !matches!(wrong, Ok(Ok(()))),
        "a certificate for nats.nats.svc must not pass for other.nats.svc"
    );
    // No CA: refused before connecting, saying what is needed.
    let e = spillway_cli::reach::tls_config("nats.nats.svc", None, None).unwrap_err();
    assert!(e.to_string().contains("needs the CA"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_ca_and_client_certificate() -> Result<()> {
    let site = site()?;
    let pki = Pki::new(site.path())?;
    let nats = NatsServer::start_with(&pki.server_config()).await?;
    let admin = async_nats::ConnectOptions::new()
        .add_root_certificates(pki.path("ca.pem"))
        .add_client_certificate(pki.path("other.pem"), pki.path("other-key.pem"))
        .connect(&nats.url)
        .await
        .with_context(|| nats.log())?;
    let mut stream = stream(admin).await?;
    let tls = |c: Config| Config {
        nats_tls_ca_file: Some(pki.path("ca.pem")),
        nats_tls_cert_file: Some(pki.path("client.pem")),
        nats_tls_key_file: Some(pki.path("client-key.pem")),
        nats_tls_required: true,
        ..c
    };

    stores_one(&tls(config(site.path(), &nats.url)), &mut stream, "mtls").await?;

    // The CA but no client certificate: the server refuses the handshake.
    refused(
        &nats,
        "TLS handshake error",
        &Config {
            nats_tls_cert_file: None,
            nats_tls_key_file: None,
            ..tls(config(site.path(), &nats.url))
        },
    )
    .await?;

    // A client certificate but no CA file: the system roots do not know the
    // server's certificate, so the gateway refuses the server.
    refused(
        &nats,
        "TLS handshake error",
        &Config {
            nats_tls_ca_file: None,
            ..tls(config(site.path(), &nats.url))
        },
    )
    .await?;

    // A key that belongs to another certificate: refused at start.
    let e = start_error(
        start(
            &Config {
                nats_tls_key_file: Some(pki.path("other-key.pem")),
                ..tls(config(site.path(), &nats.url))
            },
            None,
        )
        .await,
    );
    assert!(e.starts_with("natsTlsKeyFile "), "{e}");
    assert!(e.contains("does not go with natsTlsCertFile"), "{e}");
    assert_eq!(
        stream.info().await?.state.messages,
        1,
        "nothing else stored"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_files_stop_the_start_naming_the_setting_not_the_contents() -> Result<()> {
    let site = site()?;
    let pki = Pki::new(site.path())?;
    let url = "nats://127.0.0.1:1";
    let leak = "SUACSECRETSEEDTHATMUSTNOTAPPEAR";
    let bad = site.path().join("bad.creds");
    std::fs::write(
        &bad,
        format!("-----BEGIN USER NKEY SEED-----\n{leak}\n------END USER NKEY SEED------\n"),
    )?;
    let key_as_ca = pki.path("client-key.pem");
    let key_pem = std::fs::read_to_string(&key_as_ca)?;
    let key_line = key_pem.lines().nth(1).context("key body")?.to_owned();
    let cases = [
        (
            Config {
                nats_creds_file: Some(bad),
                ..config(site.path(), url)
            },
            "natsCredsFile ",
        ),
        (
            Config {
                nats_creds_file: Some(site.path().join("missing.creds")),
                ..config(site.path(), url)
            },
            "natsCredsFile ",
        ),
        (
            Config {
                nats_tls_ca_file: Some(key_as_ca),
                ..config(site.path(), url)
            },
            "natsTlsCaFile ",
        ),
        (
            Config {
                nats_tls_cert_file: Some(pki.path("client.pem")),
                nats_tls_key_file: Some(pki.path("ca.pem")),
                ..config(site.path(), url)
            },
            "natsTlsKeyFile ",
        ),
    ];
    for (config, setting) in cases {
        let e = start_error(start(&config, None).await);
        assert!(e.starts_with(setting), "{e}");
        assert!(!e.contains(leak) && !e.contains(&key_line), "{e}");
    }

    // The binary: the same checks, exit code 1, message on stderr.
    let out = tokio::process::Command::new(spillway_tests::bin_path("spillway-gateway"))
        .args(["--source", "file", "--log-format", "text"])
        .arg("--endpoints-file")
        .arg(site.path().join("endpoints.yaml"))
        .arg("--nats-url")
        .arg(url)
        .env("SPILLWAY_NATS_CREDS_FILE", site.path().join("bad.creds"))
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("natsCredsFile"), "{stderr}");
    assert!(!stderr.contains(leak), "{stderr}");
    if stderr.contains("panicked") {
        bail!("{stderr}");
    }
    Ok(())
}

/// The real processor binary with the gateway's flags (as environment
/// variables): CA file, client certificate and key, TLS required. It
/// connects to a nats-server that insists on client certificates and
/// delivers a stored webhook; without a client certificate the server
/// refuses it, and unusable files stop it at start naming the flag. The
/// CLI connects with the same variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_delivers_over_mutual_tls() -> Result<()> {
    use crate::processor_support::{Endpoint, ProcessorProc, Setup, Sink};
    use std::ffi::OsStr;

    let site = site()?;
    let pki = Pki::new(site.path())?;
    let nats = NatsServer::start_with(&pki.server_config()).await?;
    let admin = async_nats::ConnectOptions::new()
        .add_root_certificates(pki.path("ca.pem"))
        .add_client_certificate(pki.path("other.pem"), pki.path("other-key.pem"))
        .connect(&nats.url)
        .await
        .with_context(|| nats.log())?;
    let ep = Endpoint::create(jetstream::new(admin), Setup::default()).await?;
    let sink = Sink::start().await?;
    let config = ep.config(&sink.url);
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client-key.pem"),
    );
    let tls: [(&str, &OsStr); 4] = [
        ("SPILLWAY_NATS_TLS_CA_FILE", ca.as_os_str()),
        ("SPILLWAY_NATS_TLS_CERT_FILE", cert.as_os_str()),
        ("SPILLWAY_NATS_TLS_KEY_FILE", key.as_os_str()),
        ("SPILLWAY_NATS_TLS_REQUIRED", OsStr::new("true")),
    ];

    let processor = ProcessorProc::spawn_with_env(&config, &nats.url, &tls)?;
    processor.wait_ready().await?;
    ep.publish("over-mtls", None, r#"{"zen":"mtls"}"#).await?;
    eventually(Duration::from_secs(10), "delivered over mTLS", || async {
        sink.delivered_ids().contains("over-mtls")
    })
    .await
    .with_context(|| processor.log_text())?;
    drop(processor);

    // The CLI, with the same flags: lists the (empty) dead letters over
    // mutual TLS; without the client certificate it cannot connect.
    let cli_env: Vec<(&str, &str)> = tls
        .iter()
        .map(|(k, v)| Ok((*k, v.to_str().context("UTF-8 path")?)))
        .collect::<Result<_>>()?;
    let args = ["dlq", "list", "default/hooks", "-o", "json", "--nats-url"];
    let args: Vec<&str> = args.into_iter().chain([nats.url.as_str()]).collect();
    let list = crate::processor_support::spillway_ok(&args, &cli_env).await?;
    let v: serde_json::Value = serde_json::from_str(&list.stdout)?;
    assert_eq!(v["total"], 0, "{}", list.stdout);
    let out = crate::processor_support::spillway(&args, &cli_env[..1]).await?;
    assert!(!out.success, "{}", out.stdout);
    assert!(out.stderr.contains("connecting to NATS"), "{}", out.stderr);

    // The CA but no client certificate: the server refuses the handshake
    // and the processor exits.
    let before = nats.log().matches("TLS handshake error").count();
    let mut refused = ProcessorProc::spawn_with_env(&config, &nats.url, &tls[..1])?;
    let status = refused.wait_exit(Duration::from_secs(15)).await?;
    assert!(!status.success(), "{}", refused.log_text());
    eventually(
        Duration::from_secs(5),
        "the server logged the refused handshake",
        || async { nats.log().matches("TLS handshake error").count() > before },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", nats.log()))?;

    // Unusable files stop it at start, naming the flag: a key that belongs
    // to another certificate, and a credentials file (by the older variable
    // SPILLWAY_NATS_CREDS the operator used to render) that is not there.
    let other_key = pki.path("other-key.pem");
    let missing = site.path().join("missing.creds");
    let cases: [(Vec<(&str, &OsStr)>, &str); 2] = [
        (
            vec![
                tls[0],
                tls[1],
                ("SPILLWAY_NATS_TLS_KEY_FILE", other_key.as_os_str()),
            ],
            "--nats-tls-key-file ",
        ),
        (
            vec![("SPILLWAY_NATS_CREDS", missing.as_os_str())],
            "--nats-creds-file ",
        ),
    ];
    for (env, flag) in cases {
        let mut p = ProcessorProc::spawn_with_env(&config, &nats.url, &env)?;
        let status = p.wait_exit(Duration::from_secs(15)).await?;
        let log = p.log_text();
        assert!(!status.success(), "{log}");
        assert!(log.contains(flag), "{log}");
        assert!(!log.contains("PRIVATE KEY"), "{log}");
    }
    assert_eq!(sink.count(), 1, "one delivery, once");
    Ok(())
}

/// Encryption at rest: with JetStream's store encryption (`cipher:
/// chachapoly`), a stored webhook's body is nowhere in the store's files;
/// the same check without encryption finds it (so the scan works).
#[tokio::test]
async fn an_encrypted_store_holds_no_plaintext_body() -> Result<()> {
    const MARKER: &[u8] = b"spillway-plaintext-marker-4f1c9e";
    fn contains(dir: &Path, needle: &[u8]) -> bool {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                let p = e.path();
                if p.is_dir() {
                    contains(&p, needle)
                } else {
                    std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
                }
            })
    }
    for encrypted in [false, true] {
        let mut nats = if encrypted {
            NatsServer::start_encrypted("a-test-key-of-the-harness-only-0123456789").await?
        } else {
            NatsServer::start().await?
        };
        let js = nats.jetstream().await?;
        let names = EndpointNames::new("team", "enc");
        js.create_stream(jetstream::stream::Config {
            name: names.stream(),
            subjects: vec![names.stream_subjects()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        let mut body = br#"{"card":""#.to_vec();
        body.extend_from_slice(MARKER);
        body.extend_from_slice(br#""}"#);
        js.publish(names.subject(0), body.into()).await?.await?;
        // Killed: what is on disk is what a stolen volume would show.
        nats.stop();
        assert_eq!(
            contains(&nats.store_dir(), MARKER),
            !encrypted,
            "encrypted: {encrypted}"
        );
    }
    Ok(())
}
