//! Names of the NATS objects that belong to a WebhookEndpoint.
//!
//! Kubernetes namespaces are DNS labels (`[a-z0-9-]`) and object names DNS
//! subdomains (`[a-z0-9.-]`), so neither contains `_`. The endpoint key is
//! `<namespace>_<name>` with the name's dots written as `_`: the first `_`
//! separates the namespace, so the mapping is collision-free, and the key is a
//! valid JetStream stream name and NATS subject token. Keys that would be too
//! long are shortened with a hash of the full identity.
//!
//! Subjects put the namespace in a token of its own
//! (`spillway.<kind>.<namespace>.<name>.…`, the name's dots written as
//! `_`), so one NATS permission such as `spillway.*.<namespace>.>` covers a
//! tenant's subjects and nothing else. Streams created before kept
//! `<namespace>_<name>` as one token (`legacy_*` below): the operator adds
//! the scoped subjects to those streams in place, and consumers read both
//! forms, so messages stored under the old subjects are still delivered.

/// Longest key before it is shortened (JetStream names may be 255 bytes; the
/// key gets prefixes and suffixes).
const MAX_KEY: usize = 200;

/// Prefix of the notice subjects (followed by the endpoint key).
const NOTICE_PREFIX: &str = "spillway.notice.";

/// Wildcard covering every endpoint's notice subject.
pub const NOTICE_SUBJECTS: &str = "spillway.notice.>";

/// Identity of one endpoint's NATS objects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointNames {
    key: String,
    /// `<namespace>.<name>` (dots of the name as `_`): two subject tokens.
    scope: String,
}

impl EndpointNames {
    /// Names for the endpoint `namespace/name`.
    pub fn new(namespace: &str, name: &str) -> Self {
        let full = format!("{namespace}_{}", name.replace('.', "_"));
        let key = if full.len() <= MAX_KEY {
            full
        } else {
            let digest = fnv1a64(format!("{namespace}/{name}").as_bytes());
            format!("{}_{digest:016x}", &full[..MAX_KEY - 17])
        };
        let scope = format!("{namespace}.{}", name.replace('.', "_"));
        Self { key, scope }
    }

    /// The two subject tokens `<namespace>.<name>` of this endpoint's
    /// subjects.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The collision-free key itself.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The work stream: accepted webhooks until every listener has settled
    /// them (interest retention), so only undelivered webhooks fill it. The
    /// processors' consumers live here. (Prefixes with `-` cannot collide
    /// with a `spillway_<key>` name: keys never contain `-` before the `_`
    /// that follows `spillway`.)
    pub fn stream(&self) -> String {
        format!("spillway-work_{}", self.key)
    }

    /// The history stream: a copy of every accepted webhook (sourced from
    /// the work stream through the durable consumer
    /// [`history_consumer`](Self::history_consumer), so no copy is missed
    /// when a node fails), bounded by its own limits, for `replay`. Never
    /// blocks intake.
    pub fn history_stream(&self) -> String {
        format!("spillway-history_{}", self.key)
    }

    /// Subjects of the history stream. Sourced copies keep their intake
    /// subject (`spillway.in.<key>.<p>`); these are not published to, and
    /// only keep a history stream's own subject list stable.
    pub fn history_subjects(&self) -> String {
        format!("spillway.hist.{}.*", self.key)
    }

    /// Durable consumer on the work stream (intake subjects only) through
    /// which the history stream sources every accepted webhook. It is
    /// acknowledged by JetStream's flow control once the history stored the
    /// copies, so the work stream keeps a webhook until the history has it.
    pub fn history_consumer(&self) -> String {
        HISTORY_CONSUMER.to_owned()
    }

    /// Deliver subject of [`history_consumer`](Self::history_consumer)
    /// (JetStream's internal subscription of the history stream; nothing
    /// else reads it).
    pub fn history_feed_subject(&self) -> String {
        format!("spillway.feed.{}", self.key)
    }

    /// The stream of the older layout, which held work and history in one
    /// (limits retention). An existing one is migrated: its intake subjects
    /// move to the work stream, its consumers drain what it still holds,
    /// the history stream copies it, then it is deleted.
    pub fn legacy_stream(&self) -> String {
        format!("spillway_{}", self.key)
    }

    /// The subject a legacy stream keeps once its intake subjects have moved
    /// (nothing publishes to it).
    pub fn legacy_parked_subject(&self) -> String {
        format!("spillway.legacy.{}", self.key)
    }

    /// Stream holding dead letters.
    pub fn dead_letter_stream(&self) -> String {
        format!("spillway_{}_dlq", self.key)
    }

    /// Subject the gateway publishes partition `p` to (0 when unordered).
    pub fn subject(&self, partition: u16) -> String {
        format!("spillway.in.{}.{partition}", self.scope)
    }

    /// Wildcard of the intake subjects (all partitions).
    pub fn stream_subjects(&self) -> String {
        format!("spillway.in.{}.*", self.scope)
    }

    /// Subject the built-in listener's dead letters are published to.
    pub fn dead_letter_subject(&self) -> String {
        self.listener_dead_letter_subject(BUILTIN_LISTENER)
    }

    /// Subject `listener`'s dead letters are published to.
    pub fn listener_dead_letter_subject(&self, listener: &str) -> String {
        format!("spillway.dlq.{}.{listener}", self.scope)
    }

    /// Durable consumer of the WebhookListener `listener` (its
    /// [`listener_token`]) on the work stream.
    pub fn listener_consumer(&self, listener: &str) -> String {
        format!("{LISTENER_CONSUMER_PREFIX}{listener}")
    }

    /// Wildcard of the dead-letter stream's subjects (every listener).
    pub fn dead_letter_subjects(&self) -> String {
        format!("spillway.dlq.{}.*", self.scope)
    }

    /// Core NATS subject the processor reports its sink's state on (see
    /// [`SinkNotice`](crate::wire::SinkNotice)); the operator subscribes to
    /// [`NOTICE_SUBJECTS`].
    pub fn notice_subject(&self) -> String {
        format!("{NOTICE_PREFIX}{}", self.scope)
    }

    /// Subject a retry whose wait is over is published to, in the work
    /// stream, for `listener` only (the unordered consumer reads every
    /// subject of the stream).
    pub fn due_subject(&self, listener: &str) -> String {
        format!("spillway.due.{}.{listener}", self.scope)
    }

    /// Wildcard of the work stream's `due` subjects.
    pub fn due_subjects(&self) -> String {
        format!("spillway.due.{}.*", self.scope)
    }

    /// Stream holding retries while they wait out their delay (work-queue
    /// retention: a parked retry leaves it when it is due and moved back).
    pub fn retry_stream(&self) -> String {
        format!("spillway-retry_{}", self.key)
    }

    /// Subject a failed delivery of `listener` is parked on.
    pub fn retry_subject(&self, listener: &str) -> String {
        format!("spillway.retry.{}.{listener}", self.scope)
    }

    /// Wildcard of the retry stream's subjects.
    pub fn retry_subjects(&self) -> String {
        format!("spillway.retry.{}.*", self.scope)
    }

    /// Stream of attempt records: one per delivery attempt of every
    /// listener (limits retention, `discard: old`).
    pub fn attempt_stream(&self) -> String {
        format!("spillway-attempts_{}", self.key)
    }

    /// Subject `listener`'s attempts at delivering `delivery_id` are
    /// recorded on. The last token is the id's hash, so every attempt at
    /// one id is found by subject (an indexed lookup, whatever the id's
    /// characters); records carry the full id, which readers compare.
    pub fn attempt_subject(&self, listener: &str, delivery_id: &str) -> String {
        format!(
            "spillway.attempt.{}.{listener}.{}",
            self.scope,
            delivery_hash(delivery_id)
        )
    }

    /// Every listener's attempts at `delivery_id`.
    pub fn attempt_lookup_subject(&self, delivery_id: &str) -> String {
        format!(
            "spillway.attempt.{}.*.{}",
            self.scope,
            delivery_hash(delivery_id)
        )
    }

    /// Wildcard of the attempt stream's subjects.
    pub fn attempt_subjects(&self) -> String {
        format!("spillway.attempt.{}.>", self.scope)
    }

    /// Intake subject of partition `p` before subjects were scoped
    /// (`spillway.in.<key>.<p>`): messages stored under it are still read.
    pub fn legacy_subject(&self, partition: u16) -> String {
        format!("spillway.in.{}.{partition}", self.key)
    }

    /// Wildcard of [`legacy_subject`](Self::legacy_subject).
    pub fn legacy_stream_subjects(&self) -> String {
        format!("spillway.in.{}.*", self.key)
    }

    /// `due` subjects before subjects were scoped.
    pub fn legacy_due_subjects(&self) -> String {
        format!("spillway.due.{}.*", self.key)
    }

    /// Retry subject of `listener` before subjects were scoped.
    pub fn legacy_retry_subject(&self, listener: &str) -> String {
        format!("spillway.retry.{}.{listener}", self.key)
    }

    /// Wildcard of the retry subjects before subjects were scoped.
    pub fn legacy_retry_subjects(&self) -> String {
        format!("spillway.retry.{}.*", self.key)
    }

    /// Dead-letter subject before subjects were scoped.
    pub fn legacy_dead_letter_subject(&self) -> String {
        format!("spillway.dlq.{}", self.key)
    }

    /// Notice subject before subjects were scoped (processors of the
    /// previous release still send it during an upgrade).
    pub fn legacy_notice_subject(&self) -> String {
        format!("{NOTICE_PREFIX}{}", self.key)
    }

    /// Whether `subject` is this endpoint's intake subject of partition
    /// `p`, scoped or legacy; `p` when it is.
    pub fn partition_of_subject(&self, subject: &str) -> Option<u16> {
        let (_, p) = subject.rsplit_once('.')?;
        let p: u16 = p.parse().ok()?;
        (self.subject(p) == subject || self.legacy_subject(p) == subject).then_some(p)
    }

    /// Durable consumer on the retry stream that holds `listener`'s parked
    /// retries until they are due.
    pub fn retry_consumer(&self, listener: &str) -> String {
        format!("retry-{listener}")
    }

    /// The durable consumers the processor pulls from: the shared one, or
    /// one per partition when the endpoint is ordered with `partitions`.
    pub fn consumers(&self, partitions: Option<u16>) -> Vec<String> {
        match partitions {
            None => vec![self.consumer(None)],
            Some(n) => (0..n.max(1)).map(|i| self.consumer(Some(i))).collect(),
        }
    }

    /// Durable consumer for partition `p` of an ordered endpoint, or the one
    /// shared consumer (`None`).
    pub fn consumer(&self, partition: Option<u16>) -> String {
        match partition {
            None => "processor".to_owned(),
            Some(p) => format!("processor-p{p}"),
        }
    }
}

/// Whether a consumer name on the work stream is one of the processor's
/// (`processor`, `processor-p<N>`), which the operator creates, replaces
/// and deletes; others (the history's source, anyone's own) are left alone.
pub fn is_managed_consumer(name: &str) -> bool {
    name == "processor"
        || name
            .strip_prefix("processor-p")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Name of the history's source consumer on every work stream
/// ([`EndpointNames::history_consumer`]).
pub const HISTORY_CONSUMER: &str = "history";

/// Whether a consumer on a work stream is one Spillway creates: the
/// processor's ([`is_managed_consumer`]), the history's source, or a
/// WebhookListener's (`listener_<token>`). Any other is someone else's (a
/// `nats consumer add` while debugging, a tool's reader), and on an
/// interest stream it keeps every webhook it has not taken.
pub fn is_spillway_consumer(name: &str) -> bool {
    is_managed_consumer(name)
        || name == HISTORY_CONSUMER
        || name
            .strip_prefix(LISTENER_CONSUMER_PREFIX)
            .is_some_and(|t| !t.is_empty())
}

/// The listener every endpoint has: `spec.processor`.
pub const BUILTIN_LISTENER: &str = "processor";

/// Prefix of WebhookListeners' consumers on the work stream (the listener
/// controller owns them; the endpoint's reconcile leaves them alone).
pub const LISTENER_CONSUMER_PREFIX: &str = "listener_";

/// Longest listener token before it is shortened.
const MAX_LISTENER: usize = 100;

/// The name the WebhookListener `namespace/name` has in subjects, consumer
/// names and attempt records: `<namespace>_<name>` (dots as `_`), so it is
/// one subject token, never `processor` (no `_`), and unique per cluster
/// (the first `_` separates the namespace). Long ones are shortened with a
/// hash of the full identity.
pub fn listener_token(namespace: &str, name: &str) -> String {
    let full = format!("{namespace}_{}", name.replace('.', "_"));
    if full.len() <= MAX_LISTENER {
        full
    } else {
        let digest = fnv1a64(format!("{namespace}/{name}").as_bytes());
        format!("{}_{digest:016x}", &full[..MAX_LISTENER - 17])
    }
}

/// What a user may call a listener (`--listener`): `processor`,
/// `<name>` of a listener in `endpoint_namespace`, `<namespace>/<name>`, or
/// its token as is. Returns the token.
pub fn listener_arg(endpoint_namespace: &str, arg: &str) -> String {
    if arg == BUILTIN_LISTENER || arg.contains('_') {
        return arg.to_owned();
    }
    match arg.split_once('/') {
        Some((ns, name)) => listener_token(ns, name),
        None => listener_token(endpoint_namespace, arg),
    }
}

/// Inbox prefix of the processors of `namespace`: their replies (fetched
/// messages, PubAcks, API answers) arrive under it, so a per-namespace NATS
/// user subscribes to `<prefix>.>` instead of every client's `_INBOX.>`.
/// (A default inbox's second token is a 22-character NUID, never
/// `spillway`.)
pub fn inbox_prefix(namespace: &str) -> String {
    format!("_INBOX.spillway.{namespace}")
}

/// FNV-1a, 64 bit: stable across releases and platforms (unlike std's hasher).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The subject token standing for a delivery id in attempt subjects:
/// 16 hex digits of its FNV-1a hash.
pub fn delivery_hash(delivery_id: &str) -> String {
    format!("{:016x}", fnv1a64(delivery_id.as_bytes()))
}

/// The partition an ordering key falls into.
pub fn partition_of(key: &[u8], partitions: u16) -> u16 {
    (fnv1a64(key) % u64::from(partitions.max(1))) as u16
}

/// Precedence of an endpoint for a contested path: the smallest value keeps
/// it. Older first (creation time in Unix seconds; unknown counts as newest),
/// then namespace, then name. The operator (which reports `PathConflict`) and
/// the gateway (which routes) both use this, so they always agree.
pub fn path_precedence<'a>(
    created: Option<i64>,
    namespace: &'a str,
    name: &'a str,
) -> (i64, &'a str, &'a str) {
    (created.unwrap_or(i64::MAX), namespace, name)
}

/// The default path of an endpoint without `spec.path`.
pub fn default_path(namespace: &str, name: &str) -> String {
    format!("/{namespace}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_tokens_are_single_distinct_tokens() {
        let cases = [
            (("team-a", "ci"), "team-a_ci"),
            (("team", "a-ci"), "team_a-ci"),
            (("ns", "bot.v2"), "ns_bot_v2"),
        ];
        for ((ns, name), want) in cases {
            assert_eq!(listener_token(ns, name), want);
        }
        let long = listener_token("n", &"x".repeat(253));
        assert_eq!(long.len(), 100);
        assert_ne!(long, listener_token("n", &"x".repeat(252)));
        assert!(!long.contains('.') && !long.contains('*'));
        assert_ne!(listener_token("a", "processor"), BUILTIN_LISTENER);
        let ep = EndpointNames::new("shop", "gh");
        assert_eq!(ep.listener_consumer("shop_ci"), "listener_shop_ci");
        assert!(!is_managed_consumer(&ep.listener_consumer("shop_ci")));
        assert_eq!(
            ep.listener_dead_letter_subject("shop_ci"),
            "spillway.dlq.shop.gh.shop_ci"
        );
        for (arg, want) in [
            ("processor", "processor"),
            ("ci", "shop_ci"),
            ("ops/ci", "ops_ci"),
            ("ops_ci", "ops_ci"),
        ] {
            assert_eq!(listener_arg("shop", arg), want, "{arg}");
        }
    }

    #[test]
    fn names_are_distinct_where_dashes_could_collide() {
        let a = EndpointNames::new("a-b", "c");
        let b = EndpointNames::new("a", "b-c");
        assert_ne!(a.stream(), b.stream());
        let c = EndpointNames::new("a", "b.c");
        let d = EndpointNames::new("a-b", "c");
        assert_ne!(c.key(), d.key());
        assert_eq!(c.stream(), "spillway-work_a_b_c");
        assert_eq!(c.legacy_stream(), "spillway_a_b_c");
        assert_eq!(c.history_stream(), "spillway-history_a_b_c");
        assert_eq!(c.attempt_stream(), "spillway-attempts_a_b_c");
    }

    #[test]
    fn attempts_of_one_delivery_share_a_subject_per_listener() {
        let n = EndpointNames::new("team", "gh");
        let id = "provider:github:72d3162e-cc78.11e3 *>";
        let a = n.attempt_subject("processor", id);
        assert_eq!(
            a,
            format!("spillway.attempt.team.gh.processor.{}", delivery_hash(id))
        );
        assert_eq!(delivery_hash(id).len(), 16);
        assert!(!delivery_hash(id).contains(['.', '*', '>']));
        assert_ne!(a, n.attempt_subject("processor", "other"));
        assert_eq!(
            n.attempt_lookup_subject(id),
            format!("spillway.attempt.team.gh.*.{}", delivery_hash(id))
        );
        assert!(a.starts_with(n.attempt_subjects().trim_end_matches('>')));
    }

    #[test]
    fn names_are_valid_jetstream_names() {
        let long = "x".repeat(253);
        for n in [
            EndpointNames::new("default", "gh"),
            EndpointNames::new("ns", &long),
        ] {
            let s = n.stream();
            assert!(s.len() <= 255, "{s}");
            assert!(!s.contains(['.', '*', '>', ' ', '/', '\\']), "{s}");
            assert!(n.dead_letter_stream().len() <= 255);
        }
        assert_ne!(
            EndpointNames::new("ns", &long).key(),
            EndpointNames::new("ns", &format!("{}y", "x".repeat(252))).key()
        );
    }

    #[test]
    fn subjects_do_not_overlap() {
        let n = EndpointNames::new("default", "gh");
        assert_eq!(n.subject(0), "spillway.in.default.gh.0");
        assert_eq!(n.stream_subjects(), "spillway.in.default.gh.*");
        assert!(!n.dead_letter_subject().starts_with("spillway.in."));
        assert_eq!(
            n.due_subject("processor"),
            "spillway.due.default.gh.processor"
        );
        assert_eq!(
            n.retry_subject("processor"),
            "spillway.retry.default.gh.processor"
        );
        assert_eq!(n.dead_letter_subject(), "spillway.dlq.default.gh.processor");
        assert_eq!(n.retry_stream(), "spillway-retry_default_gh");
        assert!(!n.retry_subject("processor").starts_with("spillway.due."));
        assert_eq!(n.history_feed_subject(), "spillway.feed.default_gh");
        assert_ne!(n.history_consumer(), n.consumer(None));
        // Legacy (one-token) and scoped subjects never match each other's
        // wildcards: they differ in the number of tokens.
        assert_eq!(n.legacy_subject(3), "spillway.in.default_gh.3");
        let tokens = |s: String| s.split('.').count();
        assert_ne!(
            tokens(n.stream_subjects()),
            tokens(n.legacy_stream_subjects())
        );
        assert_ne!(
            tokens(n.retry_subjects()),
            tokens(n.legacy_retry_subjects())
        );
        assert_ne!(tokens(n.due_subjects()), tokens(n.legacy_due_subjects()));
    }

    #[test]
    fn the_namespace_is_a_token_of_its_own() {
        // A permission `spillway.*.team-a.>` covers team-a's subjects only.
        let a = EndpointNames::new("team-a", "gh.v2");
        let b = EndpointNames::new("team-ab", "gh");
        for s in [
            a.subject(0),
            a.due_subject("processor"),
            a.retry_subject("processor"),
            a.dead_letter_subject(),
            a.notice_subject(),
        ] {
            let t: Vec<&str> = s.split('.').collect();
            assert_eq!(t[2], "team-a", "{s}");
            assert_eq!(t[3], "gh_v2", "{s}");
        }
        assert_eq!(b.subject(0).split('.').nth(2), Some("team-ab"));
        assert_eq!(a.scope(), "team-a.gh_v2");
    }

    #[test]
    fn partitions_are_read_from_either_subject_form() {
        let n = EndpointNames::new("team", "gh");
        assert_eq!(n.partition_of_subject("spillway.in.team.gh.7"), Some(7));
        assert_eq!(n.partition_of_subject("spillway.in.team_gh.7"), Some(7));
        assert_eq!(n.partition_of_subject("spillway.in.team.other.7"), None);
        assert_eq!(
            n.partition_of_subject("spillway.due.team.gh.processor"),
            None
        );
        assert_eq!(n.partition_of_subject("spillway.in.team.gh.x"), None);
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition_of(b"cus_1", 8), partition_of(b"cus_1", 8));
        for k in 0..100u32 {
            assert!(partition_of(&k.to_be_bytes(), 7) < 7);
        }
        assert_eq!(partition_of(b"x", 0), 0);
    }
    #[test]
    fn managed_consumer_names() {
        assert!(is_managed_consumer("processor"));
        assert!(is_managed_consumer("processor-p12"));
        assert!(!is_managed_consumer("processor-p"));
        assert!(!is_managed_consumer("replay-1"));
    }

    #[test]
    fn spillway_consumer_names() {
        let n = EndpointNames::new("ns", "gh");
        for ours in [
            "processor".to_owned(),
            "processor-p3".to_owned(),
            n.history_consumer(),
            n.listener_consumer("audit"),
        ] {
            assert!(is_spillway_consumer(&ours), "{ours}");
        }
        for theirs in [
            "debugging",
            "listener_",
            "processor-p",
            "History",
            "fault-watch",
        ] {
            assert!(!is_spillway_consumer(theirs), "{theirs}");
        }
    }

    #[test]
    fn consumers_are_one_shared_or_one_per_partition() {
        let n = EndpointNames::new("ns", "gh");
        assert_eq!(n.consumers(None), ["processor"]);
        assert_eq!(
            n.consumers(Some(3)),
            ["processor-p0", "processor-p1", "processor-p2"]
        );
        assert!(n.consumers(Some(3)).iter().all(|c| is_managed_consumer(c)));
        assert!(!is_managed_consumer(&n.history_consumer()));
    }
}
