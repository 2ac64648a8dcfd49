//! What every component's `/metrics` has in common.

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Register `spillway_build_info{component, version}` (always 1) in the
/// root of `registry`, as the operator, the gateway and the processor do.
pub fn register_build_info(registry: &mut Registry, component: &str) {
    let info = Family::<Vec<(String, String)>, Gauge>::default();
    info.get_or_create(&vec![
        ("component".to_owned(), component.to_owned()),
        ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
    ])
    .set(1);
    registry.register(
        "spillway_build_info",
        "Spillway's version and component (value 1)",
        info,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_names_component_and_version() {
        let mut r = Registry::default();
        register_build_info(&mut r, "gateway");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        assert!(
            text.contains(&format!(
                "spillway_build_info{{component=\"gateway\",version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }
}
