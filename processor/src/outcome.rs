//! What to do with a message after a delivery attempt: a pure function of
//! the attempt's result, the attempt number and the retry policy.

use std::time::{Duration, SystemTime};

use crate::settings::backoff_after;

/// Longest `Retry-After` honoured; larger values are cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// The result of one HTTP attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// The sink answered.
    Response {
        /// HTTP status code.
        status: u16,
        /// Parsed `Retry-After`, if the response had a valid one.
        retry_after: Option<Duration>,
        /// A short, printable excerpt of the response body.
        excerpt: String,
    },
    /// No complete response within the delivery timeout.
    Timeout,
    /// The connection could not be made.
    Connect(String),
    /// Any other transport failure (reset, protocol error, ...).
    Transport(String),
}

impl AttemptResult {
    /// The status code, when there was a response.
    pub fn status(&self) -> Option<u16> {
        match self {
            AttemptResult::Response { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Metrics label: `2xx`..`5xx`, `timeout` or `error`.
    pub fn status_class(&self) -> &'static str {
        match self {
            AttemptResult::Response { status, .. } => match status / 100 {
                1 => "1xx",
                2 => "2xx",
                3 => "3xx",
                4 => "4xx",
                _ => "5xx",
            },
            AttemptResult::Timeout => "timeout",
            AttemptResult::Connect(_) | AttemptResult::Transport(_) => "error",
        }
    }

    /// A one-line description for logs and the dead-letter detail header.
    pub fn describe(&self) -> String {
        match self {
            AttemptResult::Response {
                status, excerpt, ..
            } if excerpt.is_empty() => {
                format!("sink answered {status}")
            }
            AttemptResult::Response {
                status, excerpt, ..
            } => {
                format!("sink answered {status}: {excerpt}")
            }
            AttemptResult::Timeout => "no response within the delivery timeout".into(),
            AttemptResult::Connect(e) => format!("could not connect to the sink: {e}"),
            AttemptResult::Transport(e) => format!("request to the sink failed: {e}"),
        }
    }
}

/// Why a message was dead-lettered (the `Spillway-Dlq-Reason` value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// Retryable failures until attempts ran out.
    MaxAttempts,
    /// The sink rejected the request with a 4xx that retrying cannot fix.
    ClientError,
    /// The sink answered 410 Gone: it no longer exists.
    Gone,
    /// Received longer ago than `stream.maxAge`: not delivered any more.
    Expired,
    /// Its stored form does not parse (`spillway_api::stored::Malformed`):
    /// kept for a person to look at, never delivered half-read.
    Malformed,
}

impl DeadReason {
    /// The header value and metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::MaxAttempts => "max_attempts",
            DeadReason::ClientError => "client_error",
            DeadReason::Gone => "gone",
            DeadReason::Expired => "expired",
            DeadReason::Malformed => "malformed",
        }
    }
}

/// What to do with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Delivered: acknowledge.
    Ack,
    /// Try again after `delay` (negative acknowledgement with delay).
    Retry {
        /// Wait before the next attempt.
        delay: Duration,
    },
    /// Give up: dead-letter the message.
    DeadLetter {
        /// Why.
        reason: DeadReason,
    },
}

/// Decide after attempt number `attempt` (1-based) of `max_attempts`.
///
/// 2xx acks. 410 and 4xx other than 408/409/429 dead-letter at once. 429 and
/// 503 with `Retry-After` retry after that delay (at most
/// [`MAX_RETRY_AFTER`]); every other failure (5xx, 408, 409, 429, 1xx/3xx,
/// timeouts, connection and transport errors) retries after the backoff for
/// this attempt. A retryable failure on the last attempt dead-letters with
/// [`DeadReason::MaxAttempts`].
pub fn decide(
    result: &AttemptResult,
    attempt: u32,
    max_attempts: u32,
    backoff: &[Duration],
) -> Decision {
    let mut delay = backoff_after(backoff, attempt);
    if let AttemptResult::Response {
        status,
        retry_after,
        ..
    } = result
    {
        match *status {
            200..=299 => return Decision::Ack,
            410 => {
                return Decision::DeadLetter {
                    reason: DeadReason::Gone,
                };
            }
            408 | 409 => {}
            429 | 503 => {
                if let Some(ra) = retry_after {
                    delay = (*ra).min(MAX_RETRY_AFTER);
                }
            }
            400..=499 => {
                return Decision::DeadLetter {
                    reason: DeadReason::ClientError,
                };
            }
            _ => {}
        }
    }
    if attempt >= max_attempts {
        Decision::DeadLetter {
            reason: DeadReason::MaxAttempts,
        }
    } else {
        Decision::Retry { delay }
    }
}

/// Parse a `Retry-After` value: delay-seconds or an HTTP-date (relative to
/// `now`; dates in the past mean no wait).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: &[Duration] = &[Duration::from_secs(1), Duration::from_secs(5)];

    fn status(s: u16) -> AttemptResult {
        AttemptResult::Response {
            status: s,
            retry_after: None,
            excerpt: String::new(),
        }
    }

    fn with_retry_after(s: u16, secs: u64) -> AttemptResult {
        AttemptResult::Response {
            status: s,
            retry_after: Some(Duration::from_secs(secs)),
            excerpt: String::new(),
        }
    }

    fn retry(secs: u64) -> Decision {
        Decision::Retry {
            delay: Duration::from_secs(secs),
        }
    }

    fn dead(reason: DeadReason) -> Decision {
        Decision::DeadLetter { reason }
    }

    #[test]
    fn success_acks_even_on_the_last_attempt() {
        for s in [200, 201, 202, 204, 299] {
            assert_eq!(decide(&status(s), 1, 3, BACKOFF), Decision::Ack);
            assert_eq!(decide(&status(s), 3, 3, BACKOFF), Decision::Ack);
        }
    }

    #[test]
    fn server_errors_and_transport_failures_retry_with_backoff() {
        for r in [
            status(500),
            status(502),
            status(503),
            status(504),
            AttemptResult::Timeout,
            AttemptResult::Connect("refused".into()),
            AttemptResult::Transport("reset".into()),
        ] {
            assert_eq!(decide(&r, 1, 5, BACKOFF), retry(1), "{r:?}");
            assert_eq!(decide(&r, 2, 5, BACKOFF), retry(5), "{r:?}");
            assert_eq!(decide(&r, 4, 5, BACKOFF), retry(5), "{r:?}");
        }
    }

    #[test]
    fn retryable_client_errors_retry() {
        for s in [408, 409, 429] {
            assert_eq!(decide(&status(s), 1, 5, BACKOFF), retry(1), "{s}");
        }
    }

    #[test]
    fn retry_after_is_honoured_and_bounded() {
        assert_eq!(decide(&with_retry_after(429, 7), 1, 5, BACKOFF), retry(7));
        assert_eq!(decide(&with_retry_after(503, 0), 2, 5, BACKOFF), retry(0));
        assert_eq!(
            decide(&with_retry_after(429, 86_400), 1, 5, BACKOFF),
            Decision::Retry {
                delay: MAX_RETRY_AFTER
            }
        );
        // Only 429 and 503 are read for Retry-After.
        assert_eq!(decide(&with_retry_after(500, 60), 1, 5, BACKOFF), retry(1));
    }

    #[test]
    fn other_client_errors_dead_letter_at_once() {
        for s in [400, 401, 403, 404, 405, 413, 415, 422, 451] {
            assert_eq!(
                decide(&status(s), 1, 5, BACKOFF),
                dead(DeadReason::ClientError),
                "{s}"
            );
        }
        assert_eq!(decide(&status(410), 1, 5, BACKOFF), dead(DeadReason::Gone));
    }

    #[test]
    fn exhausted_attempts_dead_letter() {
        assert_eq!(
            decide(&status(500), 3, 3, BACKOFF),
            dead(DeadReason::MaxAttempts)
        );
        assert_eq!(
            decide(&AttemptResult::Timeout, 1, 1, BACKOFF),
            dead(DeadReason::MaxAttempts)
        );
        assert_eq!(
            decide(&with_retry_after(429, 1), 9, 3, BACKOFF),
            dead(DeadReason::MaxAttempts)
        );
    }

    #[test]
    fn parses_retry_after_forms() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-1", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn status_classes() {
        assert_eq!(status(204).status_class(), "2xx");
        assert_eq!(status(404).status_class(), "4xx");
        assert_eq!(status(503).status_class(), "5xx");
        assert_eq!(AttemptResult::Timeout.status_class(), "timeout");
        assert_eq!(AttemptResult::Connect("x".into()).status_class(), "error");
        assert_eq!(status(400).describe(), "sink answered 400");
    }
}
