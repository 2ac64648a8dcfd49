//! `spillway replay`: put stored webhooks back into the stream so they are
//! delivered again, without touching the live consumer.

use std::time::Duration;

use anyhow::{Result, bail};
use async_nats::jetstream;

use crate::endpoint::EndpointRef;
use crate::history::{self, Pace, Reader, Start};
use crate::progress::{Progress, Summary};

/// What to replay.
#[derive(Debug, Clone)]
pub struct Range {
    /// Where to start.
    pub start: Start,
    /// Last stream sequence to replay (default: the last one when the
    /// replay starts).
    pub to: Option<u64>,
}

pub use spillway_api::wire::replay_msg_id;

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
    /// How long it took.
    pub run: Summary,
}

/// The command that resumes an interrupted replay from stream sequence
/// `from` (already replayed copies are deduplicated by the replay id).
pub fn resume_command(
    ep: &EndpointRef,
    from: u64,
    to: u64,
    run: &str,
    rate: Option<u32>,
    listener: Option<&str>,
) -> String {
    let mut c = format!("spillway replay {ep} --from-seq {from} --to-seq {to} --replay-id {run}");
    if let Some(r) = rate {
        c.push_str(&format!(" --rate {r}"));
    }
    if let Some(l) = listener {
        c.push_str(&format!(" --listener {l}"));
    }
    c
}

/// Replay `range` of the endpoint's stream. Progress goes to stderr (see
/// [`Progress`]); an error says how to resume.
pub async fn replay(
    js: &jetstream::Context,
    ep: &EndpointRef,
    range: &Range,
    run: &str,
    rate: Option<u32>,
    listener: Option<&str>,
) -> Result<Replayed> {
    // One listener: its due subject, which only its consumer reads (an
    // unordered endpoint; ordered ones have no listeners and replay in key
    // order through their partitions).
    let target = match listener {
        None => None,
        Some(asked) => {
            let token = crate::redeliver::listener_token(js, ep, asked).await?;
            let names = ep.names();
            if !ep.unordered(js).await {
                bail!(
                    "{ep} is ordered: it has no listeners to replay to; replay without --listener"
                );
            }
            Some((names.due_subject(&token), token))
        }
    };
    let stream_name = ep.names().history_stream();
    let mut stream = js.get_stream(&stream_name).await.map_err(|e| {
        anyhow::anyhow!("stream {stream_name} not found ({e}); is the endpoint ready?")
    })?;
    let state = stream.info().await?.state.clone();
    let last = range
        .to
        .unwrap_or(state.last_sequence)
        .min(state.last_sequence);
    let mut total = last.saturating_sub(state.first_sequence) + 1;
    if let Start::Seq(n) = range.start {
        if n > last {
            bail!("nothing to replay: --from-seq {n} is after the last stored sequence {last}");
        }
        if n < state.first_sequence {
            eprintln!(
                "note: messages before sequence {} are no longer stored (stream.maxAge or limits); starting there",
                state.first_sequence
            );
        } else {
            total = last - n + 1;
        }
    }
    if state.messages == 0 {
        eprintln!("the stream is empty: nothing to replay");
        return Ok(Replayed::default());
    }
    // Copies for one listener get message ids of their own: the same
    // replay id for another listener is not a duplicate.
    let run_key = match &target {
        Some((_, token)) => format!("{run}/{token}"),
        None => run.to_owned(),
    };
    let job = Job {
        js,
        ep,
        run: &run_key,
        rate,
        last,
        target: target.as_ref().map(|(s, _)| s.as_str()),
    };
    let mut st = State {
        progress: Progress::new("replayed", total.min(state.messages)),
        done: Replayed::default(),
        // Where to resume after an error: the message being replayed, else
        // the one after the last replayed.
        resume: match range.start {
            Start::Seq(n) => Some(n.max(state.first_sequence)),
            Start::First => Some(state.first_sequence),
            Start::Time(_) => None,
        },
    };
    match job.replay_all(range.start, &mut st).await {
        Ok(()) => {
            let mut done = st.done;
            done.run = st.progress.finish();
            Ok(done)
        }
        Err(e) => {
            st.progress.abandon();
            let n = st.done.published + st.done.duplicates;
            let how = match st.resume {
                Some(from) => format!(
                    "resume with `{}`",
                    resume_command(ep, from, last, run, rate, listener)
                ),
                None => format!("run the same command again with `--replay-id {run}`"),
            };
            Err(e.context(format!(
                "the replay of {ep} stopped after {n} webhooks; {how} (what was already replayed \
                 is not stored twice, within the stream's duplicate window)"
            )))
        }
    }
}

/// One replay run: what it copies and where to.
struct Job<'a> {
    js: &'a jetstream::Context,
    ep: &'a EndpointRef,
    /// The run id (part of every copy's message id).
    run: &'a str,
    rate: Option<u32>,
    /// Last stream sequence to replay.
    last: u64,
    /// One listener's due subject, instead of the intake subjects.
    target: Option<&'a str>,
}

/// What a run has done so far (kept when it fails, to say how to resume).
struct State {
    progress: Progress,
    done: Replayed,
    resume: Option<u64>,
}

impl Job<'_> {
    async fn replay_all(&self, start: Start, st: &mut State) -> Result<()> {
        let (js, ep, last) = (self.js, self.ep, self.last);
        let stream_name = ep.names().history_stream();
        let mut pace = Pace::new(self.rate);
        let mut r = Reader::open(js, &stream_name, start, last).await?;
        while let Some(m) = r.next().await? {
            st.resume = Some(m.seq);
            let n = st.done.published + st.done.duplicates + st.done.skipped;
            st.progress
                .set_total(n + 1 + m.pending.min(last.saturating_sub(m.seq)));
            let Some(subject) = ep
                .replay_subject(&m.subject)
                .map(|s| self.target.map_or(s, str::to_owned))
            else {
                st.done.skipped += 1;
                st.progress.inc();
                st.resume = Some(m.seq + 1);
                continue;
            };
            pace.tick().await;
            let headers = history::republish_headers(&m.headers, &replay_msg_id(self.run, m.seq));
            let ack = js
                .publish_with_headers(subject, headers, m.payload.clone().into())
                .await
                .map_err(|e| anyhow::anyhow!("replaying sequence {}: {e}", m.seq))?
                .await
                .map_err(|e| anyhow::anyhow!("replaying sequence {}: {e}", m.seq))?;
            if ack.duplicate {
                st.done.duplicates += 1;
            } else {
                st.done.published += 1;
            }
            st.progress.inc();
            st.resume = Some(m.seq + 1);
        }
        Ok(())
    }
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
    fn resume_command_carries_range_id_and_rate() {
        let ep = EndpointRef::parse("team/gh", "default").unwrap();
        assert_eq!(
            resume_command(&ep, 41, 90, "abc", Some(20), None),
            "spillway replay team/gh --from-seq 41 --to-seq 90 --replay-id abc --rate 20"
        );
        assert_eq!(
            resume_command(&ep, 1, 2, "x", None, Some("bot")),
            "spillway replay team/gh --from-seq 1 --to-seq 2 --replay-id x --listener bot"
        );
        assert_eq!(
            resume_command(&ep, 1, 2, "x", None, None),
            "spillway replay team/gh --from-seq 1 --to-seq 2 --replay-id x"
        );
    }

    #[test]
    fn since_is_in_the_past() {
        let t = since(Duration::from_secs(7200)).unwrap();
        let ago = time::OffsetDateTime::now_utc() - t;
        assert!(ago.whole_seconds() >= 7199 && ago.whole_seconds() <= 7201);
    }
}
