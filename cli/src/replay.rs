//! `spillway replay`: put stored webhooks back into the stream so they are
//! delivered again, without touching the live consumer.

use std::time::Duration;

use anyhow::{Result, bail};
use async_nats::jetstream;

use crate::endpoint::EndpointRef;
use crate::history::{self, Pace, Reader, Start};

/// What to replay.
#[derive(Debug, Clone)]
pub struct Range {
    /// Where to start.
    pub start: Start,
    /// Last stream sequence to replay (default: the last one when the
    /// replay starts).
    pub to: Option<u64>,
}

/// The message id of a replayed copy: unique per replay run and original
/// sequence, so a run that is repeated with the same `--replay-id` (after an
/// interruption) does not publish anything twice within the stream's
/// duplicate window.
pub fn replay_msg_id(run: &str, seq: u64) -> String {
    format!("replay-{run}-{seq}")
}

/// A new replay run id (time-based, unique enough for one user).
pub fn new_run_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!("{}{:09}", now.unix_timestamp(), now.nanosecond())
}

/// The start time for `--since`.
pub fn since(d: Duration) -> Result<time::OffsetDateTime> {
    let d = time::Duration::try_from(d)?;
    Ok(time::OffsetDateTime::now_utc() - d)
}

/// Outcome of a replay.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Copies stored.
    pub published: u64,
    /// Copies JetStream reported as duplicates of an earlier run.
    pub duplicates: u64,
    /// Messages on subjects this endpoint does not own (not replayed).
    pub skipped: u64,
}

/// Replay `range` of the endpoint's stream.
pub async fn replay(
    js: &jetstream::Context,
    ep: &EndpointRef,
    range: &Range,
    run: &str,
    rate: Option<u32>,
) -> Result<Replayed> {
    let stream_name = ep.names().stream();
    let mut stream = js.get_stream(&stream_name).await.map_err(|e| {
        anyhow::anyhow!("stream {stream_name} not found ({e}); is the endpoint ready?")
    })?;
    let state = stream.info().await?.state.clone();
    let last = range
        .to
        .unwrap_or(state.last_sequence)
        .min(state.last_sequence);
    if let Start::Seq(n) = range.start {
        if n > last {
            bail!("nothing to replay: --from-seq {n} is after the last stored sequence {last}");
        }
        if n < state.first_sequence {
            eprintln!(
                "note: messages before sequence {} are no longer stored (stream.maxAge or limits); starting there",
                state.first_sequence
            );
        }
    }
    let mut done = Replayed::default();
    if state.messages == 0 {
        eprintln!("the stream is empty: nothing to replay");
        return Ok(done);
    }
    let mut pace = Pace::new(rate);
    let mut r = Reader::open(js, &stream_name, range.start, last).await?;
    while let Some(m) = r.next().await? {
        if !ep.owns_subject(&m.subject) {
            done.skipped += 1;
            continue;
        }
        pace.tick().await;
        let headers = history::republish_headers(&m.headers, &replay_msg_id(run, m.seq));
        let ack = js
            .publish_with_headers(m.subject.clone(), headers, m.payload.clone().into())
            .await
            .map_err(|e| anyhow::anyhow!("replaying sequence {}: {e}", m.seq))?
            .await
            .map_err(|e| anyhow::anyhow!("replaying sequence {}: {e}", m.seq))?;
        if ack.duplicate {
            done.duplicates += 1;
        } else {
            done.published += 1;
        }
        let n = done.published + done.duplicates;
        if n % 100 == 0 {
            eprintln!("replayed {n} (at sequence {} of {last}) ...", m.seq);
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_make_distinct_message_ids() {
        assert_ne!(replay_msg_id("a", 1), replay_msg_id("b", 1));
        assert_ne!(replay_msg_id("a", 1), replay_msg_id("a", 2));
        assert!(!new_run_id().is_empty());
    }

    #[test]
    fn since_is_in_the_past() {
        let t = since(Duration::from_secs(7200)).unwrap();
        let ago = time::OffsetDateTime::now_utc() - t;
        assert!(ago.whole_seconds() >= 7199 && ago.whole_seconds() <= 7201);
    }
}
