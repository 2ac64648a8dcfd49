//! Backlog-driven replica count: a pure function with a scale-down cooldown
//! so the processor does not flap.

use std::time::{Duration, Instant};

/// What scaling looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    /// Fewest replicas (may be 0).
    pub min: u32,
    /// Most replicas.
    pub max: u32,
    /// Backlog one replica is expected to handle (at least 1).
    pub target_backlog_per_replica: u32,
    /// Processor paused: always 0 replicas.
    pub paused: bool,
    /// Pending plus ack-pending messages; `None` when unknown (NATS down),
    /// in which case the current count is kept (within bounds).
    pub backlog: Option<u64>,
}

/// Memory between decisions for one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct State {
    /// Replicas last decided, `None` before the first decision (then the
    /// Deployment's current count, if any, is used).
    pub current: Option<i32>,
    /// Since when the backlog has asked for fewer replicas than `current`.
    pub below_since: Option<Instant>,
}

/// The replicas the backlog alone asks for: `ceil(backlog / target)` within
/// `[min, max]`.
pub fn wanted(input: &Input, backlog: u64) -> i32 {
    let per = u64::from(input.target_backlog_per_replica.max(1));
    let raw = backlog.div_ceil(per);
    let (min, max) = bounds(input);
    raw.clamp(u64::from(min), u64::from(max)) as i32
}

fn bounds(input: &Input) -> (u32, u32) {
    let max = input.max.max(input.min);
    (input.min, max)
}

/// Decide the replica count. Scaling up (or to the bounds after a spec
/// change) is immediate; scaling down waits until the backlog has asked for
/// fewer replicas for a whole `cooldown`. `fallback` is the Deployment's
/// current replica count, used when `state` has no decision yet.
pub fn decide(
    input: &Input,
    state: State,
    fallback: Option<i32>,
    now: Instant,
    cooldown: Duration,
) -> (i32, State) {
    if input.paused {
        return (
            0,
            State {
                current: Some(0),
                below_since: None,
            },
        );
    }
    let (min, max) = bounds(input);
    let current = state
        .current
        .or(fallback)
        .unwrap_or(min as i32)
        .clamp(min as i32, max as i32);
    let Some(backlog) = input.backlog else {
        return (
            current,
            State {
                current: Some(current),
                below_since: state.below_since,
            },
        );
    };
    let want = wanted(input, backlog);
    if want >= current {
        return (
            want,
            State {
                current: Some(want),
                below_since: None,
            },
        );
    }
    let since = state.below_since.unwrap_or(now);
    if now.saturating_duration_since(since) >= cooldown {
        (
            want,
            State {
                current: Some(want),
                below_since: None,
            },
        )
    } else {
        (
            current,
            State {
                current: Some(current),
                below_since: Some(since),
            },
        )
    }
}

/// How long until a pending scale-down is due, for requeueing; `None` when
/// none is pending.
pub fn scale_down_due_in(state: &State, now: Instant, cooldown: Duration) -> Option<Duration> {
    state
        .below_since
        .map(|since| cooldown.saturating_sub(now.saturating_duration_since(since)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(backlog: Option<u64>) -> Input {
        Input {
            min: 0,
            max: 5,
            target_backlog_per_replica: 10,
            paused: false,
            backlog,
        }
    }

    const CD: Duration = Duration::from_secs(60);

    #[test]
    fn wanted_is_ceil_within_bounds() {
        let i = input(None);
        assert_eq!(wanted(&i, 0), 0);
        assert_eq!(wanted(&i, 1), 1);
        assert_eq!(wanted(&i, 10), 1);
        assert_eq!(wanted(&i, 11), 2);
        assert_eq!(wanted(&i, 1_000_000), 5);
        let i = Input { min: 2, ..i };
        assert_eq!(wanted(&i, 0), 2);
    }

    #[test]
    fn scales_up_at_once_and_down_after_cooldown() {
        let t0 = Instant::now();
        let (d, s) = decide(&input(Some(35)), State::default(), None, t0, CD);
        assert_eq!(d, 4);
        // Backlog drops: keep 4 during the cooldown.
        let (d, s) = decide(&input(Some(0)), s, None, t0 + Duration::from_secs(1), CD);
        assert_eq!(d, 4);
        assert_eq!(s.below_since, Some(t0 + Duration::from_secs(1)));
        assert_eq!(
            scale_down_due_in(&s, t0 + Duration::from_secs(31), CD),
            Some(Duration::from_secs(30))
        );
        let (d, s) = decide(&input(Some(0)), s, None, t0 + Duration::from_secs(30), CD);
        assert_eq!(d, 4);
        // Cooldown over: straight to the new want (0).
        let (d, s) = decide(&input(Some(0)), s, None, t0 + Duration::from_secs(61), CD);
        assert_eq!(d, 0);
        assert_eq!(s.below_since, None);
    }

    #[test]
    fn a_rise_during_cooldown_resets_it() {
        let t0 = Instant::now();
        let (_, s) = decide(&input(Some(50)), State::default(), None, t0, CD);
        let (_, s) = decide(&input(Some(0)), s, None, t0 + Duration::from_secs(10), CD);
        let (d, s) = decide(&input(Some(50)), s, None, t0 + Duration::from_secs(50), CD);
        assert_eq!((d, s.below_since), (5, None));
        let (d, _) = decide(&input(Some(0)), s, None, t0 + Duration::from_secs(80), CD);
        assert_eq!(d, 5, "cooldown restarted at 80s");
    }

    #[test]
    fn paused_is_zero_and_unknown_backlog_keeps_current() {
        let t0 = Instant::now();
        let paused = Input {
            paused: true,
            ..input(Some(1000))
        };
        assert_eq!(decide(&paused, State::default(), Some(3), t0, CD).0, 0);
        // Unknown backlog keeps the Deployment's count, within bounds.
        assert_eq!(decide(&input(None), State::default(), Some(3), t0, CD).0, 3);
        assert_eq!(decide(&input(None), State::default(), Some(9), t0, CD).0, 5);
        let min2 = Input {
            min: 2,
            ..input(None)
        };
        assert_eq!(decide(&min2, State::default(), None, t0, CD).0, 2);
    }

    #[test]
    fn bounds_changes_apply_without_cooldown() {
        let t0 = Instant::now();
        let (_, s) = decide(&input(Some(50)), State::default(), None, t0, CD);
        let smaller = Input {
            max: 2,
            ..input(Some(50))
        };
        assert_eq!(decide(&smaller, s, None, t0, CD).0, 2);
    }
}
