//! Send-queue bookkeeping: work requests are chained and posted in
//! batches, and only some are signalled, so completions must be accounted
//! here rather than one CQE per operation.
//!
//! An RC send queue completes in order. Each queue pair keeps a ring of the
//! engine tokens of its posted work requests; a signalled completion
//! retires every entry up to it, and an error retires the ones before it
//! as done and fails it and every later one (the queue pair is in error
//! and flushes them). The ring's capacity is the send queue's depth, so the
//! queue cannot overflow: a post that would exceed it is refused as busy.

use std::ffi::c_void;

use verbs_sys as sys;

use crate::backend::{Op, OpKind};

/// Every this many work requests one is signalled, besides the last of
/// each posted chain, so that the hardware can reclaim send-queue slots.
pub(crate) const SIGNAL_EVERY: u64 = 16;

/// Work requests chained into one `ibv_post_send` at most.
pub(crate) const BATCH: usize = 32;

/// How [`SendRing::fail_from`] retired an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retired {
    Done,
    Failed,
    Flushed,
}

/// What the ring remembers of one posted work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub token: u64,
    pub kind: OpKind,
}

/// The posted, not yet completed work requests of one queue pair.
#[derive(Debug)]
pub(crate) struct SendRing {
    entries: Box<[Entry]>,
    /// Sequence number of the oldest outstanding entry.
    tail: u64,
    /// Sequence number the next entry gets.
    head: u64,
}

impl SendRing {
    pub(crate) fn new(capacity: usize) -> Self {
        SendRing { entries: vec![Entry { token: 0, kind: OpKind::Write }; capacity].into(), tail: 0, head: 0 }
    }

    pub(crate) fn outstanding(&self) -> usize {
        (self.head - self.tail) as usize
    }

    pub(crate) fn free(&self) -> usize {
        self.entries.len() - self.outstanding()
    }

    /// Records a work request; returns its sequence number and whether it
    /// must be signalled on its own account.
    pub(crate) fn push(&mut self, entry: Entry) -> (u64, bool) {
        debug_assert!(self.free() > 0);
        let seq = self.head;
        let len = self.entries.len() as u64;
        self.entries[(seq % len) as usize] = entry;
        self.head += 1;
        (seq, seq % SIGNAL_EVERY == SIGNAL_EVERY - 1)
    }

    /// Takes back the newest `count` entries (posted chain refused by the
    /// device), newest last.
    pub(crate) fn unpush(&mut self, count: usize, mut out: impl FnMut(Entry)) {
        let from = self.head - count as u64;
        for seq in from..self.head {
            out(self.entry(seq));
        }
        self.head = from;
    }

    /// The full sequence number of a completion that carried its low 32
    /// bits, if it is outstanding.
    pub(crate) fn resolve(&self, low: u32) -> Option<u64> {
        let seq = self.tail + u64::from(low.wrapping_sub(self.tail as u32));
        (seq < self.head).then_some(seq)
    }

    /// A signalled work request completed: it and every earlier one are done.
    pub(crate) fn complete_through(&mut self, seq: u64, mut done: impl FnMut(Entry)) {
        while self.tail <= seq && self.tail < self.head {
            done(self.entry(self.tail));
            self.tail += 1;
        }
    }

    /// Work request `seq` failed: earlier ones completed, it failed, and
    /// every later one was flushed.
    pub(crate) fn fail_from(&mut self, seq: u64, mut out: impl FnMut(Entry, Retired)) {
        while self.tail < self.head {
            let how = match self.tail.cmp(&seq) {
                std::cmp::Ordering::Less => Retired::Done,
                std::cmp::Ordering::Equal => Retired::Failed,
                std::cmp::Ordering::Greater => Retired::Flushed,
            };
            out(self.entry(self.tail), how);
            self.tail += 1;
        }
    }

    /// Everything outstanding, failed (the queue pair is being destroyed).
    pub(crate) fn drain(&mut self, mut failed: impl FnMut(Entry)) {
        while self.tail < self.head {
            failed(self.entry(self.tail));
            self.tail += 1;
        }
    }

    /// The kind of the outstanding work request `seq`.
    pub(crate) fn kind_at(&self, seq: u64) -> OpKind {
        self.entry(seq).kind
    }

    fn entry(&self, seq: u64) -> Entry {
        self.entries[(seq % self.entries.len() as u64) as usize]
    }
}

/// What a work request needs besides the operation: its id, whether it is
/// signalled, whether its payload goes inline, and the local key.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WrSpec {
    pub wr_id: u64,
    pub signaled: bool,
    pub inline: bool,
    pub lkey: u32,
}

/// Fills `wr` and its one scatter/gather entry for `op`. The chain link
/// (`next`) is left to the caller. A zero-length operation (the trailing
/// immediate of a sharded write) has no scatter/gather entry.
pub(crate) fn fill(wr: &mut sys::ibv_send_wr, sge: &mut sys::ibv_sge, op: &Op, spec: WrSpec) {
    // SAFETY: ibv_send_wr is plain data (integers, pointers, unions of
    // them); all-zero is valid for every field.
    *wr = unsafe { std::mem::zeroed() };
    wr.wr_id = spec.wr_id;
    *sge = sys::ibv_sge { addr: op.local as u64, length: op.len as u32, lkey: spec.lkey };
    if op.len > 0 {
        wr.sg_list = sge;
        wr.num_sge = 1;
    }
    wr.opcode = match (op.kind, op.imm) {
        (OpKind::Write, Some(_)) => sys::ibv_wr_opcode_IBV_WR_RDMA_WRITE_WITH_IMM,
        (OpKind::Write, None) => sys::ibv_wr_opcode_IBV_WR_RDMA_WRITE,
        (OpKind::Read, _) => sys::ibv_wr_opcode_IBV_WR_RDMA_READ,
        (OpKind::Send, Some(_)) => sys::ibv_wr_opcode_IBV_WR_SEND_WITH_IMM,
        (OpKind::Send, None) => sys::ibv_wr_opcode_IBV_WR_SEND,
    };
    if let (OpKind::Write | OpKind::Send, Some(imm)) = (op.kind, op.imm) {
        // Immediates travel in network byte order; the target converts back.
        wr.__bindgen_anon_1.imm_data = imm.to_be();
    }
    if op.kind != OpKind::Send {
        wr.wr.rdma = sys::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr: op.remote_addr, rkey: op.key as u32 };
    }
    let mut flags = 0;
    if spec.signaled {
        flags |= sys::ibv_send_flags_IBV_SEND_SIGNALED;
    }
    if spec.inline && op.len > 0 && op.kind != OpKind::Read {
        flags |= sys::ibv_send_flags_IBV_SEND_INLINE;
    }
    wr.send_flags = flags;
}

/// The work request that closes a retiring queue pair's send queue (see
/// `drain.rs`): a signalled zero-length RDMA write, which in the error
/// state completes (with a flush status) only after everything before it.
/// It names no memory (no scatter/gather entry, remote address and key 0)
/// and is never executed: the queue pair is in ERR when it is posted.
pub(crate) fn marker(wr_id: u64) -> sys::ibv_send_wr {
    // SAFETY: plain data; all-zero valid (see `fill`).
    let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
    wr.wr_id = wr_id;
    wr.opcode = sys::ibv_wr_opcode_IBV_WR_RDMA_WRITE;
    wr.send_flags = sys::ibv_send_flags_IBV_SEND_SIGNALED;
    wr
}

/// A batch of work requests for one queue pair, linked into a chain in
/// fixed arrays (no allocation per work request).
pub(crate) struct Chain {
    pub wrs: Box<[sys::ibv_send_wr; BATCH]>,
    pub sges: Box<[sys::ibv_sge; BATCH]>,
    pub len: usize,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain").field("len", &self.len).finish()
    }
}

impl Chain {
    pub(crate) fn new() -> Self {
        // SAFETY: arrays of plain data, all-zero valid (see `fill`).
        let (wrs, sges) = unsafe { (Box::new(std::mem::zeroed()), Box::new(std::mem::zeroed())) };
        Chain { wrs, sges, len: 0 }
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len == BATCH
    }

    /// Appends `op` and links it behind the previous work request.
    pub(crate) fn push(&mut self, op: &Op, spec: WrSpec) {
        let i = self.len;
        fill(&mut self.wrs[i], &mut self.sges[i], op, spec);
        if i > 0 {
            let next: *mut sys::ibv_send_wr = &mut self.wrs[i];
            self.wrs[i - 1].next = next;
        }
        self.len += 1;
    }

    /// Marks the last work request signalled (every posted chain ends with
    /// a completion) and returns the chain's head.
    pub(crate) fn seal(&mut self) -> *mut sys::ibv_send_wr {
        self.wrs[self.len - 1].next = std::ptr::null_mut();
        self.wrs[self.len - 1].send_flags |= sys::ibv_send_flags_IBV_SEND_SIGNALED;
        &mut self.wrs[0]
    }

    /// Index in the chain of a work request the device refused.
    pub(crate) fn index_of(&self, wr: *mut sys::ibv_send_wr) -> usize {
        let base = self.wrs.as_ptr() as usize;
        (wr as usize).saturating_sub(base) / std::mem::size_of::<sys::ibv_send_wr>()
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }
}

/// A local descriptor handed out by the verbs backend: the `ibv_mr`.
pub(crate) fn lkey_of(desc: *mut c_void) -> u32 {
    if desc.is_null() {
        0
    } else {
        // SAFETY: non-null descriptors of this backend are live `ibv_mr`s
        // (see `VerbsNic::register`), valid while the op is in flight.
        unsafe { (*desc.cast::<sys::ibv_mr>()).lkey }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, local: usize, len: u64, remote: u64, key: u64, imm: Option<u32>) -> Op {
        Op {
            kind,
            local: local as *mut u8,
            len,
            local_desc: std::ptr::null_mut(),
            peer: 0,
            remote_addr: remote,
            key,
            imm,
            delivery_complete: kind == OpKind::Write,
            host_memory: true,
            rows: crate::plan::Rows::ONE,
            token: 7,
        }
    }

    fn spec(wr_id: u64) -> WrSpec {
        WrSpec { wr_id, signaled: false, inline: false, lkey: 0x11 }
    }

    /// The chain as (opcode, local addr, len, remote addr, rkey, imm, flags).
    fn walk(chain: &mut Chain) -> Vec<(u32, u64, u32, u64, u32, u32, u32)> {
        let mut out = Vec::new();
        let mut wr = chain.seal();
        while !wr.is_null() {
            // SAFETY: the chain's links point into its own arrays.
            let w = unsafe { &*wr };
            let (addr, len) = if w.num_sge == 1 {
                // SAFETY: as above.
                let s = unsafe { &*w.sg_list };
                assert_eq!(s.lkey, 0x11);
                (s.addr, s.length)
            } else {
                (0, 0)
            };
            // SAFETY: union fields written whole by `fill`.
            let (rdma, imm) = unsafe { (w.wr.rdma, w.__bindgen_anon_1.imm_data) };
            out.push((w.opcode, addr, len, rdma.remote_addr, rdma.rkey, u32::from_be(imm), w.send_flags));
            wr = w.next;
        }
        out
    }

    const WRITE: u32 = sys::ibv_wr_opcode_IBV_WR_RDMA_WRITE;
    const WRITE_IMM: u32 = sys::ibv_wr_opcode_IBV_WR_RDMA_WRITE_WITH_IMM;
    const SIGNALED: u32 = sys::ibv_send_flags_IBV_SEND_SIGNALED;

    #[test]
    fn single_write_with_immediate() {
        let mut c = Chain::new();
        c.push(&op(OpKind::Write, 0x1000, 4096, 0x9000, 0xabc, Some(42)), spec(1));
        assert_eq!(walk(&mut c), vec![(WRITE_IMM, 0x1000, 4096, 0x9000, 0xabc, 42, SIGNALED)]);
    }

    #[test]
    fn paged_write_is_one_chain_with_the_immediate_last() {
        // Three pages (the second two coalesced by the planner into one
        // piece), then the request's immediate on the last piece.
        let mut c = Chain::new();
        c.push(&op(OpKind::Write, 0x10000, 4096, 0x80000, 5, None), spec(1));
        c.push(&op(OpKind::Write, 0x30000, 8192, 0x84000, 5, None), spec(2));
        c.push(&op(OpKind::Write, 0x50000, 4096, 0xa0000, 5, Some(9)), spec(3));
        assert_eq!(
            walk(&mut c),
            vec![
                (WRITE, 0x10000, 4096, 0x80000, 5, 0, 0),
                (WRITE, 0x30000, 8192, 0x84000, 5, 0, 0),
                (WRITE_IMM, 0x50000, 4096, 0xa0000, 5, 9, SIGNALED),
            ]
        );
    }

    #[test]
    fn scatter_targets_and_trailing_immediate() {
        // A scatter to two regions (different keys), then the zero-length
        // write that carries the immediate after every piece completed.
        let mut c = Chain::new();
        c.push(&op(OpKind::Write, 0x1000, 100, 0x7000, 1, None), spec(1));
        c.push(&op(OpKind::Write, 0x1064, 200, 0x9000, 2, None), spec(2));
        c.push(&op(OpKind::Write, 0, 0, 0x9000, 2, Some(3)), spec(3));
        let wrs = walk(&mut c);
        assert_eq!(wrs[0], (WRITE, 0x1000, 100, 0x7000, 1, 0, 0));
        assert_eq!(wrs[1], (WRITE, 0x1064, 200, 0x9000, 2, 0, 0));
        assert_eq!(wrs[2], (WRITE_IMM, 0, 0, 0x9000, 2, 3, SIGNALED), "no scatter/gather entry");
        assert_eq!(c.wrs[2].num_sge, 0);
    }

    /// A send with an immediate carries it (the backend contract: the
    /// engine's control messages are sends with an immediate).
    #[test]
    fn sends_carry_their_immediate() {
        let mut c = Chain::new();
        c.push(&op(OpKind::Send, 0x3000, 32, 0, 0, Some(0x5157)), spec(1));
        c.push(&op(OpKind::Send, 0x3000, 32, 0, 0, None), spec(2));
        let wrs = walk(&mut c);
        assert_eq!((wrs[0].0, wrs[0].5), (sys::ibv_wr_opcode_IBV_WR_SEND_WITH_IMM, 0x5157));
        assert_eq!((wrs[1].0, wrs[1].5), (sys::ibv_wr_opcode_IBV_WR_SEND, 0));
        assert_eq!((wrs[0].3, wrs[0].4), (0, 0), "no remote address on a send");
    }

    #[test]
    fn reads_sends_and_inline() {
        let mut c = Chain::new();
        c.push(&op(OpKind::Read, 0x1000, 64, 0x2000, 4, None), WrSpec { inline: true, ..spec(1) });
        c.push(&op(OpKind::Send, 0x3000, 32, 0, 0, None), WrSpec { inline: true, signaled: true, ..spec(2) });
        c.push(&op(OpKind::Write, 0x4000, 16, 0x5000, 4, None), WrSpec { inline: true, ..spec(3) });
        let wrs = walk(&mut c);
        assert_eq!(wrs[0].0, sys::ibv_wr_opcode_IBV_WR_RDMA_READ);
        assert_eq!(wrs[0].6, 0, "reads are never inline");
        assert_eq!(wrs[1].0, sys::ibv_wr_opcode_IBV_WR_SEND);
        assert_eq!(wrs[1].6, SIGNALED | sys::ibv_send_flags_IBV_SEND_INLINE);
        assert_eq!(wrs[2].6, SIGNALED | sys::ibv_send_flags_IBV_SEND_INLINE);
        let third: *mut sys::ibv_send_wr = &mut c.wrs[2];
        assert_eq!(c.index_of(third), 2);
    }

    #[test]
    fn the_drain_marker_is_a_signalled_empty_write() {
        let m = marker(0x77);
        assert_eq!((m.wr_id, m.opcode, m.send_flags, m.num_sge), (0x77, WRITE, SIGNALED, 0));
        assert!(m.next.is_null() && m.sg_list.is_null());
        // SAFETY: the union was zeroed whole.
        let rdma = unsafe { m.wr.rdma };
        assert_eq!((rdma.remote_addr, rdma.rkey), (0, 0));
    }

    fn e(token: u64) -> Entry {
        Entry { token, kind: OpKind::Write }
    }

    #[test]
    fn ring_signals_periodically_and_retires_in_order() {
        let mut r = SendRing::new(64);
        let signaled: Vec<u64> = (0..40).filter_map(|t| Some(r.push(e(t))).filter(|p| p.1).map(|p| p.0)).collect();
        assert_eq!(signaled, vec![15, 31]);
        assert_eq!((r.outstanding(), r.free()), (40, 24));
        let mut done = Vec::new();
        r.complete_through(15, |x| done.push(x.token));
        assert_eq!(done, (0..16).collect::<Vec<_>>());
        assert_eq!(r.resolve(20), Some(20));
        assert_eq!(r.resolve(3), None, "already retired");
        assert_eq!(r.resolve(40), None, "never posted");
    }

    #[test]
    fn ring_error_fails_the_rest() {
        let mut r = SendRing::new(8);
        for t in 0..6 {
            r.push(e(t));
        }
        let mut out = Vec::new();
        r.fail_from(2, |x, how| out.push((x.token, how)));
        use Retired::*;
        assert_eq!(out, vec![(0, Done), (1, Done), (2, Failed), (3, Flushed), (4, Flushed), (5, Flushed)]);
        assert_eq!(r.outstanding(), 0);
        // An error on the oldest entry completes nothing before it.
        r.push(e(9));
        let mut out = Vec::new();
        r.fail_from(6, |x, how| out.push((x.token, how)));
        assert_eq!(out, vec![(9, Failed)]);
    }

    #[test]
    fn ring_wraps_and_unpushes() {
        let mut r = SendRing::new(4);
        for round in 0..10u64 {
            let (a, _) = r.push(e(round));
            r.push(e(round + 100));
            let mut done = Vec::new();
            r.complete_through(a + 1, |x| done.push(x.token));
            assert_eq!(done, vec![round, round + 100]);
        }
        r.push(e(1));
        r.push(e(2));
        r.push(e(3));
        let mut back = Vec::new();
        r.unpush(2, |x| back.push(x.token));
        assert_eq!(back, vec![2, 3]);
        assert_eq!(r.outstanding(), 1);
        let mut drained = Vec::new();
        r.drain(|x| drained.push(x.token));
        assert_eq!(drained, vec![1]);
    }
}
