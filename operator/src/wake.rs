//! Waking an endpoint scaled to zero as soon as a webhook arrives, instead
//! of at the next resync: while an endpoint runs no processor, the operator
//! holds a core NATS subscription on its intake subjects (a JetStream
//! publish is also an ordinary NATS message), and the first message asks
//! for a reconcile, which sees the backlog and scales up. The subscription
//! exists only while the endpoint is at zero, so the operator never sees
//! the traffic of running endpoints.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::StreamExt as _;
use kube::runtime::reflector::ObjectRef;
use spillway_api::WebhookEndpoint;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// The wake subscriptions, by endpoint uid.
#[derive(Debug, Default)]
pub struct Wakers {
    armed: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Wakers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, JoinHandle<()>>> {
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make sure a webhook on `subject` (wildcards allowed) wakes endpoint
    /// `target` (identified by `uid`). Idempotent while armed; re-armed when
    /// the earlier subscription has fired or ended.
    pub fn arm(
        &self,
        uid: &str,
        client: &async_nats::Client,
        subject: String,
        target: ObjectRef<WebhookEndpoint>,
        retrigger: mpsc::UnboundedSender<ObjectRef<WebhookEndpoint>>,
    ) {
        let mut armed = self.lock();
        if armed.get(uid).is_some_and(|h| !h.is_finished()) {
            return;
        }
        let client = client.clone();
        let task = tokio::spawn(async move {
            let mut sub = match client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(%subject, error = %e, "cannot watch for the first webhook of an idle endpoint; it wakes at the next resync");
                    return;
                }
            };
            if sub.next().await.is_some() {
                debug!(%subject, "webhook for an endpoint at zero replicas: waking it");
                let _ = retrigger.send(target);
            }
            let _ = sub.unsubscribe().await;
        });
        armed.insert(uid.to_owned(), task);
    }

    /// Stop watching endpoint `uid` (it runs pods, uses KEDA, is paused or
    /// gone).
    pub fn disarm(&self, uid: &str) {
        if let Some(h) = self.lock().remove(uid) {
            h.abort();
        }
    }

    /// How many endpoints are being watched (for tests and metrics).
    pub fn armed(&self) -> usize {
        self.lock().values().filter(|h| !h.is_finished()).count()
    }
}

impl Drop for Wakers {
    fn drop(&mut self) {
        for (_, h) in self.lock().drain() {
            h.abort();
        }
    }
}
