//! The connection handshake's decisions, without the device: what our side
//! of one peer connection does with each handshake message. The NIC
//! (`nic.rs`) carries them out on queue pairs; here they are tested against
//! a network that loses, duplicates and reorders messages while queue pairs
//! break.
//!
//! Each side has at most one queue pair per peer (in `nic.rs`, a pair of
//! them created together, RMA and message, which the RMA one names here).
//! A queue pair's identity is its generation: a number the side raises for
//! every new queue pair.
//! A request announces the sender's queue pair; the receiver connects its
//! own to it (replacing its own first unless it is fresh, i.e. not yet
//! connected) and replies; the requester connects on the reply that echoes
//! its current queue pair. Messages about generations older than the last
//! one seen from the peer are stale and ignored; a repeated request for the
//! current connection is answered again (its reply may have been lost).

use std::time::{Duration, Instant};

/// One side's queue pair, as the handshake describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct End {
    pub qpn: u32,
    pub psn: u32,
    pub generation: u32,
}

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No queue pair yet.
    Idle,
    /// Our queue pair waits in INIT for the peer's; a request is out.
    Connecting { started: Instant, last_sent: Instant, retry_after: Duration },
    /// Connected (RTS).
    Ready,
    /// Our queue pair went to the error state; replaced on next use.
    Broken,
    /// The handshake went unanswered: requests fail until `until`.
    Failed { until: Instant },
}

/// Our side of the connection to one peer NIC.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Link {
    /// Our current queue pair, if any.
    pub local: Option<End>,
    /// The peer's queue pair ours is connected to.
    pub remote: Option<End>,
    /// The highest generation seen from the peer.
    pub remote_seen: u32,
    pub phase: Phase,
    /// When the current series of connection attempts began: the first
    /// attempt since the link was last connected or gave up. Every attempt
    /// of the series shares its connect timeout, so a handshake that keeps
    /// failing after the reply (an RTR the device refuses, each retry
    /// making a new queue pair) still ends with `Failed`.
    pub attempts_since: Option<Instant>,
}

/// What to do with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct OnRequest {
    /// Replace our queue pair (failing what is outstanding on it) before
    /// connecting.
    pub replace: bool,
    /// Connect our queue pair to the requester's.
    pub connect: bool,
    /// Reply (after connecting).
    pub reply: bool,
}

impl Link {
    pub(crate) const fn new() -> Self {
        Link { local: None, remote: None, remote_seen: 0, phase: Phase::Idle, attempts_since: None }
    }

    pub(crate) fn is_connecting(&self) -> bool {
        matches!(self.phase, Phase::Connecting { .. })
    }

    /// A request from the peer announcing its queue pair `remote`.
    pub(crate) fn on_request(&self, remote: End) -> OnRequest {
        if remote.generation <= self.remote_seen {
            let current = self.remote == Some(remote) && self.phase == Phase::Ready;
            return OnRequest { reply: current, ..OnRequest::default() };
        }
        let fresh = self.local.is_some() && self.remote.is_none() && self.phase != Phase::Broken;
        OnRequest { replace: !fresh, connect: true, reply: true }
    }

    /// Whether a reply announcing `remote`, echoing our queue pair `echo`
    /// (generation and QPN), connects our queue pair.
    ///
    /// The echo is what makes a reply current: it names our queue pair of
    /// now, and every queue pair we make has a new generation. The peer's
    /// generation may equal one seen before: a queue pair of the peer's
    /// that we once connected to, then replaced ours, can be the one that
    /// answers our new request (found by the simulation below).
    pub(crate) fn on_reply(&self, remote: End, echo_generation: u32, echo_qpn: u32) -> bool {
        let ours = self.local.is_some_and(|l| l.generation == echo_generation && l.qpn == echo_qpn);
        ours && self.remote.is_none() && remote.generation >= self.remote_seen && self.phase != Phase::Broken
    }

    /// An attempt to connect starts at `now`: the phase it enters, with the
    /// start of the series it belongs to.
    pub(crate) fn attempt(&mut self, now: Instant, retry_after: Duration) -> Phase {
        let started = *self.attempts_since.get_or_insert(now);
        Phase::Connecting { started, last_sent: now, retry_after }
    }

    /// The series of attempts timed out: the next one starts a new series.
    pub(crate) fn gave_up(&mut self, until: Instant) -> Phase {
        self.attempts_since = None;
        Phase::Failed { until }
    }

    /// Our new queue pair (in INIT, connected to nothing).
    pub(crate) fn replaced(&mut self, local: End) {
        self.local = Some(local);
        self.remote = None;
    }

    /// Our queue pair was destroyed and no new one made (yet).
    pub(crate) fn forget_local(&mut self) {
        self.local = None;
        self.remote = None;
    }

    /// Our queue pair is connected to `remote`.
    pub(crate) fn connected(&mut self, remote: End) {
        self.remote = Some(remote);
        self.remote_seen = remote.generation;
        self.phase = Phase::Ready;
        self.attempts_since = None;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Copy, Debug)]
    enum Kind {
        Request,
        Reply { echo: End },
    }

    #[derive(Clone, Copy, Debug)]
    struct Message {
        to: usize,
        kind: Kind,
        from_end: End,
    }

    /// Two sides and the datagrams between them.
    struct World {
        links: [Link; 2],
        next_generation: [u32; 2],
        net: Vec<Message>,
        now: Instant,
    }

    impl World {
        fn new() -> Self {
            World { links: [Link::new(); 2], next_generation: [0; 2], net: Vec::new(), now: Instant::now() }
        }

        fn new_qp(&mut self, side: usize) {
            self.next_generation[side] += 1;
            let g = self.next_generation[side];
            // Distinct QPNs per side and generation, PSNs derived from them.
            let qpn = (side as u32 + 1) << 16 | g;
            self.links[side].replaced(End { qpn, psn: qpn ^ 0x5a5a, generation: g });
        }

        fn send(&mut self, from: usize, kind: Kind) {
            let from_end = self.links[from].local.expect("a queue pair to describe");
            self.net.push(Message { to: 1 - from, kind, from_end });
        }

        /// What the NIC does when the engine posts to a peer it is not
        /// connected to.
        fn connect(&mut self, side: usize) {
            if matches!(self.links[side].phase, Phase::Idle | Phase::Broken | Phase::Failed { .. }) {
                self.new_qp(side);
                let now = self.now;
                self.links[side].phase = self.links[side].attempt(now, Duration::from_millis(50));
                self.send(side, Kind::Request);
            }
        }

        fn retry(&mut self, side: usize) {
            if self.links[side].is_connecting() {
                self.send(side, Kind::Request);
            }
        }

        fn deliver(&mut self, m: Message) {
            let side = m.to;
            match m.kind {
                Kind::Request => {
                    let d = self.links[side].on_request(m.from_end);
                    if d.replace {
                        self.new_qp(side);
                    }
                    if d.connect {
                        self.links[side].connected(m.from_end);
                    }
                    if d.reply {
                        self.send(side, Kind::Reply { echo: m.from_end });
                    }
                }
                Kind::Reply { echo } => {
                    if self.links[side].on_reply(m.from_end, echo.generation, echo.qpn) {
                        self.links[side].connected(m.from_end);
                    }
                }
            }
        }

        fn consistent(&self) -> bool {
            let [a, b] = &self.links;
            a.phase == Phase::Ready
                && b.phase == Phase::Ready
                && a.remote == b.local
                && b.remote == a.local
                && a.local.is_some()
                && b.local.is_some()
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Connect(usize),
        Retry(usize),
        Deliver(usize),
        Drop(usize),
        Duplicate(usize),
        Break(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..2usize).prop_map(Step::Connect),
            (0..2usize).prop_map(Step::Retry),
            (0..8usize).prop_map(Step::Deliver),
            (0..8usize).prop_map(Step::Deliver),
            (0..8usize).prop_map(Step::Drop),
            (0..8usize).prop_map(Step::Duplicate),
            (0..2usize).prop_map(Step::Break),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever was lost, duplicated, reordered or broken on the way,
        /// once the network delivers again and the sides keep retrying,
        /// both end connected to each other's current queue pair; and no
        /// side ever goes back to an older generation of the peer.
        #[test]
        fn both_sides_always_end_connected_to_each_other(steps in proptest::collection::vec(step(), 0..60)) {
            let mut w = World::new();
            for s in steps {
                let seen = [w.links[0].remote_seen, w.links[1].remote_seen];
                match s {
                    Step::Connect(side) => w.connect(side),
                    Step::Retry(side) => w.retry(side),
                    Step::Deliver(i) if !w.net.is_empty() => {
                        let m = w.net.remove(i % w.net.len());
                        w.deliver(m);
                    }
                    Step::Drop(i) if !w.net.is_empty() => {
                        w.net.remove(i % w.net.len());
                    }
                    Step::Duplicate(i) if !w.net.is_empty() => {
                        let m = w.net[i % w.net.len()];
                        w.net.push(m);
                    }
                    Step::Break(side) if w.links[side].phase == Phase::Ready => {
                        w.links[side].phase = Phase::Broken;
                    }
                    _ => {}
                }
                prop_assert!(w.links[0].remote_seen >= seen[0] && w.links[1].remote_seen >= seen[1]);
            }
            // Heal: stale datagrams still in flight arrive, then the sides
            // use the connection (connect when not connected) and retry.
            for _ in 0..6 {
                while !w.net.is_empty() {
                    let m = w.net.remove(0);
                    w.deliver(m);
                }
                if w.consistent() {
                    break;
                }
                for side in 0..2 {
                    w.connect(side);
                    w.retry(side);
                }
            }
            prop_assert!(w.consistent(), "{:?}", w.links);
        }
    }

    /// Finding 12 of the verbs review: when the handshake's answer arrives
    /// but our side cannot use it (RTR refused: the link breaks and the next
    /// post reconnects), the attempts keep the start of the first, so the
    /// connect timeout still fires; a connection that worked, or a timeout,
    /// starts a new series.
    #[test]
    fn repeated_setup_failures_share_one_connect_timeout() {
        let timeout = Duration::from_secs(10);
        let mut w = World::new();
        let t0 = w.now;
        w.connect(0);
        for round in 1..=5u32 {
            // The peer answers; our RTR fails, so the link breaks.
            while !w.net.is_empty() {
                let m = w.net.remove(0);
                if let Kind::Reply { .. } = m.kind {
                    w.links[0].phase = Phase::Broken;
                } else {
                    w.deliver(m);
                }
            }
            w.now = t0 + Duration::from_secs(3) * round;
            w.connect(0);
            let Phase::Connecting { started, last_sent, .. } = w.links[0].phase else { panic!() };
            assert_eq!(started, t0, "round {round}: the series keeps its start");
            assert_eq!(last_sent, w.now);
        }
        let Phase::Connecting { started, .. } = w.links[0].phase else { panic!() };
        assert!(w.now.duration_since(started) >= timeout, "the NIC's timeout check fires");
        w.links[0].phase = w.links[0].gave_up(w.now + Duration::from_secs(1));
        w.now += Duration::from_secs(2);
        w.connect(0);
        assert!(matches!(w.links[0].phase, Phase::Connecting { started, .. } if started == w.now), "a new series");
        // A connection that comes up ends the series too.
        while !w.net.is_empty() {
            let m = w.net.remove(0);
            w.deliver(m);
        }
        assert!(w.consistent());
        assert_eq!(w.links[0].attempts_since, None);
        w.links[0].phase = Phase::Broken;
        w.now += Duration::from_secs(1);
        w.connect(0);
        assert!(matches!(w.links[0].phase, Phase::Connecting { started, .. } if started == w.now));
    }

    #[test]
    fn simultaneous_connect_uses_one_queue_pair_each() {
        let mut w = World::new();
        w.connect(0);
        w.connect(1);
        while !w.net.is_empty() {
            let m = w.net.remove(0);
            w.deliver(m);
        }
        assert!(w.consistent());
        assert_eq!(w.next_generation, [1, 1], "nobody replaced a queue pair");
    }

    #[test]
    fn stale_request_does_not_disturb_a_working_connection() {
        let mut w = World::new();
        w.connect(0);
        let first_request = w.net[0];
        while !w.net.is_empty() {
            let m = w.net.remove(0);
            w.deliver(m);
        }
        assert!(w.consistent());
        // Side 0 breaks and reconnects; then its first, long-delayed
        // request arrives again.
        w.links[0].phase = Phase::Broken;
        w.connect(0);
        while !w.net.is_empty() {
            let m = w.net.remove(0);
            w.deliver(m);
        }
        assert!(w.consistent());
        let before = w.links;
        w.deliver(first_request);
        assert!(w.net.is_empty(), "no reply to a stale request");
        assert_eq!(w.links[1].local, before[1].local, "not replaced");
        assert!(w.consistent());
    }
}
