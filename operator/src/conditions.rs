//! Status conditions: the pure merge that keeps `lastTransitionTime` stable
//! unless a condition's status flips, and the `Ready` summary.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use spillway_api::condition::{ACCEPTED, PROCESSOR_READY, READY, STREAM_READY};

/// The status of a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known (yet), e.g. while an earlier step blocks this one.
    Unknown,
}

impl Status {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// A condition as the reconciler wants it, before times are filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Condition type, e.g. `Accepted`.
    pub type_: &'static str,
    /// True, False or Unknown.
    pub status: Status,
    /// PascalCase reason.
    pub reason: String,
    /// Message a user can act on.
    pub message: String,
}

impl Desired {
    /// A condition with the given fields.
    pub fn new(
        type_: &'static str,
        status: Status,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// The `Ready` condition summarising `Accepted`, `StreamReady` and
/// `ProcessorReady`: True when all three are True; otherwise False (or
/// Unknown when nothing failed but something is unknown) with the reason and
/// message of the first condition that is not True.
pub fn ready(parts: &[Desired]) -> Desired {
    let order = [ACCEPTED, STREAM_READY, PROCESSOR_READY];
    let mut first_unknown = None;
    for t in order {
        match parts.iter().find(|c| c.type_ == t) {
            Some(c) if c.status == Status::True => {}
            Some(c) if c.status == Status::False => {
                return Desired::new(
                    READY,
                    Status::False,
                    c.reason.clone(),
                    format!("{t}: {}", c.message),
                );
            }
            Some(c) => {
                first_unknown.get_or_insert_with(|| {
                    Desired::new(
                        READY,
                        Status::Unknown,
                        c.reason.clone(),
                        format!("{t}: {}", c.message),
                    )
                });
            }
            None => {
                first_unknown.get_or_insert_with(|| {
                    Desired::new(
                        READY,
                        Status::Unknown,
                        "Pending",
                        format!("{t} not yet evaluated"),
                    )
                });
            }
        }
    }
    first_unknown.unwrap_or_else(|| {
        Desired::new(
            READY,
            Status::True,
            "Ready",
            "the endpoint accepts and delivers webhooks",
        )
    })
}

/// Merge the desired conditions into the existing ones: every condition
/// gets `observedGeneration = generation`; `lastTransitionTime` is kept from
/// the existing condition of the same type when its status is unchanged and
/// set to `now` otherwise. Existing conditions of other types are dropped
/// (the operator owns the whole list). Order follows `desired`.
pub fn merge(
    old: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let prev = old.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match prev {
                Some(p) if p.status == d.status.as_str() => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: d.type_.to_owned(),
                status: d.status.as_str().to_owned(),
                reason: d.reason.clone(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// The conditions whose status differs between `old` and `new`, as
/// `(type, old status, new status)`, for Events on transitions.
pub fn transitions(old: &[Condition], new: &[Condition]) -> Vec<(String, Option<String>, String)> {
    new.iter()
        .filter_map(|n| {
            let o = old
                .iter()
                .find(|c| c.type_ == n.type_)
                .map(|c| c.status.clone());
            (o.as_deref() != Some(n.status.as_str()))
                .then(|| (n.type_.clone(), o, n.status.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn all_true() -> Vec<Desired> {
        vec![
            Desired::new(ACCEPTED, Status::True, "Accepted", "ok"),
            Desired::new(STREAM_READY, Status::True, "StreamReady", "ok"),
            Desired::new(PROCESSOR_READY, Status::True, "Available", "ok"),
        ]
    }

    #[test]
    fn ready_is_true_only_when_all_parts_are() {
        assert_eq!(ready(&all_true()).status, Status::True);
        let mut parts = all_true();
        parts[1] = Desired::new(STREAM_READY, Status::False, "NatsUnavailable", "down");
        parts[2] = Desired::new(PROCESSOR_READY, Status::False, "PodsNotReady", "0/1");
        let r = ready(&parts);
        assert_eq!(r.status, Status::False);
        assert_eq!(r.reason, "NatsUnavailable");
        assert!(r.message.starts_with("StreamReady: "));
    }

    #[test]
    fn ready_false_beats_unknown() {
        let mut parts = all_true();
        parts[0] = Desired::new(ACCEPTED, Status::Unknown, "Checking", "");
        parts[2] = Desired::new(PROCESSOR_READY, Status::False, "PodsNotReady", "0/1");
        assert_eq!(ready(&parts).reason, "PodsNotReady");
        parts[2] = Desired::new(PROCESSOR_READY, Status::True, "Available", "");
        let r = ready(&parts);
        assert_eq!((r.status, r.reason.as_str()), (Status::Unknown, "Checking"));
        assert_eq!(ready(&parts[..1]).status, Status::Unknown);
    }

    #[test]
    fn transition_time_kept_unless_status_flips() {
        let first = merge(&[], &all_true(), Some(1), &t(100));
        assert!(first.iter().all(|c| c.last_transition_time == t(100)));
        assert!(first.iter().all(|c| c.observed_generation == Some(1)));

        // Same statuses, new reason/message and generation: times kept.
        let mut d = all_true();
        d[2].message = "2/2 ready".into();
        let second = merge(&first, &d, Some(2), &t(200));
        assert!(second.iter().all(|c| c.last_transition_time == t(100)));
        assert!(second.iter().all(|c| c.observed_generation == Some(2)));
        assert_eq!(second[2].message, "2/2 ready");

        // A flip moves only that condition's time.
        d[1] = Desired::new(STREAM_READY, Status::False, "NatsUnavailable", "down");
        let third = merge(&second, &d, Some(2), &t(300));
        assert_eq!(third[0].last_transition_time, t(100));
        assert_eq!(third[1].last_transition_time, t(300));
        assert_eq!(third[1].status, "False");
        assert_eq!(
            transitions(&second, &third),
            vec![(
                "StreamReady".to_owned(),
                Some("True".to_owned()),
                "False".to_owned()
            )]
        );
        // Merging the same desired state again is a fixpoint.
        assert_eq!(merge(&third, &d, Some(2), &t(400)), third);
        assert!(transitions(&third, &third).is_empty());
    }
}
