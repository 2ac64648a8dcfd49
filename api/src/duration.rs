//! Go-style durations (`500ms`, `30s`, `2m`, `1h30m`), the form the CRD uses
//! and the API server's CEL `duration()` understands.

use std::time::Duration;

/// A duration string that is not of the form `<number><unit>...` with units
/// `ms`, `s`, `m`, `h`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}: expected a Go-style duration such as 500ms, 30s, 2m or 1h30m")]
pub struct DurationError(pub String);

/// The longest duration Go (and so the API server's CEL) can hold: an
/// int64 of nanoseconds, about 292 years.
const GO_MAX: Duration = Duration::from_nanos(i64::MAX as u64);

/// Parse a Go-style duration made of `<digits><unit>` parts.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(s.to_owned());
    let mut rest = s;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return Err(err());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1u64, 2)
        } else if rest.starts_with('s') {
            (1000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return Err(err());
        };
        rest = &rest[len..];
        let part = n.checked_mul(unit_ms).ok_or_else(err)?;
        total = total
            .checked_add(Duration::from_millis(part))
            .filter(|t| *t <= GO_MAX)
            .ok_or_else(err)?;
    }
    Ok(total)
}

/// Format a duration the way [`parse`] reads it, in the largest exact unit.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_format_prints_parses_back() {
        // Found by tests/tests/fuzz.rs: counts of 2^32 and more were
        // refused (a u32 multiplier), though `format` prints them.
        for d in [
            Duration::from_millis(4_294_967_296),
            Duration::from_secs(4_294_967_296),
            Duration::from_millis(1),
            Duration::ZERO,
        ] {
            assert_eq!(parse(&format(d)), Ok(d), "{}", format(d));
        }
        assert!(
            parse("99999999999999999999h").is_err(),
            "overflow is an error"
        );
    }

    #[test]
    fn parses_units_and_sequences() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("72h"), Ok(Duration::from_secs(72 * 3600)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1m500ms"), Ok(Duration::from_millis(60_500)));
    }

    #[test]
    fn rejects_what_the_api_server_would() {
        for bad in [
            "",
            "30",
            "s",
            "1d",
            "1.5h",
            "-1s",
            "1h ",
            " 1h",
            "99999999999h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn format_round_trips() {
        for s in ["500ms", "30s", "2m", "72h", "0s"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
        assert_eq!(format(Duration::from_secs(90)), "90s");
    }
}
