//! Reading a stream's history with an ephemeral ordered consumer, and the
//! headers of messages put back into the main stream.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use spillway_api::{stored, wire};

/// A stored message read back.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Stream sequence.
    pub seq: u64,
    /// Subject it was stored under.
    pub subject: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Payload.
    pub payload: Vec<u8>,
    /// When it was stored.
    pub time: time::OffsetDateTime,
    /// Messages stored after it when it was read (for progress).
    pub pending: u64,
}

impl Stored {
    /// The webhook this message holds (either stored format,
    /// `spillway_api::stored`); a payload that does not parse is all body.
    pub fn webhook(&self) -> stored::Webhook {
        stored::decode(Some(&self.headers), &self.payload).unwrap_or_default()
    }
}

/// Where to start reading.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// The first message.
    First,
    /// This stream sequence.
    Seq(u64),
    /// The first message stored at or after this time.
    Time(time::OffsetDateTime),
}

/// Longest wait for the next message before the read is considered done.
const IDLE: Duration = Duration::from_secs(5);

/// Reads `stream` from a start point up to a last sequence (inclusive;
/// messages stored after the read began are not visited), with an ephemeral
/// ordered consumer: durable consumers are not touched.
pub struct Reader {
    stream: String,
    msgs: consumer::pull::Ordered,
    last: u64,
    done: bool,
    /// JetStream said more messages follow (at open, or with the last one
    /// read): silence then is a stall, not the end.
    more: bool,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("stream", &self.stream)
            .field("last", &self.last)
            .finish()
    }
}

impl Reader {
    /// Start reading `stream` at `start`, stopping after sequence `last`.
    pub async fn open(
        js: &jetstream::Context,
        stream: &str,
        start: Start,
        last: u64,
    ) -> Result<Self> {
        let s = js.get_stream(stream).await.with_context(|| {
            format!(
                "stream {stream} not found (is the endpoint ready, and the NATS account right?)"
            )
        })?;
        let deliver_policy = match start {
            Start::First => consumer::DeliverPolicy::All,
            Start::Seq(n) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: n.max(1),
            },
            Start::Time(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
        };
        let c = s
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating a reader on {stream}: {e}"))?;
        let more = c.cached_info().num_pending > 0;
        let msgs = c
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("reading {stream}: {e}"))?;
        Ok(Self {
            stream: stream.to_owned(),
            msgs,
            last,
            done: false,
            more,
        })
    }

    /// The next message, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Stored>> {
        if self.done {
            return Ok(None);
        }
        let next = match tokio::time::timeout(IDLE, self.msgs.next()).await {
            Err(_) | Ok(None) if self.more => {
                self.done = true;
                bail!(
                    "reading {} stalled for {}s before sequence {} (NATS slow or unavailable?)",
                    self.stream,
                    IDLE.as_secs(),
                    self.last
                );
            }
            Err(_) | Ok(None) => {
                self.done = true;
                return Ok(None);
            }
            Ok(Some(m)) => m.map_err(|e| anyhow::anyhow!("reading {}: {e}", self.stream))?,
        };
        let (seq, pending, time) = {
            let info = next
                .info()
                .map_err(|e| anyhow::anyhow!("message metadata: {e}"))?;
            (info.stream_sequence, info.pending, info.published)
        };
        if seq > self.last {
            self.done = true;
            return Ok(None);
        }
        if seq >= self.last || pending == 0 {
            self.done = true;
        }
        self.more = pending > 0;
        let m = next.message;
        Ok(Some(Stored {
            seq,
            subject: m.subject.to_string(),
            headers: m.headers.unwrap_or_default(),
            payload: m.payload.to_vec(),
            time,
            pending,
        }))
    }
}

/// Headers for putting a stored message back into the main stream: the
/// original headers without its message id and any dead-letter headers, with
/// `msg_id` as the new `Nats-Msg-Id`.
pub fn republish_headers(original: &HeaderMap, msg_id: &str) -> HeaderMap {
    let mut out = wire::carried_headers(original);
    out.insert(wire::NATS_MSG_ID, msg_id);
    // Its age for stream.maxAge starts again now.
    out.insert(
        wire::REQUEUED_AT,
        format!("{:.3}", jiff::Timestamp::now()).as_str(),
    );
    out
}

/// A header's value.
pub fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.as_str().to_owned())
}

/// Paces an operation to at most `rate` per second (no pacing when `None`).
#[derive(Debug)]
pub struct Pace(Option<tokio::time::Interval>);

impl Pace {
    /// A pacer for `rate` operations per second.
    pub fn new(rate: Option<u32>) -> Self {
        Self(rate.filter(|r| *r > 0).map(|r| {
            let mut i = tokio::time::interval(Duration::from_secs(1) / r);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        }))
    }

    /// Wait for the next slot.
    pub async fn tick(&mut self) {
        if let Some(i) = &mut self.0 {
            i.tick().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn republish_drops_old_id_and_dead_letter_headers() {
        let mut h = HeaderMap::new();
        h.insert(wire::NATS_MSG_ID, "orig");
        h.insert(wire::DELIVERY_ID, "evt_1");
        h.insert(wire::DLQ_REASON, "client_error");
        h.insert(wire::DLQ_ORIGINAL_SUBJECT, "spillway.in.a_b.0");
        h.insert("Spillway-Orig-X-Event", "push");
        let out = republish_headers(&h, "redrive-1");
        assert_eq!(
            header(&out, wire::NATS_MSG_ID).as_deref(),
            Some("redrive-1")
        );
        assert_eq!(header(&out, wire::DELIVERY_ID).as_deref(), Some("evt_1"));
        assert_eq!(
            header(&out, "Spillway-Orig-X-Event").as_deref(),
            Some("push")
        );
        assert!(out.get(wire::DLQ_REASON).is_none());
        assert!(out.get(wire::DLQ_ORIGINAL_SUBJECT).is_none());
    }
}
