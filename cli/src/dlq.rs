//! `spillway dlq list` and `spillway dlq redrive`.

use std::collections::BTreeSet;
use std::io::Write;

use anyhow::{Result, bail};
use async_nats::jetstream;
use serde::Serialize;
use spillway_api::wire;

use crate::endpoint::EndpointRef;
use crate::history::{self, Pace, Reader, Start, header};
use crate::output::{self, Format};
use crate::progress::{Progress, Summary};

/// One dead letter, as listed (and one item of `dlq list -o json|yaml`;
/// field names in camelCase, see docs/cli.md). Neither the body nor the
/// original request headers are shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// Sequence in the dead-letter stream (what `--seq` takes).
    pub seq: u64,
    /// The provider's delivery id (what `--id` takes).
    pub delivery_id: Option<String>,
    /// Why it was dead-lettered (`client_error`, `max_attempts`, ...).
    pub reason: Option<String>,
    /// Delivery attempts made.
    pub attempts: Option<u32>,
    /// HTTP status of the last attempt, when the sink answered.
    pub last_status: Option<u16>,
    /// Where it came from in the main stream.
    pub original_subject: Option<String>,
    /// Its sequence in the main stream.
    pub original_seq: Option<u64>,
    /// When it was dead-lettered (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub dead_lettered_at: time::OffsetDateTime,
    /// Seconds since it was dead-lettered.
    pub age_seconds: i64,
    /// The same, for people (`45s`, `12m`, `3h`, `2d`).
    pub age: String,
    /// Failure detail.
    pub detail: Option<String>,
}

/// `dlq list` as a whole: the rows shown and how many there are.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    /// The endpoint (`namespace/name`).
    pub endpoint: String,
    /// The dead-letter stream read.
    pub dead_letter_stream: String,
    /// Dead letters in the stream; more than `items` when `--limit` cut.
    pub total: u64,
    /// The first `--limit` dead letters, oldest first.
    pub items: Vec<Row>,
}

/// Human-friendly age: `45s`, `12m`, `3h`, `2d`.
pub fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

async fn last_seq(js: &jetstream::Context, stream: &str) -> Result<(u64, u64)> {
    let mut s = js.get_stream(stream).await.map_err(|e| {
        anyhow::anyhow!(
            "dead-letter stream {stream} not found ({e}); is deadLetter enabled on the endpoint?"
        )
    })?;
    let st = &s.info().await?.state;
    Ok((st.messages, st.last_sequence))
}

/// Read the dead letters (up to `limit`).
pub async fn rows(js: &jetstream::Context, ep: &EndpointRef, limit: usize) -> Result<Listing> {
    let stream = ep.names().dead_letter_stream();
    let (count, last) = last_seq(js, &stream).await?;
    let mut out = Listing {
        endpoint: ep.to_string(),
        dead_letter_stream: stream.clone(),
        total: count,
        items: Vec::new(),
    };
    if count == 0 || limit == 0 {
        return Ok(out);
    }
    let now = time::OffsetDateTime::now_utc();
    let mut r = Reader::open(js, &stream, Start::First, last).await?;
    while let Some(m) = r.next().await? {
        out.items.push(row(&m, now));
        if out.items.len() >= limit {
            break;
        }
    }
    Ok(out)
}

fn row(m: &history::Stored, now: time::OffsetDateTime) -> Row {
    let h = &m.headers;
    let age_secs = (now - m.time).whole_seconds().max(0);
    Row {
        seq: m.seq,
        delivery_id: m.webhook().delivery_id,
        reason: header(h, wire::DLQ_REASON),
        attempts: header(h, wire::DLQ_ATTEMPTS).and_then(|v| v.trim().parse().ok()),
        last_status: header(h, wire::DLQ_LAST_STATUS).and_then(|v| v.trim().parse().ok()),
        original_subject: header(h, wire::DLQ_ORIGINAL_SUBJECT),
        original_seq: header(h, wire::DLQ_ORIGINAL_SEQ).and_then(|v| v.trim().parse().ok()),
        dead_lettered_at: m.time,
        age_seconds: age_secs,
        age: age(age_secs),
        detail: header(h, wire::DLQ_DETAIL),
    }
}

/// Print the dead letters as a table, JSON or YAML.
pub async fn list(
    js: &jetstream::Context,
    ep: &EndpointRef,
    limit: usize,
    format: Format,
) -> Result<()> {
    let listing = rows(js, ep, limit).await?;
    let mut out = std::io::stdout().lock();
    render(&mut out, &listing, format)
}

/// Write a listing in `format`.
pub fn render(out: &mut impl Write, listing: &Listing, format: Format) -> Result<()> {
    if output::structured(out, format, listing)? {
        return Ok(());
    }
    if listing.items.is_empty() {
        writeln!(out, "no dead letters for {}", listing.endpoint)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<8} {:<40} {:<13} {:>8} {:>6} {:>5}  DETAIL",
        "SEQ", "ID", "REASON", "ATTEMPTS", "STATUS", "AGE"
    )?;
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for r in &listing.items {
        let detail: String = r.detail.as_deref().unwrap_or("").chars().take(80).collect();
        writeln!(
            out,
            "{:<8} {:<40} {:<13} {:>8} {:>6} {:>5}  {}",
            r.seq,
            r.delivery_id.as_deref().unwrap_or("-"),
            r.reason.as_deref().unwrap_or("-"),
            dash(r.attempts.map(|a| a.to_string())),
            dash(r.last_status.map(|a| a.to_string())),
            r.age,
            detail
        )?;
    }
    let shown = listing.items.len() as u64;
    if listing.total > shown {
        writeln!(
            out,
            "({shown} of {} shown; raise --limit for more)",
            listing.total
        )?;
    }
    Ok(())
}

/// Which dead letters to redrive.
#[derive(Debug, Clone)]
pub enum Selection {
    /// All of them (those present when the redrive starts).
    All,
    /// By delivery id and/or dead-letter sequence.
    Some {
        /// Delivery ids.
        ids: BTreeSet<String>,
        /// Dead-letter stream sequences.
        seqs: BTreeSet<u64>,
    },
}

impl Selection {
    fn wants(&self, seq: u64, id: Option<&str>) -> bool {
        match self {
            Selection::All => true,
            Selection::Some { ids, seqs } => {
                seqs.contains(&seq) || id.is_some_and(|i| ids.contains(i))
            }
        }
    }
}

pub use spillway_api::wire::redrive_msg_id;

/// Result of a redrive.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Redriven {
    /// Put back into the main stream.
    pub moved: u64,
    /// Already put back by an earlier, interrupted run (only deleted now).
    pub duplicates: u64,
    /// Left in place because their original subject is missing or foreign.
    pub skipped: u64,
    /// How long it took.
    pub run: Summary,
}

/// Move selected dead letters back to the main stream: publish (awaiting
/// the PubAck) to the original subject, then delete the dead letter.
/// Progress goes to stderr (see [`Progress`]).
pub async fn redrive(
    js: &jetstream::Context,
    ep: &EndpointRef,
    sel: &Selection,
    rate: Option<u32>,
) -> Result<Redriven> {
    let stream_name = ep.names().dead_letter_stream();
    let (count, last) = last_seq(js, &stream_name).await?;
    if count == 0 {
        if let Selection::Some { ids, seqs } = sel
            && !(ids.is_empty() && seqs.is_empty())
        {
            let wanted: Vec<String> = ids
                .iter()
                .cloned()
                .chain(seqs.iter().map(|s| format!("seq {s}")))
                .collect();
            bail!(
                "there are no dead letters for {ep}: {} not found",
                wanted.join(", ")
            );
        }
        eprintln!("no dead letters for {ep}");
        return Ok(Redriven::default());
    }
    let total = match sel {
        Selection::All => count,
        Selection::Some { ids, seqs } => ((ids.len() + seqs.len()) as u64).min(count),
    };
    let mut progress = Progress::new("redriven", total);
    let mut done = Redriven::default();
    match redrive_all(js, ep, sel, rate, last, &mut progress, &mut done).await {
        Ok((seen_ids, seen_seqs)) => {
            done.run = progress.finish();
            if let Selection::Some { ids, seqs } = sel {
                let missing: Vec<String> = ids
                    .difference(&seen_ids)
                    .cloned()
                    .chain(seqs.difference(&seen_seqs).map(|s| format!("seq {s}")))
                    .collect();
                if !missing.is_empty() {
                    bail!(
                        "redrove {} dead letters, but these were not found in {stream_name}: {} (see `spillway dlq list {ep}`)",
                        done.moved,
                        missing.join(", ")
                    );
                }
            }
            Ok(done)
        }
        Err(e) => {
            progress.abandon();
            Err(e.context(format!(
                "the redrive of {ep} stopped after {} of {total} dead letters; run the same command \
                 again to go on: dead letters already put back are not delivered twice (within the \
                 stream's duplicate window)",
                done.moved + done.duplicates
            )))
        }
    }
}

async fn redrive_all(
    js: &jetstream::Context,
    ep: &EndpointRef,
    sel: &Selection,
    rate: Option<u32>,
    last: u64,
    progress: &mut Progress,
    done: &mut Redriven,
) -> Result<(BTreeSet<String>, BTreeSet<u64>)> {
    let stream_name = ep.names().dead_letter_stream();
    let dlq = js.get_stream(&stream_name).await?;
    // Unordered (the shared consumer exists): back to the listener that
    // dead-lettered each one only.
    let unordered = ep.unordered(js).await;
    let mut pace = Pace::new(rate);
    let mut seen_ids = BTreeSet::new();
    let mut seen_seqs = BTreeSet::new();
    let mut r = Reader::open(js, &stream_name, Start::First, last).await?;
    while let Some(m) = r.next().await? {
        let id = m.webhook().delivery_id;
        if !sel.wants(m.seq, id.as_deref()) {
            continue;
        }
        seen_seqs.insert(m.seq);
        if let Some(i) = &id {
            seen_ids.insert(i.clone());
        }
        let original = header(&m.headers, wire::DLQ_ORIGINAL_SUBJECT);
        let Some(subject) = ep.redrive_target(&m.subject, original.as_deref(), unordered) else {
            progress.note(&format!(
                "skipping dead letter {}: no valid {} header",
                m.seq,
                wire::DLQ_ORIGINAL_SUBJECT
            ));
            done.skipped += 1;
            progress.inc();
            continue;
        };
        pace.tick().await;
        let headers = history::republish_headers(&m.headers, &redrive_msg_id(&stream_name, m.seq));
        let ack = js
            .publish_with_headers(subject, headers, m.payload.clone().into())
            .await
            .map_err(|e| anyhow::anyhow!("publishing dead letter {}: {e}", m.seq))?
            .await
            .map_err(|e| anyhow::anyhow!("publishing dead letter {}: {e}", m.seq))?;
        dlq.delete_message(m.seq).await.map_err(|e| {
            anyhow::anyhow!("deleting dead letter {} after its redrive: {e}", m.seq)
        })?;
        if ack.duplicate {
            done.duplicates += 1;
        } else {
            done.moved += 1;
        }
        progress.inc();
    }
    Ok((seen_ids, seen_seqs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_short() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(125), "2m");
        assert_eq!(age(7300), "2h");
        assert_eq!(age(200_000), "2d");
        assert_eq!(age(-3), "0s");
    }

    #[test]
    fn rows_read_the_dead_letter_headers() {
        let mut h = async_nats::HeaderMap::new();
        h.insert(wire::DELIVERY_ID, "evt_1");
        h.insert(wire::DLQ_REASON, "client_error");
        h.insert(wire::DLQ_ATTEMPTS, "3");
        h.insert(wire::DLQ_LAST_STATUS, "422");
        h.insert(wire::DLQ_ORIGINAL_SUBJECT, "spillway.in.a_b.0");
        h.insert(wire::DLQ_ORIGINAL_SEQ, "17");
        h.insert(wire::DLQ_DETAIL, "sink answered 422");
        h.insert("Spillway-Orig-Authorization", "Bearer hunter2");
        let t = time::OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap();
        let m = history::Stored {
            seq: 5,
            subject: "spillway.dlq.a_b".into(),
            headers: h,
            payload: b"{\"card\":\"4242\"}".to_vec(),
            time: t,
            pending: 0,
        };
        let listing = Listing {
            endpoint: "a/b".into(),
            dead_letter_stream: "spillway_dlq_a_b".into(),
            total: 2,
            items: vec![row(&m, t + time::Duration::seconds(150))],
        };
        let mut out = Vec::new();
        render(&mut out, &listing, Format::Json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let want = serde_json::json!({
            "endpoint": "a/b", "deadLetterStream": "spillway_dlq_a_b", "total": 2,
            "items": [{
                "seq": 5, "deliveryId": "evt_1", "reason": "client_error", "attempts": 3,
                "lastStatus": 422, "originalSubject": "spillway.in.a_b.0", "originalSeq": 17,
                "deadLetteredAt": "2026-01-01T00:00:00Z", "ageSeconds": 150, "age": "2m",
                "detail": "sink answered 422"
            }]
        });
        assert_eq!(v, want);
        let text = String::from_utf8(out).unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("4242"),
            "{text}"
        );

        let mut out = Vec::new();
        render(&mut out, &listing, Format::Table).unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(t.contains("(1 of 2 shown; raise --limit for more)"), "{t}");
        let row = t.lines().nth(1).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cols[..6], ["5", "evt_1", "client_error", "3", "422", "2m"]);
    }

    #[test]
    fn selection_by_id_or_seq() {
        let sel = Selection::Some {
            ids: ["a".to_owned()].into(),
            seqs: [7].into(),
        };
        assert!(sel.wants(1, Some("a")));
        assert!(sel.wants(7, None));
        assert!(!sel.wants(2, Some("b")));
        assert!(Selection::All.wants(2, None));
    }

    #[test]
    fn redrive_ids_are_stable_per_dead_letter() {
        assert_eq!(redrive_msg_id("s_dlq", 4), redrive_msg_id("s_dlq", 4));
        assert_ne!(redrive_msg_id("s_dlq", 4), redrive_msg_id("s_dlq", 5));
    }
}
