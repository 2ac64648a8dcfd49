//! The KEDA ScaledObject that scales the processor on its consumers' lag
//! (when `processor.replicas.autoscaler: keda` and KEDA is installed).

use kube::ResourceExt;
use kube::api::ApiResource;
use kube::core::GroupVersionKind;
use serde_json::json;
use spillway_api::WebhookEndpoint;
use spillway_api::names::EndpointNames;

use super::deployment_name;
use crate::settings::Settings;

/// The API resource of KEDA's ScaledObject (a dynamic type: KEDA is optional).
pub fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"),
        "scaledobjects",
    )
}

/// The KEDA ScaledObject scaling the processor on the consumers' lag.
pub fn scaled_object(
    ep: &WebhookEndpoint,
    names: &EndpointNames,
    settings: &Settings,
) -> serde_json::Value {
    let r = &ep.spec.processor.replicas;
    let (min, max) = super::replica_bounds(&ep.spec.processor);
    let triggers: Vec<serde_json::Value> = super::consumer_names(ep, names)
        .iter()
        .map(|c| {
            let mut trigger = json!({
                "type": "nats-jetstream",
                "metadata": {
                    "natsServerMonitoringEndpoint": settings.nats_monitoring_endpoint,
                    "account": settings.keda_nats_account,
                    "stream": names.stream(),
                    "consumer": c,
                    "lagThreshold": r.target_backlog_per_replica.to_string(),
                    "useHttps": settings.keda_nats_use_https.to_string(),
                }
            });
            if let Some(auth) = &settings.keda_cluster_trigger_authentication {
                trigger["authenticationRef"] =
                    json!({"name": auth, "kind": "ClusterTriggerAuthentication"});
            }
            trigger
        })
        .collect();
    let mut annotations = serde_json::Map::new();
    if ep.spec.processor.paused {
        annotations.insert("autoscaling.keda.sh/paused-replicas".into(), json!("0"));
    }
    json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {
            "name": deployment_name(&ep.name_any()),
            "namespace": ep.namespace(),
            "labels": super::labels(&ep.name_any()),
            "annotations": annotations,
            "ownerReferences": [super::owner_ref(ep)],
        },
        "spec": {
            "scaleTargetRef": {"name": deployment_name(&ep.name_any())},
            "minReplicaCount": min,
            "maxReplicaCount": max,
            "cooldownPeriod": settings.scale_down_cooldown.as_secs(),
            "triggers": triggers,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::ep;

    #[test]
    fn keda_triggers_use_the_configured_account_and_authentication() {
        let e = ep("team", "gh", 1, None);
        let names = EndpointNames::new("team", "gh");
        let mut settings = Settings::defaults();
        let so = scaled_object(&e, &names, &settings);
        let t = &so["spec"]["triggers"][0];
        assert_eq!(t["metadata"]["account"], "$G");
        assert_eq!(t["metadata"]["useHttps"], "false");
        assert!(t.get("authenticationRef").is_none());
        settings.keda_nats_account = "ACCOUNT_A".into();
        settings.keda_nats_use_https = true;
        settings.keda_cluster_trigger_authentication = Some("nats-monitoring".into());
        let so = scaled_object(&e, &names, &settings);
        let t = &so["spec"]["triggers"][0];
        assert_eq!(t["metadata"]["account"], "ACCOUNT_A");
        assert_eq!(t["metadata"]["useHttps"], "true");
        assert_eq!(
            t["authenticationRef"],
            json!({"name": "nats-monitoring", "kind": "ClusterTriggerAuthentication"})
        );
    }
}
