//! docs/operations.md lists every metric the operator, the gateway and the
//! processor export, each with what it means and what to do about it.
//!
//! Labelled families do not appear in an exposition until they have a
//! series, so the names are read from the registering code (each
//! component's `metrics.rs`: a name literal followed by its help text,
//! under the component's prefix) and cross-checked against what the real
//! registries expose when empty.

use std::collections::BTreeSet;

use anyhow::Result;

/// Names a component's metrics source registers, with its prefix.
fn registered(path: &str, prefix: &str) -> Result<BTreeSet<String>> {
    let src = std::fs::read_to_string(spillway_tests::root().join(path))?;
    // `"name", "help"` (possibly across lines): a registration, in a call
    // or a table of them.
    let re = regex::Regex::new(r#""([a-z][a-z0-9_]*)",\s*"(?:[A-Z]|1 )"#)?;
    Ok(re
        .captures_iter(&src)
        .map(|c| {
            let n = &c[1];
            if n.starts_with("spillway_") {
                n.to_owned()
            } else {
                format!("{prefix}_{n}")
            }
        })
        .collect())
}

/// Metric names in a text exposition (counters without `_total`, as
/// registered).
fn exposed(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn operations_md_lists_every_metric() -> Result<()> {
    let mut all = BTreeSet::new();
    for (path, prefix) in [
        ("ingress-gateway/src/metrics.rs", "spillway_gateway"),
        ("processor/src/metrics.rs", "spillway_processor"),
        ("operator/src/metrics.rs", "spillway_operator"),
        ("api/src/metrics.rs", "spillway"),
    ] {
        all.extend(registered(path, prefix)?);
    }
    // The parse finds at least every metric the empty registries show.
    let mut reg = prometheus_client::registry::Registry::default();
    let _m = spillway_processor::metrics::Metrics::new(&mut reg);
    let mut processor = String::new();
    prometheus_client::encoding::text::encode(&mut processor, &reg)?;
    for text in [
        spillway_gateway::metrics::Metrics::new().encode(),
        spillway_operator::metrics::Metrics::new().render(),
        processor,
    ] {
        let shown = exposed(&text);
        let unparsed: Vec<&String> = shown.difference(&all).collect();
        assert!(
            unparsed.is_empty(),
            "not found in the sources: {unparsed:?}"
        );
    }
    assert!(all.len() > 30, "{all:?}");

    let doc = std::fs::read_to_string(spillway_tests::root().join("docs/operations.md"))?;
    let missing: Vec<&String> = all
        .iter()
        .filter(|n| !doc.contains(&format!("`{n}`")) && !doc.contains(&format!("`{n}_total`")))
        .collect();
    assert!(missing.is_empty(), "docs/operations.md lacks {missing:?}");
    Ok(())
}
