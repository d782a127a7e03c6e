//! Retiring a queue pair without losing its completions.
//!
//! `ibv_destroy_qp` on mlx5 deletes every unpolled completion of that queue
//! pair from the CQ (`__mlx5_cq_clean` in `mlx5_destroy_qp`) and, for a
//! receive completion on a shared receive queue, silently puts the receive
//! back on the SRQ. Destroying a queue pair that still has completions in
//! flight would therefore lose receive buffers the engine owns (its pool
//! shrinks for good) and immediates or messages the sender already saw
//! complete. So a queue pair is never destroyed directly; it is retired:
//!
//! 1. it is moved to `IBV_QPS_ERR`, so the device flushes what is left on
//!    its send queue and accepts nothing more from the peer;
//! 2. when work was outstanding on its send queue, a signalled zero-length
//!    RDMA write (the *marker*) is posted behind it. A send queue completes
//!    in order, so once the marker's (flush) completion is polled, every
//!    work request before it has completed too: the send side is drained
//!    (the Linux kernel drains a send queue the same way, `ib_drain_sq`:
//!    state ERR, then a zero-length RDMA write, then wait for its CQE);
//! 3. the receive side has no per-queue-pair count (its receives belong to
//!    the SRQ). The device raises `IBV_EVENT_QP_LAST_WQE_REACHED` once the
//!    last receive the queue pair consumed has completed
//!    (`ibv_get_async_event(3)`); after that event, one sweep of the CQ
//!    down to empty has handed every receive completion of the queue pair
//!    to the engine. Providers that never raise the event (or an event
//!    lost to an overrun) are covered by a grace period after the send side
//!    drained ([`RECV_GRACE`]): receives in progress when the queue pair
//!    entered ERR complete within microseconds, the grace is 100 ms;
//! 4. only then is it destroyed.
//!
//! A retirement that does not finish within [`HARD_LIMIT`] (a device that
//! stopped producing completions) is destroyed anyway; the work still on
//! its ring then fails as flushed.
//!
//! Completions polled meanwhile are handled as usual: sends retire their
//! ring entries (done, failed or flushed), receives give their buffers
//! back to the engine, immediates are delivered. Retirements advance only
//! inside `poll`: a worker asleep on the completion channel finishes them
//! when it next wakes (the marker's completion wakes it; the grace period
//! does not), which only delays freeing the queue pair.

use std::time::{Duration, Instant};

/// How long after the send side drained a retiring queue pair waits for
/// `IBV_EVENT_QP_LAST_WQE_REACHED` before it is destroyed anyway.
pub(crate) const RECV_GRACE: Duration = Duration::from_millis(100);

/// The longest a retirement may take.
pub(crate) const HARD_LIMIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendSide {
    /// The marker is posted; its completion has not been polled yet.
    AwaitingMarker,
    /// Everything on the send queue has completed (since `at`).
    Drained { at: Instant },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecvSide {
    Waiting,
    /// `IBV_EVENT_QP_LAST_WQE_REACHED` was read; the CQ has not yet been
    /// polled empty since.
    LastWqe,
    /// The event was read and the CQ polled empty after it.
    Swept,
}

/// What to do with a retiring queue pair now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Keep polling.
    Wait,
    /// Drained: destroy it.
    Destroy,
    /// The hard limit passed: destroy it, failing what is left on its ring.
    GiveUp,
}

/// The retirement of one queue pair (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Drain {
    started: Instant,
    send: SendSide,
    recv: RecvSide,
}

impl Drain {
    /// The queue pair was moved to ERR at `now`; `marker` says whether a
    /// marker was posted behind outstanding work (false: its send queue was
    /// empty, so it is drained already).
    pub(crate) fn new(now: Instant, marker: bool) -> Self {
        let send = if marker { SendSide::AwaitingMarker } else { SendSide::Drained { at: now } };
        Drain { started: now, send, recv: RecvSide::Waiting }
    }

    pub(crate) fn awaiting_marker(&self) -> bool {
        self.send == SendSide::AwaitingMarker
    }

    /// The marker's completion was polled at `now`.
    pub(crate) fn marker_completed(&mut self, now: Instant) {
        if self.send == SendSide::AwaitingMarker {
            self.send = SendSide::Drained { at: now };
        }
    }

    /// `IBV_EVENT_QP_LAST_WQE_REACHED` was read for this queue pair.
    pub(crate) fn last_wqe_reached(&mut self) {
        if self.recv == RecvSide::Waiting {
            self.recv = RecvSide::LastWqe;
        }
    }

    /// The CQ was polled until it returned fewer completions than asked
    /// for (it was empty at that moment).
    pub(crate) fn cq_swept(&mut self) {
        if self.recv == RecvSide::LastWqe {
            self.recv = RecvSide::Swept;
        }
    }

    pub(crate) fn verdict(&self, now: Instant) -> Verdict {
        if let SendSide::Drained { at } = self.send {
            if self.recv == RecvSide::Swept || now.duration_since(at) >= RECV_GRACE {
                return Verdict::Destroy;
            }
        }
        if now.duration_since(self.started) >= HARD_LIMIT {
            return Verdict::GiveUp;
        }
        Verdict::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_for_the_marker_then_for_last_wqe_and_a_sweep() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, true);
        assert!(d.awaiting_marker());
        assert_eq!(d.verdict(t0 + 50 * MS), Verdict::Wait);
        // The event alone is not enough: completions written before it may
        // still be in the CQ.
        d.last_wqe_reached();
        assert_eq!(d.verdict(t0 + 50 * MS), Verdict::Wait);
        d.cq_swept();
        assert_eq!(d.verdict(t0 + 50 * MS), Verdict::Wait, "the send side is not drained yet");
        d.marker_completed(t0 + 60 * MS);
        assert!(!d.awaiting_marker());
        assert_eq!(d.verdict(t0 + 60 * MS), Verdict::Destroy);
    }

    #[test]
    fn a_sweep_before_the_event_does_not_count() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, false);
        d.cq_swept();
        assert_eq!(d.verdict(t0 + MS), Verdict::Wait);
        d.last_wqe_reached();
        assert_eq!(d.verdict(t0 + MS), Verdict::Wait);
        d.cq_swept();
        assert_eq!(d.verdict(t0 + MS), Verdict::Destroy);
    }

    #[test]
    fn without_the_event_the_grace_runs_from_the_marker() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, true);
        assert_eq!(d.verdict(t0 + RECV_GRACE * 2), Verdict::Wait, "the marker has not come back");
        let back = t0 + RECV_GRACE * 2;
        d.marker_completed(back);
        assert_eq!(d.verdict(back + RECV_GRACE - MS), Verdict::Wait);
        assert_eq!(d.verdict(back + RECV_GRACE), Verdict::Destroy);
        // An idle queue pair (nothing on its send queue) needs no marker.
        let idle = Drain::new(t0, false);
        assert_eq!(idle.verdict(t0), Verdict::Wait);
        assert_eq!(idle.verdict(t0 + RECV_GRACE), Verdict::Destroy);
    }

    #[test]
    fn a_marker_that_never_completes_gives_up_at_the_hard_limit() {
        let t0 = Instant::now();
        let mut d = Drain::new(t0, true);
        d.last_wqe_reached();
        d.cq_swept();
        assert_eq!(d.verdict(t0 + HARD_LIMIT - MS), Verdict::Wait);
        assert_eq!(d.verdict(t0 + HARD_LIMIT), Verdict::GiveUp);
        // A late marker after the verdict was read changes nothing bad.
        d.marker_completed(t0 + HARD_LIMIT);
        assert_eq!(d.verdict(t0 + HARD_LIMIT), Verdict::Destroy);
    }
}
