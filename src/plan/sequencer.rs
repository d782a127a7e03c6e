//! When each piece of a request may be posted, and when it is over.

/// Tracks one request's pieces from posting to completion.
///
/// Pieces are posted in index order. With `ordered_last` (the request carries
/// an immediate and has more than one piece), the last piece is held back
/// until every earlier piece has completed, so the immediate cannot overtake
/// the data on an unordered transport. After a failure nothing more is
/// posted, and the request ends once the pieces in flight have drained: it
/// has exactly one outcome, reported once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sequencer {
    pieces: u64,
    next: u64,
    in_flight: u64,
    ordered_last: bool,
    failed: bool,
}

impl Sequencer {
    /// A request of `pieces` pieces (at least 1).
    pub fn new(pieces: u64, has_imm: bool) -> Self {
        assert!(pieces > 0);
        Sequencer { pieces, next: 0, in_flight: 0, ordered_last: has_imm && pieces > 1, failed: false }
    }

    /// Index of the piece that may be posted now, if any.
    pub fn next_to_post(&self) -> Option<u64> {
        let held = self.ordered_last && self.next + 1 == self.pieces && self.in_flight > 0;
        (!self.failed && self.next < self.pieces && !held).then_some(self.next)
    }

    /// True when the piece about to be posted is the last one (it carries
    /// the request's immediate).
    pub fn is_last(&self, index: u64) -> bool {
        index + 1 == self.pieces
    }

    /// The piece returned by [`next_to_post`](Self::next_to_post) was posted.
    pub fn posted(&mut self) {
        debug_assert!(self.next_to_post().is_some());
        self.next += 1;
        self.in_flight += 1;
    }

    /// A posted piece completed, successfully or not.
    pub fn completed(&mut self, ok: bool) {
        debug_assert!(self.in_flight > 0);
        self.in_flight -= 1;
        self.failed |= !ok;
    }

    /// Posting failed before anything went out for this piece: no more
    /// pieces will be posted.
    pub fn abort(&mut self) {
        self.failed = true;
    }

    /// The request is over: `Some(true)` success, `Some(false)` failure,
    /// `None` still running.
    pub fn outcome(&self) -> Option<bool> {
        if self.in_flight > 0 {
            None
        } else if self.failed {
            Some(false)
        } else if self.next == self.pieces {
            Some(true)
        } else {
            None
        }
    }

    /// Pieces posted and not yet completed.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_piece_with_imm_goes_at_once() {
        let mut s = Sequencer::new(1, true);
        assert_eq!(s.next_to_post(), Some(0));
        assert!(s.is_last(0));
        s.posted();
        assert_eq!(s.outcome(), None);
        s.completed(true);
        assert_eq!(s.outcome(), Some(true));
    }

    #[test]
    fn last_piece_waits_for_the_others() {
        let mut s = Sequencer::new(3, true);
        s.posted();
        s.posted();
        assert_eq!(s.next_to_post(), None, "imm piece held while data is in flight");
        s.completed(true);
        assert_eq!(s.next_to_post(), None);
        s.completed(true);
        assert_eq!(s.next_to_post(), Some(2));
        s.posted();
        s.completed(true);
        assert_eq!(s.outcome(), Some(true));
    }

    #[test]
    fn without_imm_all_pieces_stream() {
        let mut s = Sequencer::new(3, false);
        for i in 0..3 {
            assert_eq!(s.next_to_post(), Some(i));
            s.posted();
        }
        assert_eq!(s.in_flight(), 3);
    }

    #[test]
    fn failure_stops_posting_and_drains() {
        let mut s = Sequencer::new(4, true);
        s.posted();
        s.posted();
        s.completed(false);
        assert_eq!(s.next_to_post(), None);
        assert_eq!(s.outcome(), None, "one piece still in flight");
        s.completed(true);
        assert_eq!(s.outcome(), Some(false));
    }

    /// Every interleaving of posts and completions of a small request ends
    /// in exactly one outcome, and the imm piece never goes while data is in
    /// flight.
    #[test]
    fn exhaustive_small_requests() {
        fn explore(
            s: Sequencer,
            imm: bool,
            pieces: u64,
            posted_last_with_data_in_flight: &mut bool,
            outcomes: &mut u64,
        ) {
            if let Some(ok) = s.outcome() {
                let _ = ok;
                *outcomes += 1;
                return;
            }
            let mut moved = false;
            if let Some(i) = s.next_to_post() {
                if imm && s.is_last(i) && pieces > 1 && s.in_flight() > 0 {
                    *posted_last_with_data_in_flight = true;
                }
                let mut t = s;
                t.posted();
                explore(t, imm, pieces, posted_last_with_data_in_flight, outcomes);
                moved = true;
            }
            if s.in_flight() > 0 {
                for ok in [true, false] {
                    let mut t = s;
                    t.completed(ok);
                    explore(t, imm, pieces, posted_last_with_data_in_flight, outcomes);
                }
                moved = true;
            }
            assert!(moved, "stuck with no outcome: {s:?}");
        }
        for pieces in 1..=4 {
            for imm in [false, true] {
                let mut bad = false;
                let mut outcomes = 0;
                explore(Sequencer::new(pieces, imm), imm, pieces, &mut bad, &mut outcomes);
                assert!(!bad);
                assert!(outcomes > 0);
            }
        }
    }
}
