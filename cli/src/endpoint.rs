//! `ENDPOINT` arguments: `name` or `namespace/name`.

use spillway_api::names::EndpointNames;

/// A WebhookEndpoint reference with its namespace resolved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EndpointRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl EndpointRef {
    /// Parse `name` or `namespace/name`; a bare name takes `default_ns`.
    pub fn parse(s: &str, default_ns: &str) -> Result<Self, String> {
        let (ns, name) = match s.split_once('/') {
            Some((ns, name)) => (ns, name),
            None => (default_ns, s),
        };
        let ok = |v: &str| {
            !v.is_empty()
                && v.len() <= 253
                && v.bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.'))
        };
        if !ok(ns) || !ok(name) || name.contains('/') {
            return Err(format!(
                "{s:?} is not an endpoint: use NAME or NAMESPACE/NAME (lower-case Kubernetes names)"
            ));
        }
        Ok(Self {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        })
    }

    /// The endpoint's NATS object names.
    pub fn names(&self) -> EndpointNames {
        EndpointNames::new(&self.namespace, &self.name)
    }

    /// Where a webhook read from the history is published when replayed:
    /// its partition's intake subject (the history keeps it under the
    /// subject it was accepted on, scoped or legacy, or under
    /// `spillway.hist.<key>.<p>`). `None` for anything else (retry copies,
    /// other endpoints).
    pub fn replay_subject(&self, stored: &str) -> Option<String> {
        let names = self.names();
        if let Some(p) = names.partition_of_subject(stored) {
            return Some(names.subject(p));
        }
        let hist = names.history_subjects();
        let p = stored.strip_prefix(hist.trim_end_matches('*'))?;
        let p: u16 = p
            .parse()
            .ok()
            .filter(|_| p.bytes().all(|b| b.is_ascii_digit()))?;
        Some(names.subject(p))
    }

    /// Whether the endpoint is unordered (its shared consumer exists on the
    /// work stream); false when the work stream cannot be read.
    pub async fn unordered(&self, js: &async_nats::jetstream::Context) -> bool {
        let names = self.names();
        match js.get_stream(names.stream()).await {
            Ok(work) => work.consumer_info(names.consumer(None)).await.is_ok(),
            Err(_) => false,
        }
    }

    /// Where a dead letter goes back to when redriven. Unordered: the due
    /// subject of the listener that dead-lettered it (named by the dead
    /// letter's own subject, `spillway.dlq.<scope>.<listener>`; the
    /// unscoped legacy subject is the built-in listener's), which only that
    /// listener's consumer reads: the intake subject would deliver it again
    /// to every listener, including those that had it. Ordered (no
    /// listeners): its partition's intake subject, keeping its key's order.
    /// `None` when a subject is not this endpoint's.
    pub fn redrive_target(
        &self,
        dlq_subject: &str,
        original: Option<&str>,
        unordered: bool,
    ) -> Option<String> {
        let names = self.names();
        // The original subject must be this endpoint's either way.
        let intake = self.redrive_subject(original?)?;
        if !unordered {
            return Some(intake);
        }
        let owner = if dlq_subject == names.legacy_dead_letter_subject() {
            spillway_api::names::BUILTIN_LISTENER
        } else {
            let all = names.dead_letter_subjects();
            let l = dlq_subject.strip_prefix(all.trim_end_matches('*'))?;
            if l.is_empty() || l.contains(['.', '*', '>']) {
                return None;
            }
            l
        };
        Some(names.due_subject(owner))
    }

    /// Where a dead letter goes back to when redriven: its partition's
    /// intake subject, or for a retried copy (which sat on a listener's
    /// `due` subject) the unordered intake subject. `None` for a subject of
    /// another endpoint or of no endpoint.
    pub fn redrive_subject(&self, original: &str) -> Option<String> {
        let names = self.names();
        if let Some(p) = names.partition_of_subject(original) {
            return Some(names.subject(p));
        }
        [names.due_subjects(), names.legacy_due_subjects()]
            .iter()
            .any(|due| {
                original
                    .strip_prefix(due.trim_end_matches('*'))
                    .is_some_and(|l| !l.is_empty() && !l.contains(['.', '*', '>']))
            })
            .then(|| names.subject(0))
    }
}

impl std::fmt::Display for EndpointRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redrive_goes_back_to_the_listener_that_dead_lettered_it() {
        let ep = EndpointRef::parse("a/b", "").unwrap();
        let names = ep.names();
        let intake = Some("spillway.in.a.b.0");
        for (dlq, original, unordered, want) in [
            (
                "spillway.dlq.a.b.processor",
                intake,
                true,
                Some("spillway.due.a.b.processor"),
            ),
            (
                "spillway.dlq.a.b.team_bot",
                intake,
                true,
                Some("spillway.due.a.b.team_bot"),
            ),
            (
                "spillway.dlq.a.b.team_bot",
                Some("spillway.due.a.b.team_bot"),
                true,
                Some("spillway.due.a.b.team_bot"),
            ),
            // Ordered: the partition, to keep the key's order.
            (
                "spillway.dlq.a.b.processor",
                Some("spillway.in.a.b.3"),
                false,
                Some("spillway.in.a.b.3"),
            ),
            // The legacy dead-letter subject is the built-in listener's.
            (
                names.legacy_dead_letter_subject().as_str(),
                intake,
                true,
                Some("spillway.due.a.b.processor"),
            ),
            // Not this endpoint's, or no original subject: skipped.
            ("spillway.dlq.a.c.processor", intake, true, None),
            ("spillway.dlq.a.b.x.y", intake, true, None),
            (
                "spillway.dlq.a.b.processor",
                Some("spillway.in.a.c.0"),
                true,
                None,
            ),
            ("spillway.dlq.a.b.processor", None, true, None),
        ] {
            assert_eq!(
                ep.redrive_target(dlq, original, unordered).as_deref(),
                want,
                "{dlq} {original:?} {unordered}"
            );
        }
    }

    #[test]
    fn redrive_goes_back_to_the_intake_subject() {
        let ep = EndpointRef::parse("a/b", "default").unwrap();
        assert_eq!(
            ep.redrive_subject("spillway.in.a.b.3").as_deref(),
            Some("spillway.in.a.b.3")
        );
        // Dead letters of the previous release name the one-token subject:
        // they go back to the scoped one.
        assert_eq!(
            ep.redrive_subject("spillway.in.a_b.3").as_deref(),
            Some("spillway.in.a.b.3")
        );
        for due in ["spillway.due.a.b.processor", "spillway.due.a_b.processor"] {
            assert_eq!(
                ep.redrive_subject(due).as_deref(),
                Some("spillway.in.a.b.0"),
                "{due}"
            );
        }
        assert_eq!(ep.redrive_subject("spillway.due.a.c.processor"), None);
        assert_eq!(ep.redrive_subject("spillway.due.a_c.processor"), None);
        assert_eq!(ep.redrive_subject("spillway.due.a.b.x.y"), None);
        assert_eq!(ep.redrive_subject("spillway.in.a.b.x"), None);
        assert_eq!(
            ep.replay_subject("spillway.hist.a_b.2").as_deref(),
            Some("spillway.in.a.b.2")
        );
        assert_eq!(
            ep.replay_subject("spillway.in.a_b.0").as_deref(),
            Some("spillway.in.a.b.0")
        );
        assert_eq!(
            ep.replay_subject("spillway.in.a.b.0").as_deref(),
            Some("spillway.in.a.b.0")
        );
        assert_eq!(ep.replay_subject("spillway.due.a.b.processor"), None);
        assert_eq!(ep.replay_subject("spillway.hist.a_c.0"), None);
        assert_eq!(ep.replay_subject("spillway.hist.a_b.x"), None);
    }

    #[test]
    fn parses_both_forms() {
        let e = EndpointRef::parse("github", "team-a").unwrap();
        assert_eq!(
            (e.namespace.as_str(), e.name.as_str()),
            ("team-a", "github")
        );
        let e = EndpointRef::parse("ops/stripe.v2", "team-a").unwrap();
        assert_eq!(
            (e.namespace.as_str(), e.name.as_str()),
            ("ops", "stripe.v2")
        );
        assert_eq!(e.to_string(), "ops/stripe.v2");
        for bad in ["", "/x", "x/", "a/b/c", "Upper", "a b"] {
            assert!(EndpointRef::parse(bad, "default").is_err(), "{bad}");
        }
    }

    #[test]
    fn owns_only_its_partition_subjects() {
        let e = EndpointRef::parse("ns/gh", "default").unwrap().names();
        let owns = |s: &str| e.partition_of_subject(s).is_some();
        assert!(owns("spillway.in.ns.gh.0"));
        assert!(owns("spillway.in.ns_gh.0"));
        assert!(owns("spillway.in.ns.gh.17"));
        assert!(!owns("spillway.in.ns.ghx.0"));
        assert!(!owns("spillway.in.ns_gh."));
        assert!(!owns("spillway.in.ns_gh.x"));
        assert!(!owns("spillway.in.ns_ghx.0"));
        assert!(!owns("spillway.dlq.ns_gh"));
    }
}
