//! Acceptance: the spec's own checks, the Secrets it references (one
//! parse rule with the gateway and the processor), and the path it claims.

use super::*;

/// Why an endpoint is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// `PathConflict`, `SecretNotFound`, `SecretKeyMissing` or `InvalidSpec`.
    pub reason: Reason,
    /// What to do about it.
    pub message: String,
}

/// The effective path of an endpoint (one rule with the gateway:
/// [`WebhookEndpoint::effective_path`]).
pub fn effective_path(ep: &WebhookEndpoint) -> String {
    ep.effective_path()
}

/// The older of two endpoints keeps a contested path (ranked by
/// [`path_precedence`], as in the gateway). Returns the endpoint in `others`
/// that holds `ep`'s path, if any.
pub fn path_holder<'a>(
    ep: &WebhookEndpoint,
    others: &'a [Arc<WebhookEndpoint>],
) -> Option<&'a WebhookEndpoint> {
    let path = effective_path(ep);
    let mine = precedence(ep);
    others
        .iter()
        .map(|o| o.as_ref())
        .filter(|o| o.uid() != ep.uid() && o.metadata.deletion_timestamp.is_none())
        .filter(|o| effective_path(o) == path)
        .filter(|o| precedence(o) < mine)
        .min_by_key(|o| precedence(o))
}

pub(super) fn precedence(e: &WebhookEndpoint) -> (i64, &str, &str) {
    path_precedence(
        e.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
        e.metadata.namespace.as_deref().unwrap_or_default(),
        e.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Every Secret reference of the spec, with where it is referenced (one
/// list with the gateway: [`WebhookEndpointSpec::secret_refs`]).
pub fn secret_refs(ep: &WebhookEndpoint) -> Vec<(String, &SecretKeyRef)> {
    ep.spec.secret_refs()
}

/// Why processor pods cannot start for want of a NATS Secret of the
/// operator's settings (`found`: that Secret in namespace `ns`, if it
/// exists): a `ProcessorReady` reason and message, or `None` when it is
/// there with every key.
pub fn processor_secret_problem(
    ns: &str,
    wanted: &render::ProcessorSecret,
    found: Option<&Secret>,
) -> Option<(Reason, String)> {
    let Some(s) = found else {
        return Some((
            Reason::NatsSecretNotFound,
            format!(
                "Secret {ns}/{} (operator setting {}) does not exist: processor pods cannot start until it does",
                wanted.name, wanted.flag
            ),
        ));
    };
    let missing: Vec<&str> = wanted
        .keys
        .iter()
        .filter(|k| {
            !(s.data.as_ref().is_some_and(|d| d.contains_key(*k))
                || s.string_data.as_ref().is_some_and(|d| d.contains_key(*k)))
        })
        .map(String::as_str)
        .collect();
    (!missing.is_empty()).then(|| {
        (
            Reason::NatsSecretKeyMissing,
            format!(
                "Secret {ns}/{} (operator setting {}) has no key {}: processor pods cannot start until it does",
                wanted.name,
                wanted.flag,
                missing.join(", ")
            ),
        )
    })
}

/// Why Secret `found` (in `ns`; `None`: it does not exist) cannot serve
/// `r`, referenced by `field` (`whsec`: the value is a Standard Webhooks
/// key): the `Accepted=False` reason and message, or `None` when it can.
/// The value is parsed as the gateway and the processor parse it.
pub fn secret_ref_problem(
    ns: &str,
    field: &str,
    r: &SecretKeyRef,
    found: Option<&Secret>,
    whsec: bool,
) -> Option<(Reason, String)> {
    let Some(s) = found else {
        return Some((
            Reason::SecretNotFound,
            format!(
                "Secret {ns}/{} (referenced by {field}) does not exist",
                r.name
            ),
        ));
    };
    let value = s
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|v| v.0.as_slice())
        .or_else(|| {
            s.string_data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .map(|v| v.as_bytes())
        });
    let Some(value) = value else {
        return Some((
            Reason::SecretKeyMissing,
            format!(
                "Secret {ns}/{} has no key {:?} (referenced by {field})",
                r.name, r.key
            ),
        ));
    };
    match spillway_api::secret::key(value, whsec) {
        Ok(_) => None,
        Err(spillway_api::secret::KeyError::Empty) => Some((
            Reason::SecretKeyEmpty,
            format!(
                "Secret {ns}/{} key {:?} (referenced by {field}) is empty; \
                 the gateway does not use it (requests are answered 503 while no \
                 secret of the endpoint has a value); put the secret in it",
                r.name, r.key
            ),
        )),
        Err(spillway_api::secret::KeyError::Whsec) => Some((
            Reason::SecretKeyInvalid,
            format!(
                "Secret {ns}/{} key {:?} (referenced by {field}) starts with \
                 whsec_ but the rest is not valid base64; the gateway cannot \
                 use it (requests are answered 503); put the key as the \
                 provider shows it, whsec_ followed by base64",
                r.name, r.key
            ),
        )),
    }
}

pub(super) async fn accept(
    ep: &WebhookEndpoint,
    ctx: &Context,
) -> Result<Result<Timings, Rejection>, Error> {
    let timings = match check(&ep.spec) {
        Ok(t) => t,
        Err(problems) => {
            return Ok(Err(Rejection {
                reason: Reason::InvalidSpec,
                message: problems.join("; "),
            }));
        }
    };
    if let Err(message) = render::user_template(ep) {
        return Ok(Err(Rejection {
            reason: Reason::InvalidSpec,
            message,
        }));
    }
    let ns = ep.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut fetched: HashMap<String, Option<Secret>> = HashMap::new();
    for (field, r) in secret_refs(ep) {
        if !fetched.contains_key(&r.name) {
            fetched.insert(r.name.clone(), secrets.get_opt(&r.name).await?);
        }
        let whsec = field == "processor.signing.secretRef"
            || (field.starts_with("verification.")
                && ep.spec.verification.scheme == Scheme::StandardWebhooks);
        if let Some((reason, message)) =
            secret_ref_problem(&ns, &field, r, fetched[&r.name].as_ref(), whsec)
        {
            return Ok(Err(Rejection { reason, message }));
        }
    }
    // Judge paths only on a complete view of the endpoints.
    let _ = tokio::time::timeout(STORE_WAIT, ctx.endpoints.wait_until_ready()).await;
    if let Some(holder) = path_holder(ep, &ctx.endpoints.state()) {
        return Ok(Err(Rejection {
            reason: Reason::PathConflict,
            message: format!(
                "path {} is already served by the older endpoint {}; set a different spec.path",
                effective_path(ep),
                key(holder)
            ),
        }));
    }
    Ok(Ok(timings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::ep;

    #[test]
    fn processor_nats_secrets_are_judged_by_name_and_keys() {
        let mut s = Settings::defaults();
        assert!(render::processor_nats_secrets(&s).is_empty());
        s.processor_nats_tls_ca_secret = Some("ca".into());
        s.processor_nats_tls_client_secret = Some("client".into());
        let wanted = render::processor_nats_secrets(&s);
        assert_eq!(
            wanted.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
            ["ca", "client"]
        );
        let secret = |keys: &[&str]| -> Secret {
            serde_json::from_value(json!({
                "metadata": {"name": "x"},
                "data": keys.iter().map(|k| (k.to_string(), "c2VjcmV0")).collect::<std::collections::BTreeMap<_, _>>(),
            }))
            .unwrap()
        };
        let (reason, msg) = processor_secret_problem("team", &wanted[0], None).unwrap();
        assert_eq!(reason, Reason::NatsSecretNotFound);
        assert!(msg.contains("team/ca"), "{msg}");
        assert!(msg.contains("--processor-nats-tls-ca-secret"), "{msg}");
        assert_eq!(
            processor_secret_problem("team", &wanted[0], Some(&secret(&["ca.crt"]))),
            None
        );
        let (reason, msg) =
            processor_secret_problem("team", &wanted[1], Some(&secret(&["tls.crt"]))).unwrap();
        assert_eq!(reason, Reason::NatsSecretKeyMissing);
        assert!(
            msg.contains("tls.key") && !msg.contains("c2VjcmV0"),
            "{msg}"
        );
        assert_eq!(
            processor_secret_problem("team", &wanted[1], Some(&secret(&["tls.crt", "tls.key"]))),
            None
        );
    }

    #[test]
    fn older_endpoint_keeps_the_path() {
        let a = ep("a", "x", 100, Some("/p"));
        let b = ep("b", "y", 200, Some("/p"));
        let c = ep("c", "z", 50, Some("/other"));
        let all = vec![a.clone(), b.clone(), c.clone()];
        assert!(path_holder(&a, &all).is_none());
        assert_eq!(path_holder(&b, &all).map(key), Some("a/x".into()));
        assert!(path_holder(&c, &all).is_none());
        // Same creation time: the namespace, then the name decides (as a
        // tuple, not as the string "ns/name": "a-b" sorts after "a").
        let e = ep("a-b", "x", 100, Some("/p"));
        let all = vec![a.clone(), e.clone()];
        assert_eq!(path_holder(&e, &all).map(key), Some("a/x".into()));
        // Same creation time and namespace: the name decides.
        let d = ep("a", "w", 100, Some("/p"));
        let all = vec![a.clone(), d.clone()];
        assert_eq!(path_holder(&a, &all).map(key), Some("a/w".into()));
        assert!(path_holder(&d, &all).is_none());
        // Default paths never collide across names.
        assert_eq!(effective_path(&ep("n", "m", 1, None)), "/n/m");
    }

    #[test]
    fn every_secret_reference_is_checked() {
        let mut e = (*ep("ns", "x", 1, None)).clone();
        e.spec.verification = serde_saphyr::from_str(
            "{scheme: stripe, secretRefs: [{name: a, key: k1}, {name: b, key: k2}]}",
        )
        .unwrap();
        e.spec.handshake = Some(
            serde_saphyr::from_str(
                "{type: metaHubChallenge, verifyTokenSecretRef: {name: c, key: t}, secretRef: {name: d, key: z}}",
            )
            .unwrap(),
        );
        e.spec.processor.signing =
            Some(serde_saphyr::from_str("{secretRef: {name: e, key: s}}").unwrap());
        let refs: Vec<(String, String)> = secret_refs(&e)
            .into_iter()
            .map(|(field, r)| (field, r.name.clone()))
            .collect();
        let fields: Vec<&str> = refs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "verification.secretRefs[0]",
                "verification.secretRefs[1]",
                "handshake.verifyTokenSecretRef",
                "handshake.secretRef",
                "processor.signing.secretRef"
            ]
        );
        assert_eq!(refs[4].1, "e");
    }
}
