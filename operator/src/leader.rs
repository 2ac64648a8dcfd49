//! Leader election through a `coordination.k8s.io/v1` Lease, so several
//! operator replicas can run and only one reconciles. kube 5 has no leader
//! election of its own; this is the usual acquire/renew loop with optimistic
//! concurrency (resourceVersion) on every write. As in client-go, a Lease
//! held by another replica is judged expired by this replica's own clock:
//! when its record (holder, renew time) has not changed for the lease
//! duration since this replica saw it change, never by comparing another
//! node's renew time with this node's wall clock (clock skew between nodes
//! would otherwise let two replicas lead at once).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// One replica's handle on the Lease.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The other holder's record as last seen, and when (local clock) it
    /// was first seen as it is.
    observed: Arc<Mutex<Option<Observed>>>,
}

/// A Lease record as this replica saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Holder, renew time and duration, as written in the Lease.
    pub record: (Option<String>, Option<MicroTime>, Option<i32>),
    /// When this replica first saw the record as it is.
    pub since: Instant,
}

/// Remember `record` seen at `now`: the time it was first seen as it is
/// (a changed record restarts the clock).
pub fn observe(
    last: &mut Option<Observed>,
    record: (Option<String>, Option<MicroTime>, Option<i32>),
    now: Instant,
) -> Instant {
    match last {
        Some(o) if o.record == record => o.since,
        _ => {
            *last = Some(Observed { record, since: now });
            now
        }
    }
}

/// Whether a record unchanged since `since` (local clock) has expired at
/// `now` for a lease of `duration`.
pub fn expired_locally(since: Instant, duration: Duration, now: Instant) -> bool {
    now.saturating_duration_since(since) > duration
}

impl std::fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish()
    }
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    /// A lock on Lease `namespace/name` for `identity`.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            observed: Arc::default(),
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Acquire the Lease if free or expired, renew it if held: true when
    /// this replica holds it afterwards. Losing a race is `Ok(false)`.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let secs = i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if conflict(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                let mine = spec.holder_identity.as_deref() == Some(&self.identity);
                if !mine && spec.holder_identity.is_some() {
                    let record = (
                        spec.holder_identity.clone(),
                        spec.renew_time.clone(),
                        spec.lease_duration_seconds,
                    );
                    let local_now = Instant::now();
                    let since = observe(
                        &mut self.observed.lock().unwrap_or_else(|e| e.into_inner()),
                        record,
                        local_now,
                    );
                    let held_for = Duration::from_secs(
                        u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
                    );
                    if !expired_locally(since, held_for, local_now) {
                        return Ok(false);
                    }
                }
                if !mine {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(secs);
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if conflict(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Give the Lease up (on shutdown) so another replica takes over at
    /// once. Errors are ignored: the Lease expires anyway.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(&self.identity) {
                spec.holder_identity = None;
                spec.renew_time = None;
                let _ = self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_judged_by_the_local_clock_since_the_record_last_changed() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let rec = |holder: &str, renew: i64| {
            (
                Some(holder.to_owned()),
                Some(MicroTime(Timestamp::from_second(renew).unwrap())),
                Some(15),
            )
        };
        let lease = Duration::from_secs(15);
        let mut last = None;
        // First seen at 0: not expired before 15 s of local time, whatever
        // the renew time says (the other node's clock may be far off).
        let since = observe(&mut last, rec("a", 1), at(0));
        assert!(!expired_locally(since, lease, at(10)));
        // Unchanged: the clock keeps running from the first sighting.
        let since = observe(&mut last, rec("a", 1), at(10));
        assert_eq!(since, at(0));
        assert!(expired_locally(since, lease, at(16)));
        // Renewed at 12: the clock restarts.
        let since = observe(&mut last, rec("a", 2), at(12));
        assert!(!expired_locally(since, lease, at(20)));
        assert!(expired_locally(since, lease, at(28)));
        // Another holder is another record.
        assert_eq!(observe(&mut last, rec("b", 2), at(30)), at(30));
    }
}
