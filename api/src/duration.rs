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

/// What the CRD schema admits for a duration: the grammar [`parse`] reads.
/// The CRD's CEL rules add each field's range (and refuse what overflows
/// Go's `time.Duration`, as [`parse`] does), so every value the API server
/// stores deserializes.
pub const PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// Longest duration string the CRD schema admits.
pub const MAX_LEN: u32 = 32;

/// A duration that travels as a Go-style string (`"30s"`, `"1h30m"`) and is
/// a [`Duration`] in code: the CRD types and [`crate::wire`] use it, so no
/// component formats a duration only for another to parse it again.
///
/// Deserializing refuses what [`parse`] refuses. The CRD schema has refused
/// the same strings since its first version ([`PATTERN`], [`MAX_LEN`] and
/// the CEL range rules), so a stored WebhookEndpoint always deserializes;
/// a file-mode configuration with a bad duration fails with the field's
/// path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration(Duration);

impl GoDuration {
    /// `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    /// The duration.
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for GoDuration {
    /// Whole milliseconds: finer parts cannot be written in the Go-style
    /// form this type travels as.
    fn from(d: Duration) -> Self {
        Self(Duration::from_millis(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        ))
    }
}

impl From<GoDuration> for Duration {
    fn from(d: GoDuration) -> Self {
        d.0
    }
}

impl std::str::FromStr for GoDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map(Self)
    }
}

impl std::fmt::Display for GoDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format(self.0))
    }
}

impl serde::Serialize for GoDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(self.0))
    }
}

impl<'de> serde::Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for GoDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GoDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "maxLength": MAX_LEN,
            "pattern": PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_format_prints_parses_back() {
        // Found by tests/it/fuzz.rs: counts of 2^32 and more were
        // refused (a u32 multiplier), though `format` prints them.
        for d in [
            Duration::from_millis(4_294_967_296),
            Duration::from_secs(4_294_967_296),
            Duration::from_millis(1),
            Duration::ZERO,
        ] {
            assert_eq!(parse(&format(d)), Ok(d), "{}", format(d));
            let typed = GoDuration::from(d);
            let json = serde_json::to_string(&typed).unwrap();
            assert_eq!(serde_json::from_str::<GoDuration>(&json).unwrap(), typed);
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

    #[test]
    fn typed_durations_travel_as_go_strings_and_refuse_bad_ones() {
        let d: GoDuration = serde_json::from_str("\"1h30m\"").unwrap();
        assert_eq!(d.get(), Duration::from_secs(5400));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"90m\"");
        for bad in [
            "\"30\"",
            "\"1.5h\"",
            "\"\"",
            "\"99999999999999999999h\"",
            "30",
        ] {
            let e = serde_json::from_str::<GoDuration>(bad)
                .unwrap_err()
                .to_string();
            assert!(!e.is_empty(), "{bad} must be refused");
        }
        let e = serde_json::from_str::<GoDuration>("\"2 minutes\"").unwrap_err();
        assert!(e.to_string().contains("Go-style duration"), "{e}");
    }

    #[test]
    fn the_schema_is_the_parsers_grammar() {
        let schema = serde_json::to_value(schemars::schema_for!(GoDuration)).unwrap();
        assert_eq!(schema["pattern"], PATTERN);
        assert_eq!(schema["maxLength"], MAX_LEN);
        assert_eq!(schema["type"], "string");
    }
}
