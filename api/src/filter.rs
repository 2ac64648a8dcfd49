//! A listener's filter: which stored webhooks it receives. The operator
//! compiles it when a WebhookListener is applied (a filter that does not
//! compile sets `Accepted=False` with the error) and the processor
//! evaluates it for every webhook before taking a delivery slot.
//!
//! - `eventTypes` match the provider's event type ([`crate::event`]);
//!   an entry ending in `*` matches by prefix (`invoice.*`). Empty: every
//!   event type, and webhooks without one.
//! - `filter` is a CEL expression over `headers` (the provider's request
//!   headers, names in lower case), `body` (the body parsed as JSON; `null`
//!   when it is not JSON) and `event` (the event type, `""` when there is
//!   none). It must evaluate to a bool; an expression that fails on a
//!   webhook (a missing field without `has()`, a type mismatch) does not
//!   match it.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Variables a filter may use.
pub const VARIABLES: &[&str] = &["headers", "body", "event"];

/// Longest filter expression accepted (the CRD says the same).
pub const MAX_EXPRESSION: usize = 4096;

/// A compiled filter.
#[derive(Clone)]
pub struct Filter {
    event_types: Vec<String>,
    program: Option<Arc<cel::Program>>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("event_types", &self.event_types)
            .field("program", &self.program.is_some())
            .finish()
    }
}

/// Why a webhook was not delivered to a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The listener receives it.
    Match,
    /// Its event type is not one of `eventTypes`.
    EventType,
    /// The expression evaluated to false.
    Expression,
    /// The expression failed on this webhook (counted apart: it may be a
    /// mistake in the filter).
    Error,
}

impl Verdict {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Match => "match",
            Verdict::EventType => "event_type",
            Verdict::Expression => "expression",
            Verdict::Error => "error",
        }
    }
}

impl Filter {
    /// Compile `eventTypes` and the optional expression; the error is the
    /// message a user sees in the listener's `Accepted` condition.
    pub fn compile(event_types: &[String], expression: Option<&str>) -> Result<Self, String> {
        if let Some(t) = event_types.iter().find(|t| t.trim().is_empty()) {
            return Err(format!("eventTypes has an empty entry ({t:?})"));
        }
        let program = match expression.map(str::trim).filter(|e| !e.is_empty()) {
            None => None,
            Some(e) if e.len() > MAX_EXPRESSION => {
                return Err(format!(
                    "filter is {} bytes long; at most {MAX_EXPRESSION}",
                    e.len()
                ));
            }
            Some(e) => {
                let p = cel::Program::compile(e).map_err(|err| {
                    format!("filter does not compile: {}", one_line(&err.to_string()))
                })?;
                let refs = p.references();
                let mut unknown: Vec<&str> = refs
                    .variables()
                    .into_iter()
                    .filter(|v| !VARIABLES.contains(v))
                    .collect();
                unknown.sort_unstable();
                if !unknown.is_empty() {
                    return Err(format!(
                        "filter uses unknown variable(s) {}; a filter may use headers, body and event",
                        unknown.join(", ")
                    ));
                }
                Some(Arc::new(p))
            }
        };
        Ok(Self {
            event_types: event_types.iter().map(|t| t.trim().to_owned()).collect(),
            program,
        })
    }

    /// Whether the filter lets everything through.
    pub fn is_open(&self) -> bool {
        self.event_types.is_empty() && self.program.is_none()
    }

    /// Decide for one webhook: `headers` are the provider's request headers
    /// (any case; a repeated header counts with its first value, as
    /// everywhere else), `body` the stored body.
    pub fn check<'a>(
        &self,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        body: &[u8],
    ) -> Verdict {
        if self.is_open() {
            return Verdict::Match;
        }
        let mut map: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in headers {
            map.entry(k.to_ascii_lowercase())
                .or_insert_with(|| v.to_owned());
        }
        let headers = map;
        let event =
            crate::event::event_type(|n| headers.get(&n.to_ascii_lowercase()).cloned(), body);
        if !self.event_types.is_empty()
            && !event
                .as_deref()
                .is_some_and(|e| self.event_types.iter().any(|t| type_matches(t, e)))
        {
            return Verdict::EventType;
        }
        let Some(program) = &self.program else {
            return Verdict::Match;
        };
        let body: serde_json::Value =
            serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
        let mut ctx = cel::Context::default();
        let (Ok(h), Ok(b)) = (cel::to_value(&headers), cel::to_value(&body)) else {
            return Verdict::Error;
        };
        ctx.add_variable_from_value("headers", h);
        ctx.add_variable_from_value("body", b);
        ctx.add_variable_from_value("event", event.unwrap_or_default());
        match program.execute(&ctx) {
            Ok(cel::Value::Bool(true)) => Verdict::Match,
            Ok(cel::Value::Bool(false)) => Verdict::Expression,
            _ => Verdict::Error,
        }
    }
}

/// `pattern` (exact, or a prefix ending in `*`) matches event type `e`.
fn type_matches(pattern: &str, e: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => e.starts_with(prefix),
        None => pattern == e,
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(types: &[&str], expr: Option<&str>) -> Filter {
        let types: Vec<String> = types.iter().map(|s| (*s).to_owned()).collect();
        Filter::compile(&types, expr).expect("compiles")
    }

    #[test]
    fn verdicts() {
        let gh = |event: &'static str| vec![("X-GitHub-Event", event)];
        let push = br#"{"ref":"refs/heads/main","repository":{"name":"api"}}"#;
        type Case<'a> = (Filter, Vec<(&'a str, &'a str)>, &'a [u8], Verdict);
        let cases: Vec<Case> = vec![
            (f(&[], None), vec![], b"anything", Verdict::Match),
            (f(&["push"], None), gh("push"), push, Verdict::Match),
            (f(&["push"], None), gh("issues"), push, Verdict::EventType),
            (f(&["push"], None), vec![], b"not json", Verdict::EventType),
            (
                f(&["invoice.*"], None),
                vec![],
                br#"{"type":"invoice.paid"}"#,
                Verdict::Match,
            ),
            (
                f(&["invoice.*"], None),
                vec![],
                br#"{"type":"charge.failed"}"#,
                Verdict::EventType,
            ),
            (
                f(&["push"], Some("body.ref == 'refs/heads/main'")),
                gh("push"),
                push,
                Verdict::Match,
            ),
            (
                f(&["push"], Some("body.ref.startsWith('refs/tags/')")),
                gh("push"),
                push,
                Verdict::Expression,
            ),
            (
                f(
                    &[],
                    Some("headers['x-github-event'] == 'push' && event == 'push'"),
                ),
                vec![("x-GitHub-event", "push")],
                push,
                Verdict::Match,
            ),
            // A missing field without has(): an error, not a match.
            (
                f(&[], Some("body.missing == 1")),
                gh("push"),
                push,
                Verdict::Error,
            ),
            (
                f(&[], Some("has(body.missing) && body.missing == 1")),
                gh("push"),
                push,
                Verdict::Expression,
            ),
            // Not a bool.
            (f(&[], Some("event")), gh("push"), push, Verdict::Error),
            // A body that is not JSON is null.
            (f(&[], Some("body == null")), vec![], b"a=b", Verdict::Match),
            // A repeated header: its first value, as `spillway events` shows.
            (
                f(&["push"], None),
                vec![("X-GitHub-Event", "push"), ("x-github-event", "issues")],
                push,
                Verdict::Match,
            ),
        ];
        for (i, (filter, headers, body, want)) in cases.into_iter().enumerate() {
            assert_eq!(filter.check(headers, body), want, "case {i}: {filter:?}");
        }
    }

    #[test]
    fn compile_errors_are_clear() {
        let cases: Vec<(Vec<String>, Option<String>, &str)> = vec![
            (
                vec![],
                Some("body.ref ==".into()),
                "filter does not compile",
            ),
            (
                vec![],
                Some("request.path == '/'".into()),
                "unknown variable(s) request",
            ),
            (vec![" ".into()], None, "eventTypes has an empty entry"),
            (vec![], Some("a".repeat(MAX_EXPRESSION + 1)), "at most 4096"),
        ];
        for (types, expr, want) in cases {
            let err = Filter::compile(&types, expr.as_deref()).expect_err("refused");
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }
}
