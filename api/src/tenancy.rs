//! NATS permissions for one namespace's processors.
//!
//! In a single NATS account, JetStream's API subjects name streams and
//! consumers (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`), and stream
//! names cannot hold the `.` that would make the namespace a token of its
//! own there. So a per-namespace user lists its endpoints' streams by name,
//! and gets its namespace's Spillway subjects with one wildcard each
//! (`spillway.<kind>.<namespace>.>`, see [`names`](crate::names)). Nothing
//! it is allowed covers another namespace: not another tenant's streams,
//! not their subjects, not their inboxes (processors take replies under
//! [`inbox_prefix`]).

use crate::names::{EndpointNames, inbox_prefix};

/// Publish and subscribe allow-lists of a NATS user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects the user may publish to (requests included).
    pub publish: Vec<String>,
    /// Subjects the user may subscribe to.
    pub subscribe: Vec<String>,
}

/// What the processors of `namespace` need, for the endpoints named
/// `endpoints` (`metadata.name`s in that namespace): fetch from and
/// acknowledge on their own consumers, read their own streams' state and
/// dead letters, park and move back retries, publish dead letters and sink
/// notices, and receive replies on their namespace's inboxes. Regenerate
/// it when endpoints are added (`spillway nats-permissions`).
pub fn processor_permissions(namespace: &str, endpoints: &[String]) -> Permissions {
    let mut publish: Vec<String> = ["retry", "due", "dlq", "notice", "attempt"]
        .iter()
        .map(|kind| format!("spillway.{kind}.{namespace}.>"))
        .collect();
    let mut sorted: Vec<&String> = endpoints.iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    for name in sorted {
        let n = EndpointNames::new(namespace, name);
        let (work, retry, dlq) = (n.stream(), n.retry_stream(), n.dead_letter_stream());
        for stream in [&work, &retry] {
            publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"));
            publish.push(format!("$JS.API.CONSUMER.INFO.{stream}.*"));
            publish.push(format!("$JS.ACK.{stream}.>"));
        }
        for stream in [&work, &retry, &dlq] {
            publish.push(format!("$JS.API.STREAM.INFO.{stream}"));
        }
        publish.push(format!("$JS.API.STREAM.MSG.GET.{dlq}"));
        publish.push(format!("$JS.API.DIRECT.GET.{dlq}"));
    }
    Permissions {
        publish,
        subscribe: vec![
            format!("{}.>", inbox_prefix(namespace)),
            format!("spillway.notice.{namespace}.>"),
        ],
    }
}

impl Permissions {
    /// The `permissions` block of a user in a nats-server configuration
    /// file.
    pub fn to_server_config(&self) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("        {s:?}"))
                .collect::<Vec<_>>()
                .join(",\n")
        };
        format!(
            "permissions: {{\n  publish: {{\n    allow: [\n{}\n    ]\n  }}\n  subscribe: {{\n    allow: [\n{}\n    ]\n  }}\n}}\n",
            list(&self.publish),
            list(&self.subscribe)
        )
    }
}

impl Permissions {
    /// The same permissions as `nsc` flags, for a user JWT in JWT mode:
    /// `nsc add user <name> <flags>` (or `nsc edit user`).
    pub fn to_nsc_flags(&self) -> String {
        format!(
            "--allow-pub '{}' --allow-sub '{}'",
            self.publish.join(","),
            self.subscribe.join(",")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NATS subject matching (`*` one token, `>` the rest).
    fn matches(pattern: &str, subject: &str) -> bool {
        let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    fn allowed(list: &[String], subject: &str) -> bool {
        list.iter().any(|p| matches(p, subject))
    }

    #[test]
    fn a_namespace_reaches_its_own_endpoints_only() {
        let a = processor_permissions("team-a", &["gh".into(), "stripe.v2".into()]);
        let own = EndpointNames::new("team-a", "gh");
        let other = EndpointNames::new("team-b", "gh");
        // Its own work: fetch, ack, retries, dead letters, notices and
        // attempt records.
        for s in [
            format!("$JS.API.CONSUMER.MSG.NEXT.{}.processor", own.stream()),
            format!("$JS.API.CONSUMER.MSG.NEXT.{}.processor-p3", own.stream()),
            format!("$JS.ACK.{}.processor.1.2.3.4.5", own.stream()),
            format!(
                "$JS.API.CONSUMER.MSG.NEXT.{}.retry-processor",
                own.retry_stream()
            ),
            own.retry_subject("processor"),
            own.due_subject("processor"),
            own.dead_letter_subject(),
            own.notice_subject(),
            own.attempt_subject("processor", "provider:github:1"),
        ] {
            assert!(allowed(&a.publish, &s), "{s}");
        }
        assert!(allowed(&a.subscribe, "_INBOX.spillway.team-a.abc.1"));
        // Nothing of another namespace, and not the intake (the gateway's).
        for s in [
            format!("$JS.API.CONSUMER.MSG.NEXT.{}.processor", other.stream()),
            format!("$JS.ACK.{}.processor.1.2.3.4.5", other.stream()),
            format!("$JS.API.STREAM.MSG.GET.{}", other.dead_letter_stream()),
            other.retry_subject("processor"),
            other.due_subject("processor"),
            other.dead_letter_subject(),
            other.notice_subject(),
            own.subject(0),
            own.legacy_subject(0),
            "$JS.API.STREAM.DELETE.x".into(),
            format!("$JS.API.CONSUMER.CREATE.{}.processor", own.stream()),
        ] {
            assert!(!allowed(&a.publish, &s), "{s}");
        }
        for s in [
            "_INBOX.abcdefghijklmnopqrstuv",
            "_INBOX.spillway.team-b.x",
            "spillway.in.team-a.gh.0",
            "spillway.notice.team-b.gh",
        ] {
            assert!(!allowed(&a.subscribe, s), "{s}");
        }
        // `team-a` is not a prefix match for `team-ab`.
        let ab = EndpointNames::new("team-ab", "gh");
        assert!(!allowed(&a.publish, &ab.retry_subject("processor")));
    }

    #[test]
    fn renders_a_server_config_block() {
        let c = processor_permissions("team-a", &["gh".into()]).to_server_config();
        assert!(c.starts_with("permissions: {\n  publish: {"), "{c}");
        assert!(c.contains("\"spillway.retry.team-a.>\""), "{c}");
        assert!(c.contains("\"_INBOX.spillway.team-a.>\""), "{c}");
        let n = processor_permissions("team-a", &["gh".into()]).to_nsc_flags();
        assert!(
            n.starts_with("--allow-pub 'spillway.retry.team-a.>,spillway.due.team-a.>,"),
            "{n}"
        );
        assert!(
            n.ends_with("--allow-sub '_INBOX.spillway.team-a.>,spillway.notice.team-a.>'"),
            "{n}"
        );
    }
}
