//! W3C trace context: one `traceparent` type for the gateway (which
//! keeps a provider's valid `traceparent` or starts a trace, and stores it
//! with the webhook) and the processor (which sends each delivery as a new
//! span of that trace). `tracestate` travels beside it unchanged.

/// A parsed `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id, never all zero.
    pub trace_id: [u8; 16],
    /// 8-byte parent (span) id, never all zero.
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

fn hex_into(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(())
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

impl TraceParent {
    /// Parse a header value; `None` when it is not a valid version-00 value.
    pub fn parse(v: &str) -> Option<Self> {
        let mut parts = v.trim().split('-');
        let (ver, tid, pid, fl) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if ver != "00" || parts.next().is_some() {
            return None;
        }
        let mut tp = TraceParent {
            trace_id: [0; 16],
            parent_id: [0; 8],
            flags: 0,
        };
        hex_into(tid, &mut tp.trace_id)?;
        hex_into(pid, &mut tp.parent_id)?;
        let mut f = [0u8; 1];
        hex_into(fl, &mut f)?;
        tp.flags = f[0];
        if tp.trace_id == [0; 16] || tp.parent_id == [0; 8] {
            return None;
        }
        Some(tp)
    }

    /// The header value.
    pub fn header(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &self.parent_id);
        out.push('-');
        push_hex(&mut out, &[self.flags]);
        out
    }
}

/// Random, never all-zero ids (W3C: all zero is invalid). Trace ids need
/// to be unique, not secret: a per-thread wyrand seeded from the OS makes
/// them without a system call per request.
fn random_trace_id() -> [u8; 16] {
    loop {
        let v = fastrand::u128(..);
        if v != 0 {
            return v.to_be_bytes();
        }
    }
}

fn random_span_id() -> [u8; 8] {
    loop {
        let v = fastrand::u64(..);
        if v != 0 {
            return v.to_be_bytes();
        }
    }
}

/// A new sampled trace (the gateway's, for a request without a valid
/// `traceparent`).
pub fn root() -> TraceParent {
    TraceParent {
        trace_id: random_trace_id(),
        parent_id: random_span_id(),
        flags: 1,
    }
}

/// The `traceparent` for a delivery: a new span (fresh parent id) in the
/// incoming trace when `incoming` is valid, else a new sampled trace.
pub fn child_of(incoming: Option<&str>) -> TraceParent {
    match incoming.and_then(TraceParent::parse) {
        Some(p) => TraceParent {
            parent_id: random_span_id(),
            ..p
        },
        None => root(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trips_a_valid_header() {
        let tp = TraceParent::parse(SAMPLE).unwrap();
        assert_eq!(tp.header(), SAMPLE);
        assert_eq!(tp.flags, 1);
    }

    #[test]
    fn rejects_invalid_headers() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn child_keeps_the_trace_and_gets_a_new_span() {
        let parent = TraceParent::parse(SAMPLE).unwrap();
        let child = child_of(Some(SAMPLE));
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.flags, parent.flags);
        assert_ne!(child.parent_id, parent.parent_id);
        let fresh = child_of(Some("garbage"));
        assert_ne!(fresh.trace_id, parent.trace_id);
        assert!(TraceParent::parse(&fresh.header()).is_some());
        assert_ne!(root().trace_id, root().trace_id);
    }
}
