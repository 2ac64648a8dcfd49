//! The headers of a dead letter.

use async_nats::HeaderMap;
use spillway_api::wire;

use crate::outcome::DeadReason;

/// What is recorded about the failure.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    /// Why the message is dead-lettered.
    pub reason: DeadReason,
    /// The last failure, described.
    pub detail: &'a str,
    /// Attempts made.
    pub attempts: u32,
    /// HTTP status of the last attempt, if there was a response.
    pub last_status: Option<u16>,
    /// Stream the original was stored in.
    pub stream: &'a str,
    /// Stream sequence of the original.
    pub seq: u64,
    /// When JetStream stored the original (Unix nanoseconds): with the
    /// stream and sequence, it tells the same stored message from the one at
    /// the same sequence of a recreated stream.
    pub published_unix_nanos: i128,
    /// Subject of the original.
    pub subject: &'a str,
    /// When it failed, RFC 3339.
    pub failed_at: &'a str,
}

/// Longest detail header kept.
const MAX_DETAIL: usize = 512;

/// The original's headers (minus its message id and any earlier dead-letter
/// headers) plus the `Spillway-Dlq-*` headers, and a `Nats-Msg-Id` that is
/// stable for this stored message, so a repeated dead-letter publish of the
/// same message (after a lost acknowledgement) is deduplicated by JetStream.
pub fn headers(original: Option<&HeaderMap>, f: &Failure<'_>) -> HeaderMap {
    let mut out = original.map(wire::carried_headers).unwrap_or_default();
    // A header value: no control characters (a CR or LF would make the
    // NATS client panic), bounded.
    let detail: String = f
        .detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_DETAIL)
        .collect();
    out.insert(
        wire::NATS_MSG_ID,
        wire::dead_letter_msg_id(f.stream, f.seq, f.published_unix_nanos).as_str(),
    );
    out.insert(wire::DLQ_REASON, f.reason.as_str());
    out.insert(wire::DLQ_DETAIL, detail.as_str());
    out.insert(wire::DLQ_ATTEMPTS, f.attempts.to_string().as_str());
    if let Some(s) = f.last_status {
        out.insert(wire::DLQ_LAST_STATUS, s.to_string().as_str());
    }
    out.insert(wire::DLQ_ORIGINAL_SEQ, f.seq.to_string().as_str());
    out.insert(wire::DLQ_ORIGINAL_SUBJECT, f.subject);
    out.insert(wire::DLQ_FAILED_AT, f.failed_at);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_original_headers_and_adds_failure() {
        let mut orig = HeaderMap::new();
        orig.insert(wire::NATS_MSG_ID, "gh-1");
        orig.insert(wire::DELIVERY_ID, "gh-1");
        orig.insert("Spillway-Orig-X-GitHub-Event", "push");
        orig.insert(wire::DLQ_REASON, "stale");
        let f = Failure {
            reason: DeadReason::ClientError,
            detail: "sink answered 400: bad",
            attempts: 1,
            last_status: Some(400),
            stream: "spillway_default_gh",
            seq: 42,
            published_unix_nanos: 7,
            subject: "spillway.in.default_gh.0",
            failed_at: "2026-01-01T00:00:00Z",
        };
        let h = headers(Some(&orig), &f);
        let get = |k: &str| h.get(k).map(|v| v.as_str().to_owned());
        assert_eq!(get(wire::DELIVERY_ID).as_deref(), Some("gh-1"));
        assert_eq!(get("Spillway-Orig-X-GitHub-Event").as_deref(), Some("push"));
        assert_eq!(
            get(wire::NATS_MSG_ID).as_deref(),
            Some("spillway:dlq:spillway_default_gh:42:7")
        );
        assert_eq!(get(wire::DLQ_REASON).as_deref(), Some("client_error"));
        assert_eq!(get(wire::DLQ_ATTEMPTS).as_deref(), Some("1"));
        assert_eq!(get(wire::DLQ_LAST_STATUS).as_deref(), Some("400"));
        assert_eq!(get(wire::DLQ_ORIGINAL_SEQ).as_deref(), Some("42"));
        assert_eq!(
            get(wire::DLQ_ORIGINAL_SUBJECT).as_deref(),
            Some("spillway.in.default_gh.0")
        );
        assert_eq!(h.get_all(wire::DLQ_REASON).count(), 1);
    }

    #[test]
    fn control_characters_in_the_detail_become_spaces() {
        let h = headers(
            None,
            &Failure {
                stream: "s",
                seq: 1,
                published_unix_nanos: 0,
                reason: DeadReason::MaxAttempts,
                detail: "connect error:\r\nX-Injected: 1\tend",
                attempts: 2,
                last_status: None,
                subject: "a.b",
                failed_at: "t",
            },
        );
        assert_eq!(
            h.get(wire::DLQ_DETAIL).unwrap().as_str(),
            "connect error:  X-Injected: 1 end"
        );
    }

    #[test]
    fn no_status_without_a_response_and_detail_is_bounded() {
        let long = "x".repeat(5000);
        let f = Failure {
            reason: DeadReason::MaxAttempts,
            detail: &long,
            attempts: 5,
            last_status: None,
            stream: "s",
            seq: 1,
            published_unix_nanos: 0,
            subject: "a.b",
            failed_at: "t",
        };
        let h = headers(None, &f);
        assert!(h.get(wire::DLQ_LAST_STATUS).is_none());
        assert_eq!(h.get(wire::DLQ_DETAIL).unwrap().as_str().len(), MAX_DETAIL);
    }
}
