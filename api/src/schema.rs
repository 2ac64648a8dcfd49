//! Hand-written schema fragments for fields schemars cannot describe the
//! Kubernetes way.

use schemars::{Schema, SchemaGenerator, json_schema};

/// An object the API server stores as given (used for the embedded pod
/// template, whose full schema would bloat the CRD).
pub(crate) fn preserve_unknown_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "Optional pod template for shipping your handler as a container beside Spillway's processor (point sink.url at http://localhost:PORT). Merged into the processor Deployment's pod template."
    })
}
