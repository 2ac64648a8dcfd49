//! `spillway dlq list` and `spillway dlq redrive`.

use std::collections::BTreeSet;
use std::io::Write as _;

use anyhow::{Result, bail};
use async_nats::jetstream;
use spillway_api::wire;

use crate::endpoint::EndpointRef;
use crate::history::{self, Pace, Reader, Start, header};

/// One dead letter, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Sequence in the dead-letter stream (what `--seq` takes).
    pub seq: u64,
    /// The provider's delivery id.
    pub id: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Attempts made.
    pub attempts: String,
    /// Last HTTP status.
    pub status: String,
    /// Seconds since it was dead-lettered.
    pub age_secs: i64,
    /// Failure detail.
    pub detail: String,
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
pub async fn rows(js: &jetstream::Context, ep: &EndpointRef, limit: usize) -> Result<Vec<Row>> {
    let stream = ep.names().dead_letter_stream();
    let (count, last) = last_seq(js, &stream).await?;
    let mut out = Vec::new();
    if count == 0 {
        return Ok(out);
    }
    let now = time::OffsetDateTime::now_utc();
    let mut r = Reader::open(js, &stream, Start::First, last).await?;
    while let Some(m) = r.next().await? {
        if out.len() >= limit {
            break;
        }
        let h = &m.headers;
        out.push(Row {
            seq: m.seq,
            id: header(h, wire::DELIVERY_ID).unwrap_or_default(),
            reason: header(h, wire::DLQ_REASON).unwrap_or_default(),
            attempts: header(h, wire::DLQ_ATTEMPTS).unwrap_or_default(),
            status: header(h, wire::DLQ_LAST_STATUS).unwrap_or_else(|| "-".into()),
            age_secs: (now - m.time).whole_seconds(),
            detail: header(h, wire::DLQ_DETAIL).unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Print the dead letters as a table.
pub async fn list(js: &jetstream::Context, ep: &EndpointRef, limit: usize) -> Result<()> {
    let rows = rows(js, ep, limit).await?;
    if rows.is_empty() {
        println!("no dead letters for {ep}");
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<8} {:<40} {:<13} {:>8} {:>6} {:>5}  DETAIL",
        "SEQ", "ID", "REASON", "ATTEMPTS", "STATUS", "AGE"
    )?;
    for r in &rows {
        let detail: String = r.detail.chars().take(80).collect();
        writeln!(
            out,
            "{:<8} {:<40} {:<13} {:>8} {:>6} {:>5}  {}",
            r.seq,
            r.id,
            r.reason,
            r.attempts,
            r.status,
            age(r.age_secs),
            detail
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

/// The message id a dead letter is redriven with: new relative to the
/// original (so it is not deduplicated against it), but the same for the
/// same dead letter, so a redrive interrupted between publish and delete and
/// run again is deduplicated by JetStream instead of delivered twice.
pub fn redrive_msg_id(dead_letter_stream: &str, seq: u64) -> String {
    format!("redrive-{dead_letter_stream}-{seq}")
}

/// Result of a redrive.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Redriven {
    /// Put back into the main stream.
    pub moved: u64,
    /// Already put back by an earlier, interrupted run (only deleted now).
    pub duplicates: u64,
    /// Left in place because their original subject is missing or foreign.
    pub skipped: u64,
}

/// Move selected dead letters back to the main stream: publish (awaiting
/// the PubAck) to the original subject, then delete the dead letter.
pub async fn redrive(
    js: &jetstream::Context,
    ep: &EndpointRef,
    sel: &Selection,
    rate: Option<u32>,
) -> Result<Redriven> {
    let names = ep.names();
    let stream_name = names.dead_letter_stream();
    let (count, last) = last_seq(js, &stream_name).await?;
    let mut done = Redriven::default();
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
        return Ok(done);
    }
    let dlq = js.get_stream(&stream_name).await?;
    let mut pace = Pace::new(rate);
    let mut seen_ids = BTreeSet::new();
    let mut seen_seqs = BTreeSet::new();
    let mut r = Reader::open(js, &stream_name, Start::First, last).await?;
    while let Some(m) = r.next().await? {
        let id = header(&m.headers, wire::DELIVERY_ID);
        if !sel.wants(m.seq, id.as_deref()) {
            continue;
        }
        seen_seqs.insert(m.seq);
        if let Some(i) = &id {
            seen_ids.insert(i.clone());
        }
        let target = header(&m.headers, wire::DLQ_ORIGINAL_SUBJECT);
        let Some(subject) = target.filter(|s| ep.owns_subject(s)) else {
            eprintln!(
                "skipping dead letter {}: no valid {} header",
                m.seq,
                wire::DLQ_ORIGINAL_SUBJECT
            );
            done.skipped += 1;
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
            anyhow::anyhow!(
                "deleting dead letter {} after its redrive: {e}; run the redrive again (it is deduplicated)",
                m.seq
            )
        })?;
        if ack.duplicate {
            done.duplicates += 1;
        } else {
            done.moved += 1;
        }
        let n = done.moved + done.duplicates;
        if n % 100 == 0 {
            eprintln!("redriven {n} ...");
        }
    }
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
