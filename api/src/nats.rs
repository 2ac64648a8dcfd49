//! NATS connection options shared by the gateway, operator, processor and
//! CLI: credentials file, CA file, client certificate for mutual TLS and
//! `require_tls` (cargo feature `nats`).
//!
//! Every file is read and checked before connecting, so a missing or
//! malformed file stops a component at start with the setting's name, never
//! with the file's contents.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Which credentials and TLS files to connect to NATS with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsAuth {
    /// Credentials file (user JWT + NKey seed, `.creds`).
    pub creds_file: Option<PathBuf>,
    /// PEM file of CA certificates to verify the server with (instead of
    /// the system roots).
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS; needs `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Refuse plaintext connections.
    pub tls_required: bool,
    /// File holding a token (a mounted Secret key; never a flag's value or
    /// a URL, which would show in `ps`, logs or pod specs).
    pub token_file: Option<PathBuf>,
    /// File holding a user name; needs `password_file`.
    pub user_file: Option<PathBuf>,
    /// File holding that user's password; needs `user_file`.
    pub password_file: Option<PathBuf>,
}

/// The environment variables of the NATS settings: one spelling for every
/// component (the operator renders them into processor pods).
pub mod env {
    /// [`NatsArgs::url`](super::NatsArgs::url).
    pub const URL: &str = "SPILLWAY_NATS_URL";
    /// [`NatsArgs::creds_file`](super::NatsArgs::creds_file).
    pub const CREDS_FILE: &str = "SPILLWAY_NATS_CREDS_FILE";
    /// [`NatsArgs::token_file`](super::NatsArgs::token_file).
    pub const TOKEN_FILE: &str = "SPILLWAY_NATS_TOKEN_FILE";
    /// [`NatsArgs::user_file`](super::NatsArgs::user_file).
    pub const USER_FILE: &str = "SPILLWAY_NATS_USER_FILE";
    /// [`NatsArgs::password_file`](super::NatsArgs::password_file).
    pub const PASSWORD_FILE: &str = "SPILLWAY_NATS_PASSWORD_FILE";
    /// [`NatsArgs::tls_ca_file`](super::NatsArgs::tls_ca_file).
    pub const TLS_CA_FILE: &str = "SPILLWAY_NATS_TLS_CA_FILE";
    /// [`NatsArgs::tls_cert_file`](super::NatsArgs::tls_cert_file).
    pub const TLS_CERT_FILE: &str = "SPILLWAY_NATS_TLS_CERT_FILE";
    /// [`NatsArgs::tls_key_file`](super::NatsArgs::tls_key_file).
    pub const TLS_KEY_FILE: &str = "SPILLWAY_NATS_TLS_KEY_FILE";
    /// [`NatsArgs::tls_required`](super::NatsArgs::tls_required).
    pub const TLS_REQUIRED: &str = "SPILLWAY_NATS_TLS_REQUIRED";
}

/// The NATS connection flags every component takes, declared once
/// (`#[command(flatten)]` into the operator's, gateway's, processor's and
/// CLI's arguments). Each component picks its own default URL
/// ([`url_or`](Self::url_or)). The flags are `global`, so the CLI takes
/// them after a subcommand too.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
#[command(next_help_heading = "NATS")]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long = "nats-url", id = "nats_url", env = env::URL, global = true)]
    pub url: Option<String>,
    /// NATS credentials file (user JWT + NKey seed, `.creds`); `--nats-creds`
    /// is the older spelling.
    #[arg(
        long = "nats-creds-file",
        id = "nats_creds_file",
        alias = "nats-creds",
        env = env::CREDS_FILE,
        global = true
    )]
    pub creds_file: Option<PathBuf>,
    /// File holding a NATS token (a mounted Secret key).
    #[arg(long = "nats-token-file", id = "nats_token_file", env = env::TOKEN_FILE, global = true)]
    pub token_file: Option<PathBuf>,
    /// File holding a NATS user name; needs the password file.
    #[arg(
        long = "nats-user-file",
        id = "nats_user_file",
        env = env::USER_FILE,
        requires = "nats_password_file",
        global = true
    )]
    pub user_file: Option<PathBuf>,
    /// File holding that NATS user's password.
    #[arg(
        long = "nats-password-file",
        id = "nats_password_file",
        env = env::PASSWORD_FILE,
        requires = "nats_user_file",
        global = true
    )]
    pub password_file: Option<PathBuf>,
    /// PEM file of CA certificates to verify the NATS server with (instead
    /// of the system roots).
    #[arg(long = "nats-tls-ca-file", id = "nats_tls_ca_file", env = env::TLS_CA_FILE, global = true)]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for NATS mutual TLS; needs the key too.
    #[arg(
        long = "nats-tls-cert-file",
        id = "nats_tls_cert_file",
        env = env::TLS_CERT_FILE,
        requires = "nats_tls_key_file",
        global = true
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// Client key (PEM) for NATS mutual TLS.
    #[arg(
        long = "nats-tls-key-file",
        id = "nats_tls_key_file",
        env = env::TLS_KEY_FILE,
        requires = "nats_tls_cert_file",
        global = true
    )]
    pub tls_key_file: Option<PathBuf>,
    /// Refuse to talk to NATS without TLS (`--nats-tls-required` alone
    /// means true; `=false` overrides a configuration file).
    #[arg(
        long = "nats-tls-required",
        id = "nats_tls_required",
        env = env::TLS_REQUIRED,
        num_args = 0..=1,
        default_missing_value = "true",
        global = true
    )]
    pub tls_required: Option<bool>,
}

impl NatsArgs {
    /// The URL, or `default` when none was given.
    pub fn url_or(&self, default: &str) -> String {
        self.url.clone().unwrap_or_else(|| default.to_owned())
    }

    /// The credentials and TLS files to connect with.
    pub fn auth(&self) -> NatsAuth {
        NatsAuth {
            creds_file: self.creds_file.clone(),
            tls_ca_file: self.tls_ca_file.clone(),
            tls_cert_file: self.tls_cert_file.clone(),
            tls_key_file: self.tls_key_file.clone(),
            tls_required: self.tls_required.unwrap_or(false),
            token_file: self.token_file.clone(),
            user_file: self.user_file.clone(),
            password_file: self.password_file.clone(),
        }
    }
}

/// How a component spells the settings of [`NatsAuth`] in its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingNames {
    /// [`NatsAuth::creds_file`].
    pub creds_file: &'static str,
    /// [`NatsAuth::tls_ca_file`].
    pub tls_ca_file: &'static str,
    /// [`NatsAuth::tls_cert_file`].
    pub tls_cert_file: &'static str,
    /// [`NatsAuth::tls_key_file`].
    pub tls_key_file: &'static str,
    /// [`NatsAuth::token_file`].
    pub token_file: &'static str,
    /// [`NatsAuth::user_file`].
    pub user_file: &'static str,
    /// [`NatsAuth::password_file`].
    pub password_file: &'static str,
}

impl SettingNames {
    /// As spelled in the gateway's config file (`natsCredsFile`, ...).
    pub const CONFIG_FILE: Self = Self {
        creds_file: "natsCredsFile",
        tls_ca_file: "natsTlsCaFile",
        tls_cert_file: "natsTlsCertFile",
        tls_key_file: "natsTlsKeyFile",
        token_file: "natsTokenFile",
        user_file: "natsUserFile",
        password_file: "natsPasswordFile",
    };
    /// As spelled on the command line (`--nats-creds-file`, ...).
    pub const FLAGS: Self = Self {
        creds_file: "--nats-creds-file",
        tls_ca_file: "--nats-tls-ca-file",
        tls_cert_file: "--nats-tls-cert-file",
        tls_key_file: "--nats-tls-key-file",
        token_file: "--nats-token-file",
        user_file: "--nats-user-file",
        password_file: "--nats-password-file",
    };
}

/// A NATS credentials or TLS file is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{setting} {}: {reason}", path.display())]
pub struct NatsFileError {
    /// The setting, as the component spells it (e.g. `natsCredsFile`).
    pub setting: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong (an I/O error or a fixed description; never contents).
    pub reason: String,
}

fn file_error(setting: &'static str, path: &Path, reason: impl Into<String>) -> NatsFileError {
    NatsFileError {
        setting,
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, NatsFileError> {
    std::fs::read(path).map_err(|e| file_error(setting, path, format!("cannot read: {e}")))
}

fn certificates(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, NatsFileError> {
    let pem = read(setting, path)?;
    // The PEM parser's errors can quote a line of the file: report a fixed
    // reason instead.
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| file_error(setting, path, "not a valid PEM file"))?;
    if certs.is_empty() {
        return Err(file_error(setting, path, "no PEM CERTIFICATE found"));
    }
    Ok(certs)
}

impl NatsAuth {
    /// Whether nothing is set (plain connection, no credentials).
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// Connect options with these files, checking every one: the
    /// credentials file must hold a user JWT and NKey seed, the CA file at
    /// least one certificate, the client certificate and key must parse and
    /// belong together (one without the other is refused). Errors name the
    /// setting as `names` spells it. Callers add name, reconnect policy and
    /// the like to the returned options.
    pub fn connect_options(
        &self,
        names: SettingNames,
    ) -> Result<async_nats::ConnectOptions, NatsFileError> {
        let mut opts = async_nats::ConnectOptions::new();
        if let Some(path) = &self.creds_file {
            let setting = names.creds_file;
            let bytes = read(setting, path)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| file_error(setting, path, "not a text (.creds) file"))?;
            // async-nats' parse errors name what is missing, not the contents.
            opts = opts
                .credentials(&text)
                .map_err(|e| file_error(setting, path, e.to_string()))?;
        }
        // Secret values: the one rule of crate::secret (surrounding
        // whitespace is not part of them).
        let secret_text = |setting: &'static str, path: &Path| {
            let bytes = read(setting, path)?;
            let v = crate::secret::value(&bytes);
            if v.is_empty() {
                return Err(file_error(setting, path, "is empty"));
            }
            String::from_utf8(v.to_vec()).map_err(|_| file_error(setting, path, "is not UTF-8"))
        };
        if let Some(path) = &self.token_file {
            opts = opts.token(secret_text(names.token_file, path)?);
        }
        match (&self.user_file, &self.password_file) {
            (Some(user), Some(password)) => {
                opts = opts.user_and_password(
                    secret_text(names.user_file, user)?,
                    secret_text(names.password_file, password)?,
                );
            }
            (Some(user), None) => {
                return Err(file_error(
                    names.user_file,
                    user,
                    format!("needs {}", names.password_file),
                ));
            }
            (None, Some(password)) => {
                return Err(file_error(
                    names.password_file,
                    password,
                    format!("needs {}", names.user_file),
                ));
            }
            (None, None) => {}
        }
        if let Some(path) = &self.tls_ca_file {
            certificates(names.tls_ca_file, path)?;
            opts = opts.add_root_certificates(path.clone());
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates(names.tls_cert_file, cert)?;
                let key_pem = read(names.tls_key_file, key)?;
                let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|_| file_error(names.tls_key_file, key, "no PEM private key found"))?;
                // Refuse a key that does not belong to the certificate now
                // rather than on every connection attempt.
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| file_error(names.tls_cert_file, cert, e.to_string()))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| {
                    file_error(
                        names.tls_key_file,
                        key,
                        format!("does not go with {}: {e}", names.tls_cert_file),
                    )
                })?;
                opts = opts.add_client_certificate(cert.clone(), key.clone());
            }
            (Some(cert), None) => {
                return Err(file_error(
                    names.tls_cert_file,
                    cert,
                    format!("needs {}", names.tls_key_file),
                ));
            }
            (None, Some(key)) => {
                return Err(file_error(
                    names.tls_key_file,
                    key,
                    format!("needs {}", names.tls_cert_file),
                ));
            }
            (None, None) => {}
        }
        if self.tls_required {
            opts = opts.require_tls(true);
        }
        Ok(opts)
    }
}

/// The servers of a `--nats-url` value: one URL, or several separated by
/// commas (seeds of a cluster; the client learns the others from the
/// servers). Every component parses it with this.
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| u.parse().map_err(|e| format!("{e}")))
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.is_empty() {
                Err("no NATS server URL given".to_owned())
            } else {
                Ok(v)
            }
        })
}

/// A `--nats-url` value fit for logs: each URL's user, password or token
/// (`nats://user:pass@host`) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let u = u.trim();
            let (scheme, rest) = u.split_once("://").unwrap_or(("", u));
            let host_start = rest.find('/').unwrap_or(rest.len());
            match rest[..host_start].rfind('@') {
                Some(at) => {
                    let sep = if scheme.is_empty() { "" } else { "://" };
                    format!("{scheme}{sep}***@{}", &rest[at + 1..])
                }
                None => u.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether a `--nats-url` value carries credentials (user, password or
/// token) in one of its URLs.
pub fn url_has_credentials(url: &str) -> bool {
    redact_url(url).contains("***@")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_and_user_password_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            Some(p)
        };
        let ok = NatsAuth {
            token_file: file("token", "s3cret-token\n"),
            ..NatsAuth::default()
        };
        ok.connect_options(SettingNames::FLAGS).unwrap();
        let ok = NatsAuth {
            user_file: file("user", "gateway"),
            password_file: file("password", "pw\n"),
            ..NatsAuth::default()
        };
        ok.connect_options(SettingNames::FLAGS).unwrap();
        let e = NatsAuth {
            user_file: file("user", "gateway"),
            ..NatsAuth::default()
        }
        .connect_options(SettingNames::FLAGS)
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--nats-user-file") && e.contains("needs --nats-password-file"),
            "{e}"
        );
        let e = NatsAuth {
            token_file: file("empty", " \n"),
            ..NatsAuth::default()
        }
        .connect_options(SettingNames::CONFIG_FILE)
        .unwrap_err()
        .to_string();
        assert!(e.contains("natsTokenFile") && e.contains("is empty"), "{e}");
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(redact_url("nats://a:4222"), "nats://a:4222");
        assert_eq!(
            redact_url("nats://user:s3cret@a:4222, tls://tok@b:4222"),
            "nats://***@a:4222,tls://***@b:4222"
        );
        assert_eq!(redact_url("u:p@a:4222"), "***@a:4222");
        assert!(!redact_url("nats://user:s3cret@a:4222").contains("s3cret"));
        assert!(url_has_credentials("nats://a:1,nats://t@b:1"));
        assert!(!url_has_credentials("nats://a:1,nats://b:1"));
    }

    #[test]
    fn server_lists_split_on_commas() {
        assert_eq!(server_addrs("nats://a:4222").unwrap().len(), 1);
        assert_eq!(
            server_addrs("nats://a:4222, nats://b:4222,nats://c:4222")
                .unwrap()
                .len(),
            3
        );
        assert!(server_addrs("").is_err());
        assert!(server_addrs("nats://a:notaport").is_err());
    }

    /// A CA certificate, a client certificate it signed with its key, and
    /// a second key, all PEM.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            use rcgen::{
                BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
            };
            let dir = tempfile::tempdir().unwrap();
            let write = |name: &str, s: String| std::fs::write(dir.path().join(name), s).unwrap();
            let ca_key = KeyPair::generate().unwrap();
            let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.distinguished_name.push(DnType::CommonName, "test CA");
            ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
            let issuer = Issuer::new(ca, ca_key);
            let key = KeyPair::generate().unwrap();
            let client = CertificateParams::new(Vec::<String>::new()).unwrap();
            write("client.pem", client.signed_by(&key, &issuer).unwrap().pem());
            write("client-key.pem", key.serialize_pem());
            write(
                "other-key.pem",
                KeyPair::generate().unwrap().serialize_pem(),
            );
            let user = nkeys::KeyPair::new_user();
            write(
                "user.creds",
                format!(
                    "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
                    user.seed().unwrap()
                ),
            );
            Self { dir }
        }

        fn path(&self, name: &str) -> Option<PathBuf> {
            Some(self.dir.path().join(name))
        }

        fn text(&self, name: &str) -> String {
            std::fs::read_to_string(self.dir.path().join(name)).unwrap()
        }
    }

    fn err(auth: &NatsAuth, names: SettingNames) -> String {
        match auth.connect_options(names) {
            Ok(_) => panic!("{auth:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn usable_files_are_accepted() {
        let f = Files::new();
        assert!(NatsAuth::default().is_empty());
        NatsAuth::default()
            .connect_options(SettingNames::FLAGS)
            .unwrap();
        let auth = NatsAuth {
            creds_file: f.path("user.creds"),
            tls_ca_file: f.path("ca.pem"),
            tls_cert_file: f.path("client.pem"),
            tls_key_file: f.path("client-key.pem"),
            tls_required: true,
            ..NatsAuth::default()
        };
        assert!(!auth.is_empty());
        auth.connect_options(SettingNames::CONFIG_FILE).unwrap();
    }

    #[test]
    fn missing_files_name_the_setting() {
        let f = Files::new();
        let e = err(
            &NatsAuth {
                creds_file: f.path("missing.creds"),
                ..NatsAuth::default()
            },
            SettingNames::FLAGS,
        );
        assert!(e.starts_with("--nats-creds-file "), "{e}");
        assert!(e.contains("cannot read"), "{e}");
        let e = err(
            &NatsAuth {
                tls_ca_file: f.path("missing-ca.pem"),
                ..NatsAuth::default()
            },
            SettingNames::CONFIG_FILE,
        );
        assert!(e.starts_with("natsTlsCaFile "), "{e}");
        assert!(e.contains("cannot read"), "{e}");
        let e = err(
            &NatsAuth {
                tls_cert_file: f.path("client.pem"),
                tls_key_file: f.path("missing-key.pem"),
                ..NatsAuth::default()
            },
            SettingNames::CONFIG_FILE,
        );
        assert!(e.starts_with("natsTlsKeyFile "), "{e}");
    }

    #[test]
    fn certificate_and_key_go_together() {
        let f = Files::new();
        let e = err(
            &NatsAuth {
                tls_cert_file: f.path("client.pem"),
                ..NatsAuth::default()
            },
            SettingNames::CONFIG_FILE,
        );
        assert!(e.starts_with("natsTlsCertFile "), "{e}");
        assert!(e.ends_with("needs natsTlsKeyFile"), "{e}");
        let e = err(
            &NatsAuth {
                tls_key_file: f.path("client-key.pem"),
                ..NatsAuth::default()
            },
            SettingNames::FLAGS,
        );
        assert!(e.starts_with("--nats-tls-key-file "), "{e}");
        assert!(e.ends_with("needs --nats-tls-cert-file"), "{e}");
        let e = err(
            &NatsAuth {
                tls_cert_file: f.path("client.pem"),
                tls_key_file: f.path("other-key.pem"),
                ..NatsAuth::default()
            },
            SettingNames::CONFIG_FILE,
        );
        assert!(e.starts_with("natsTlsKeyFile "), "{e}");
        assert!(e.contains("does not go with natsTlsCertFile"), "{e}");
    }

    #[test]
    fn malformed_files_are_refused_without_their_contents() {
        let f = Files::new();
        let leak = "SUACSECRETSEEDTHATMUSTNOTAPPEAR";
        std::fs::write(
            f.dir.path().join("bad.creds"),
            format!("-----BEGIN USER NKEY SEED-----\n{leak}\n------END USER NKEY SEED------\n"),
        )
        .unwrap();
        std::fs::write(f.dir.path().join("binary.creds"), [0xff, 0xfe, 0x00]).unwrap();
        let key_pem = f.text("client-key.pem");
        let key_line = key_pem.lines().nth(1).unwrap();
        let ca_line = f.text("ca.pem").lines().nth(1).unwrap().to_owned();
        let cases = [
            (
                NatsAuth {
                    creds_file: f.path("bad.creds"),
                    ..NatsAuth::default()
                },
                "natsCredsFile ",
            ),
            (
                NatsAuth {
                    creds_file: f.path("binary.creds"),
                    ..NatsAuth::default()
                },
                "natsCredsFile ",
            ),
            (
                // A key where the CA should be: no certificate in it.
                NatsAuth {
                    tls_ca_file: f.path("client-key.pem"),
                    ..NatsAuth::default()
                },
                "natsTlsCaFile ",
            ),
            (
                NatsAuth {
                    tls_cert_file: f.path("client-key.pem"),
                    tls_key_file: f.path("client-key.pem"),
                    ..NatsAuth::default()
                },
                "natsTlsCertFile ",
            ),
            (
                // A certificate where the key should be.
                NatsAuth {
                    tls_cert_file: f.path("client.pem"),
                    tls_key_file: f.path("ca.pem"),
                    ..NatsAuth::default()
                },
                "natsTlsKeyFile ",
            ),
        ];
        for (auth, setting) in cases {
            let e = err(&auth, SettingNames::CONFIG_FILE);
            assert!(e.starts_with(setting), "{e}");
            assert!(
                !e.contains(leak) && !e.contains(key_line) && !e.contains(&ca_line),
                "{e}"
            );
        }
    }
}
