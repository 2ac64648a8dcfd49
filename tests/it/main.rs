//! Spillway's integration tests: one program (it links once), one module
//! per area. Each test starts the real parts it needs: nats-server (one per
//! test, or a 3-node cluster), the component binaries built by `make test`,
//! and the kube-apiserver + etcd shared by the program
//! (`spillway_tests::ControlPlane::shared`; tests keep to their own
//! namespaces).
//!
//! Run one area with `cargo test -p spillway-tests --test it <module>::`,
//! e.g. `--test it fault_suite::`.

mod operator_support;
mod processor_support;

mod api_crd;
mod attempts;
mod bench_gateway;
mod chart_argocd;
mod chart_helm;
mod chart_path_policy;
mod chart_rbac;
mod cli_dlq;
mod cli_kube;
mod cli_replay;
mod cli_send;
mod docs_metrics;
mod fault_suite;
mod fuzz;
mod gateway_e2e;
mod gateway_nats_auth;
mod gitops;
mod listeners;
mod local_run;
mod nats_tenancy;
mod operator_reconcile;
mod operator_scale;
mod operator_sink_gone;
mod operator_startup;
mod processor_burst;
mod processor_cap;
mod processor_dead_letter;
mod processor_lifecycle;
mod processor_ordering;
mod processor_retry;
mod processor_signing;
mod release;
mod tracing_otlp;
