//! The receives that RDMA writes with immediate consume.
//!
//! A `WRITE_WITH_IMM` consumes one receive work request of the target queue
//! pair's receive queue (an SRQ here) and reports the immediate in that
//! receive's completion; the payload goes where the write says, never into
//! the receive's buffer. A queue pair has exactly one receive queue, so
//! immediates and two-sided messages cannot use different SRQs on one
//! queue pair. strait therefore connects each peer NIC with two RC queue
//! pairs (as pplx-garden's fabric-lib does: `msg_rc` on `msg_srq` and
//! `rma_rc` on `rma_srq`, verbs_domain.rs): one for sends, on the SRQ the
//! engine stocks with its message buffers, and one for writes and reads, on
//! an SRQ of zero-length receives (`num_sge = 0`) that only immediates
//! consume. That SRQ is a few thousand deep, costs no memory besides its
//! ring, and is restocked from `poll` in chained batches, so an immediate
//! never waits for the engine to hand a message buffer back.

use verbs_sys as sys;

/// Depth of the immediate SRQ (capped by the device's `max_srq_wr`).
pub(crate) const IMM_RECVS: usize = 4096;

/// Receives posted by one `ibv_post_srq_recv` at most.
pub(crate) const REPOST_BATCH: usize = 64;

/// Bookkeeping and the preallocated chain of zero-length receives.
pub(crate) struct ImmRecvs {
    wrs: Box<[sys::ibv_recv_wr; REPOST_BATCH]>,
    depth: usize,
    posted: usize,
}

impl std::fmt::Debug for ImmRecvs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImmRecvs").field("depth", &self.depth).field("posted", &self.posted).finish()
    }
}

impl ImmRecvs {
    /// `depth` receives, each with work-request id `wr_id`.
    pub(crate) fn new(depth: usize, wr_id: u64) -> Self {
        // SAFETY: ibv_recv_wr is plain data; all-zero is valid (a null
        // scatter list with num_sge 0 is a zero-length receive).
        let mut wrs: Box<[sys::ibv_recv_wr; REPOST_BATCH]> = Box::new(unsafe { std::mem::zeroed() });
        for wr in wrs.iter_mut() {
            wr.wr_id = wr_id;
        }
        ImmRecvs { wrs, depth: depth.max(1), posted: 0 }
    }

    pub(crate) fn depth(&self) -> usize {
        self.depth
    }

    /// A completion (successful or not) consumed one posted receive.
    pub(crate) fn consumed(&mut self) {
        self.posted = self.posted.saturating_sub(1);
    }

    /// How many receives to post now: the missing ones, in whole batches
    /// (at start-up, all of them), so that each doorbell carries many.
    pub(crate) fn due(&self) -> usize {
        let missing = self.depth - self.posted;
        let batch = REPOST_BATCH.min(self.depth);
        if self.posted == 0 {
            missing
        } else {
            missing / batch * batch
        }
    }

    /// The head of a chain of `count` (at most [`REPOST_BATCH`]) receives,
    /// linked in order, the last one ending the chain.
    pub(crate) fn chain(&mut self, count: usize) -> *mut sys::ibv_recv_wr {
        debug_assert!((1..=REPOST_BATCH).contains(&count));
        for i in 0..count {
            let next: *mut sys::ibv_recv_wr = if i + 1 < count { &mut self.wrs[i + 1] } else { std::ptr::null_mut() };
            self.wrs[i].next = next;
        }
        &mut self.wrs[0]
    }

    /// Position in the chain of a receive the device refused.
    pub(crate) fn index_of(&self, wr: *mut sys::ibv_recv_wr) -> usize {
        let base = self.wrs.as_ptr() as usize;
        (wr as usize).saturating_sub(base) / std::mem::size_of::<sys::ibv_recv_wr>()
    }

    /// `n` receives of the last chain were accepted.
    pub(crate) fn posted(&mut self, n: usize) {
        self.posted = (self.posted + n).min(self.depth);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_full_then_restocks_in_whole_batches() {
        let mut q = ImmRecvs::new(300, 0xfeed);
        assert_eq!(q.due(), 300, "everything at start-up");
        q.posted(300);
        assert_eq!(q.due(), 0);
        for _ in 0..REPOST_BATCH - 1 {
            q.consumed();
        }
        assert_eq!(q.due(), 0, "less than a batch missing: wait for more");
        q.consumed();
        assert_eq!(q.due(), REPOST_BATCH);
        for _ in 0..REPOST_BATCH + 5 {
            q.consumed();
        }
        assert_eq!(q.due(), 2 * REPOST_BATCH);
        q.posted(2 * REPOST_BATCH);
        assert_eq!(q.due(), 0);
        // A tiny SRQ (a device with a small max_srq_wr) batches by its depth.
        let mut small = ImmRecvs::new(8, 1);
        small.posted(8);
        small.consumed();
        assert_eq!(small.due(), 0);
        for _ in 0..7 {
            small.consumed();
        }
        assert_eq!(small.due(), 8);
    }

    #[test]
    fn chains_zero_length_receives() {
        let mut q = ImmRecvs::new(IMM_RECVS, 0xabc);
        let head = q.chain(3);
        let mut ids = Vec::new();
        let mut wr = head;
        while !wr.is_null() {
            // SAFETY: the chain links point into q's own array.
            let w = unsafe { &*wr };
            assert_eq!((w.num_sge, w.sg_list), (0, std::ptr::null_mut()), "no buffer");
            ids.push(w.wr_id);
            wr = w.next;
        }
        assert_eq!(ids, vec![0xabc; 3]);
        let third = q.wrs[2..].as_mut_ptr();
        assert_eq!(q.index_of(third), 2);
        // A shorter chain after a longer one ends where it should.
        q.chain(REPOST_BATCH);
        q.chain(1);
        assert!(q.wrs[0].next.is_null());
    }
}
