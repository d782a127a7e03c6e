//! Driving the engine: a rank's regions, the group, dispatch and combine.

use std::time::{Duration, Instant};

use super::config::{record_bytes, MoeConfig, MoeDtype};
use super::plan::{expert_counts, in_round, send_plan, Placement, SendPlan};
use super::wire::MoeRankDesc;
use crate::error::{Error, Result};
use crate::{Access, CopyList, ImmCounter, ImmSlot, ImmSpace, MemoryRegion, Strided, Transfer, TransferEngine};

/// Phases, each with its own immediate slot (the `sub` of an immediate is
/// the sending rank).
const COUNTS: usize = 0;
const DATA: usize = 1;
const FREED: usize = 2;
const COMBINE: usize = 3;
const PHASES: [&str; 4] = ["counts", "dispatch data", "pool release", "combine data"];

/// One rank's half of a MoE group before it is connected: its registered
/// regions and its descriptor.
pub struct MoeRank {
    engine: TransferEngine,
    config: MoeConfig,
    rank: u32,
    counts: MemoryRegion,
    pool: MemoryRegion,
    combine: MemoryRegion,
    /// This rank's counts vector, sent to every rank.
    counts_out: MemoryRegion,
    /// Dispatched copies and their records, packed in send order.
    dispatch_out: MemoryRegion,
    /// Expert-output rows on their way back.
    combine_out: MemoryRegion,
    slots: [ImmSlot; 4],
    desc: MoeRankDesc,
}

impl std::fmt::Debug for MoeRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeRank").field("rank", &self.rank).field("config", &self.config).finish()
    }
}

impl MoeRank {
    /// Allocates and registers rank `rank`'s regions for `config` (see
    /// [`MoeConfig::memory`]).
    pub fn new(engine: &TransferEngine, config: MoeConfig, rank: u32) -> Result<Self> {
        config.validate()?;
        if rank >= config.ranks {
            return Err(Error::InvalidRequest(format!("MoE rank {rank} of {}", config.ranks)));
        }
        let m = config.memory();
        let counts = engine.alloc(m.counts.max(1), Access::REMOTE_WRITE)?;
        let pool = engine.alloc(m.pool.max(1), Access::REMOTE_WRITE)?;
        let combine = engine.alloc(m.combine.max(1), Access::REMOTE_WRITE)?;
        let counts_out = engine.alloc(u64::from(config.experts + config.ranks) * 4, Access::LOCAL)?;
        let item = u64::from(config.token_bytes) + record_bytes(config.top_k);
        let dispatch_out = engine.alloc((config.max_items() * item).max(1), Access::LOCAL)?;
        let combine_out = engine.alloc((config.capacity() * config.row_bytes()).max(1), Access::LOCAL)?;
        let slots = [
            engine.imm_slot(ImmSpace::Moe)?,
            engine.imm_slot(ImmSpace::Moe)?,
            engine.imm_slot(ImmSpace::Moe)?,
            engine.imm_slot(ImmSpace::Moe)?,
        ];
        let desc = MoeRankDesc {
            rank,
            config: config.fingerprint(),
            counts: counts.descriptor().clone(),
            pool: pool.descriptor().clone(),
            combine: combine.descriptor().clone(),
            slots: [slots[0].slot(), slots[1].slot(), slots[2].slot(), slots[3].slot()],
        };
        Ok(MoeRank {
            engine: engine.clone(),
            config,
            rank,
            counts,
            pool,
            combine,
            counts_out,
            dispatch_out,
            combine_out,
            slots,
            desc,
        })
    }

    /// What the other ranks need: send its bytes to each of them.
    pub fn descriptor(&self) -> &MoeRankDesc {
        &self.desc
    }

    /// Joins the group: `ranks[r]` is rank `r`'s descriptor (this rank's
    /// own included). Checks every descriptor against the configuration.
    pub fn connect(self, ranks: &[MoeRankDesc]) -> Result<MoeGroup> {
        let n = self.config.ranks as usize;
        if ranks.len() != n {
            return Err(Error::InvalidRequest(format!("{} descriptors for a group of {n} ranks", ranks.len())));
        }
        for (r, d) in ranks.iter().enumerate() {
            d.check(&self.config, r as u32)?;
        }
        if ranks[self.rank as usize] != self.desc {
            return Err(Error::InvalidRequest(format!("descriptor {} is not this rank's", self.rank)));
        }
        let me = self.rank as u8;
        let mut imm_to = [vec![0u32; n], vec![0u32; n], vec![0u32; n], vec![0u32; n]];
        let mut counters: [Vec<Option<ImmCounter>>; 4] = Default::default();
        for p in 0..4 {
            for (r, d) in ranks.iter().enumerate() {
                imm_to[p][r] = crate::reserved_imm(ImmSpace::Moe, d.slots[p], me)?;
                counters[p].push(if r == self.rank as usize { None } else { Some(self.slots[p].expect(r as u8, 1)?) });
            }
        }
        Ok(MoeGroup { local: self, peers: ranks.to_vec(), imm_to, counters, failed: None, pings: vec![None; n] })
    }
}

/// A connected MoE group, seen from one rank: [`dispatch`](Self::dispatch)
/// and [`combine`](Self::combine), called by every rank in the same order.
///
/// Calls run one at a time per rank. Once a call has failed (a rank died
/// or went quiet past [`MoeConfig::timeout`]: the error names it), the
/// group refuses further calls: build a new one without that rank.
pub struct MoeGroup {
    local: MoeRank,
    peers: Vec<MoeRankDesc>,
    /// `imm_to[phase][rank]`: the immediate that tells `rank` this rank's
    /// `phase` event.
    imm_to: [Vec<u32>; 4],
    /// `counters[phase][rank]`: `rank`'s events of `phase` here (none for
    /// this rank itself).
    counters: [Vec<Option<ImmCounter>>; 4],
    failed: Option<Error>,
    pings: Vec<Option<(Instant, Transfer)>>,
}

impl std::fmt::Debug for MoeGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeGroup").field("rank", &self.local.rank).field("ranks", &self.peers.len()).finish()
    }
}

/// What a rank's experts received from one dispatch.
#[derive(Debug)]
pub struct Dispatched {
    /// `[local_experts, capacity, token_bytes]`: expert `e`'s copies are
    /// rows `0..counts[e]` of its block, sources in rank order, each
    /// source's in its (token, k) order.
    pub expert_x: Vec<u8>,
    /// Copies each local expert received.
    pub counts: Vec<u32>,
    /// Rows per expert block in `expert_x` (the largest count).
    pub capacity: u32,
    /// For [`MoeGroup::combine`], and the copies' sources.
    pub handle: MoeHandle,
}

/// Where a dispatch's copies came from, for combine.
#[derive(Clone, Debug)]
pub struct MoeHandle {
    tokens: u32,
    topk_idx: Vec<i32>,
    topk_weights: Vec<f32>,
    capacity: u32,
    counts: Vec<u32>,
    /// `(source rank, token, k)` of expert `e`'s row `i` at `e * capacity + i`.
    sources: Vec<(u16, u32, u16)>,
    /// Where rank `s`'s rows from this rank's experts start in `s`'s
    /// combine region (rows): its pairs for the experts of lower ranks.
    combine_base: Vec<u64>,
    /// Row of this rank's pair `t * top_k + k` in its own combine region:
    /// its pairs in global expert order, each expert's in (t, k) order (the
    /// order the experts' ranks send them in). `u32::MAX` for no expert.
    combine_pos: Vec<u32>,
}

impl MoeHandle {
    /// The source `(rank, token index, k)` of row `i` of local expert `e`.
    pub fn source(&self, e: u32, i: u32) -> Option<(u32, u32, u32)> {
        if e as usize >= self.counts.len() || i >= self.counts[e as usize] {
            return None;
        }
        let (r, t, k) = self.sources[(e * self.capacity + i) as usize];
        Some((u32::from(r), t, u32::from(k)))
    }

    /// Tokens this rank dispatched.
    pub fn tokens(&self) -> u32 {
        self.tokens
    }
}

/// A dispatch between its two halves ([`MoeGroup::dispatch_send`],
/// [`MoeGroup::dispatch_recv`]).
#[derive(Debug)]
pub struct DispatchInFlight {
    tokens: u32,
    topk_idx: Vec<i32>,
    topk_weights: Vec<f32>,
    placement: Placement,
    plan: SendPlan,
    combine_pos: Vec<u32>,
    posted: Vec<(u32, Transfer)>,
    next_round: Vec<u64>,
    /// Where the copies' records start in the send staging.
    records: u64,
    started: Instant,
}

impl MoeGroup {
    /// This rank.
    pub fn rank(&self) -> u32 {
        self.local.rank
    }

    /// The group's configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.local.config
    }

    fn check(&self) -> Result<()> {
        match &self.failed {
            Some(e) => Err(Error::InvalidRequest(format!("the MoE group failed earlier ({e}); build a new one"))),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: Error) -> Error {
        self.failed.get_or_insert_with(|| e.clone());
        e
    }

    /// Sends every (token, expert) copy of `x` (`[tokens, token_bytes]`)
    /// to the rank of its expert and returns what this rank's experts
    /// received. `topk_idx` and `topk_weights` are `[tokens, top_k]`; -1
    /// means no expert. Every rank calls it, with its own tokens (any
    /// number up to `max_tokens`, 0 included).
    pub fn dispatch(&mut self, x: &[u8], topk_idx: &[i32], topk_weights: &[f32]) -> Result<Dispatched> {
        let inflight = self.dispatch_send(x, topk_idx, topk_weights)?;
        self.dispatch_recv(inflight)
    }

    /// The send half of [`dispatch`](Self::dispatch): exchanges the
    /// per-expert counts (every rank's, so each knows where its copies
    /// land), then posts every copy that fits the receivers' pools. Do
    /// other work, then call [`dispatch_recv`](Self::dispatch_recv).
    pub fn dispatch_send(&mut self, x: &[u8], topk_idx: &[i32], topk_weights: &[f32]) -> Result<DispatchInFlight> {
        self.check()?;
        let c = self.local.config;
        let (tb, k) = (u64::from(c.token_bytes), c.top_k as usize);
        if !(x.len() as u64).is_multiple_of(tb) {
            return Err(Error::InvalidRequest(format!("x has {} bytes: not whole tokens of {tb}", x.len())));
        }
        let tokens = x.len() as u64 / tb;
        if tokens > u64::from(c.max_tokens) {
            return Err(Error::InvalidRequest(format!("{tokens} tokens; the group takes at most {}", c.max_tokens)));
        }
        if topk_idx.len() as u64 != tokens * k as u64 || topk_weights.len() != topk_idx.len() {
            return Err(Error::InvalidRequest(format!(
                "topk_idx and topk_weights must be [{tokens}, {k}] (got {} and {})",
                topk_idx.len(),
                topk_weights.len()
            )));
        }
        let shape = c.shape();
        let mine = expert_counts(shape, topk_idx)?;
        let plan = send_plan(shape, topk_idx)?;
        let started = Instant::now();

        // Counts first: every rank learns every rank's per-expert and
        // per-rank counts.
        let me = self.local.rank;
        let bytes: Vec<u8> = mine.iter().chain(&plan.dest_counts()).flat_map(|v| v.to_le_bytes()).collect();
        self.local.counts_out.write_at(0, &bytes)?;
        let stride = u64::from(c.experts + c.ranks) * 4;
        let at = u64::from(me) * stride;
        self.local.counts.write_at(at, &bytes)?;
        let others = self.others();
        let mut posted = Vec::new();
        for &d in &others {
            let t = self.local.engine.write(
                &self.local.counts_out,
                0,
                &self.peers[d as usize].counts,
                at,
                bytes.len() as u64,
                Some(self.imm_to[COUNTS][d as usize]),
            );
            posted.push((d, t.map_err(|e| self.fail(named(d, "sending counts", e)))?));
        }

        // Pack the items and their records meanwhile.
        let rb = record_bytes(c.top_k);
        let records = plan.items.len() as u64 * tb;
        let mut record = vec![0u8; rb as usize];
        {
            // SAFETY: the staging region takes no remote access, and this
            // rank's earlier requests from it have all completed (each call
            // waits for its own before returning).
            let out = unsafe { self.local.dispatch_out.as_mut_slice() };
            for (j, it) in plan.items.iter().enumerate() {
                let (from, to) = ((u64::from(it.token) * tb) as usize, (j as u64 * tb) as usize);
                out[to..to + tb as usize].copy_from_slice(&x[from..from + tb as usize]);
                record.iter_mut().for_each(|b| *b = 0);
                record[..4].copy_from_slice(&it.token.to_le_bytes());
                record[4..6].copy_from_slice(&(me as u16).to_le_bytes());
                record[6..8].copy_from_slice(&(it.n as u16).to_le_bytes());
                for (p, &(kk, le)) in plan.pairs[it.first as usize..(it.first + it.n) as usize].iter().enumerate() {
                    record[8 + 4 * p..10 + 4 * p].copy_from_slice(&kk.to_le_bytes());
                    record[10 + 4 * p..12 + 4 * p].copy_from_slice(&le.to_le_bytes());
                }
                let at = (records + j as u64 * rb) as usize;
                out[at..at + rb as usize].copy_from_slice(&record);
            }
        }

        self.wait_events(COUNTS, &others, started)?;
        let raw = self.local.counts.to_vec(0, u64::from(c.ranks) * stride)?;
        let words: Vec<u32> = raw.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
        let (mut experts, mut items) = (Vec::new(), Vec::new());
        for row in words.chunks_exact((c.experts + c.ranks) as usize) {
            experts.push(row[..c.experts as usize].to_vec());
            items.push(row[c.experts as usize..].to_vec());
        }
        let placement = Placement::new(shape, &experts, &items).map_err(|e| self.fail(e))?;
        for (d, t) in posted.drain(..) {
            self.wait_transfer(d, "sending counts", &t, started)?;
        }

        // Where each of this rank's pairs comes back in combine.
        let mut next_pos: Vec<u32> = mine
            .iter()
            .scan(0u32, |acc, &n| {
                let at = *acc;
                *acc += n;
                Some(at)
            })
            .collect();
        let combine_pos = topk_idx
            .iter()
            .map(|&e| {
                if e < 0 {
                    return u32::MAX;
                }
                let at = next_pos[e as usize];
                next_pos[e as usize] += 1;
                at
            })
            .collect();
        let mut inflight = DispatchInFlight {
            tokens: tokens as u32,
            topk_idx: topk_idx.to_vec(),
            topk_weights: topk_weights.to_vec(),
            placement,
            plan,
            combine_pos,
            posted,
            next_round: vec![1; c.ranks as usize],
            records,
            started,
        };
        for d in others {
            self.post_round(&mut inflight, d, 0)?;
        }
        Ok(inflight)
    }

    /// The ranks other than this one.
    fn others(&self) -> Vec<u32> {
        let me = self.local.rank;
        (0..self.local.config.ranks).filter(|&r| r != me).collect()
    }

    /// The copies of this rank's items for rank `d` that fall in `round`
    /// of its pool: the rows, and their records.
    fn round_copies(&self, f: &DispatchInFlight, d: u32, round: u64) -> Vec<Strided> {
        let c = &self.local.config;
        let (tb, cap, rb) = (u64::from(c.token_bytes), c.capacity(), record_bytes(c.top_k));
        let first = f.plan.dest_start[d as usize];
        let n = f.plan.dest_start[d as usize + 1] - first;
        let start = f.placement.item_start(self.local.rank, d);
        match in_round(start, n, round, cap) {
            Some((off, at, len)) => {
                let j = first + off;
                vec![
                    Strided::contiguous(j * tb, at * tb, len * tb),
                    Strided::contiguous(f.records + j * rb, cap * tb + at * rb, len * rb),
                ]
            }
            None => Vec::new(),
        }
    }

    fn post_round(&mut self, f: &mut DispatchInFlight, d: u32, round: u64) -> Result<()> {
        let copies = self.round_copies(f, d, round);
        let imm = self.imm_to[DATA][d as usize];
        let pool = &self.peers[d as usize].pool;
        let e = &self.local.engine;
        let t = if copies.is_empty() {
            e.write_imm(pool, imm)
        } else {
            CopyList::new(copies)
                .and_then(|list| e.write_copies(&self.local.dispatch_out, 0, pool, 0, &list, Some(imm)))
        };
        let t = t.map_err(|e| self.fail(named(d, "posting dispatch data", e)))?;
        f.posted.push((d, t));
        Ok(())
    }

    /// The receive half of [`dispatch`](Self::dispatch): waits for the
    /// copies (taking them in rounds when they overflow the pool, and
    /// posting this rank's later rounds as receivers free their pools),
    /// and returns them by expert.
    pub fn dispatch_recv(&mut self, mut f: DispatchInFlight) -> Result<Dispatched> {
        self.check()?;
        let c = self.local.config;
        let (tb, cap, rb) = (u64::from(c.token_bytes), c.capacity(), record_bytes(c.top_k));
        let me = self.local.rank;
        let le = c.experts / c.ranks;
        let rounds: Vec<u64> = (0..c.ranks).map(|d| f.placement.rounds(d, cap)).collect();
        let totals: Vec<u64> = (0..le).map(|i| f.placement.expert_total(me, i)).collect();
        let width = totals.iter().copied().max().unwrap_or(0);
        // Written once each: rows by the expansion below, padding rows
        // (past an expert's count) zeroed at the end; not zeroed first.
        let x_len = (u64::from(le) * width * tb) as usize;
        let mut expert_x: Vec<u8> = Vec::with_capacity(x_len);
        let mut sources = vec![(0u16, 0u32, 0u16); (u64::from(le) * width) as usize];
        // Rows placed so far per local expert: expanding the pool in slot
        // order puts each expert's rows in (source, token, k) order.
        let mut next = vec![0u64; le as usize];
        let others = self.others();
        let total = f.placement.total(me);
        for round in 0..rounds[me as usize] {
            // This rank's own items of the round go straight into the pool.
            for s in self.round_copies(&f, me, round) {
                // SAFETY: the staging region takes no remote access and no
                // request writes into it.
                let out = unsafe { self.local.dispatch_out.as_slice() };
                let (from, len) = (s.src_offset as usize, s.row_len as usize);
                self.local.pool.write_at(s.dst_offset, &out[from..from + len])?;
            }
            self.wait_round(&mut f, &others, &rounds)?;
            let slots = (total - round * cap).min(cap);
            {
                // SAFETY: every rank's items of this round have landed (their
                // immediates came after their bytes), and no rank writes the
                // pool again before this rank releases it (FREED, below) or
                // starts its next call.
                let pool = unsafe { self.local.pool.as_slice() };
                for slot in 0..slots {
                    let rec = &pool[(cap * tb + slot * rb) as usize..(cap * tb + (slot + 1) * rb) as usize];
                    let token = u32::from_le_bytes(rec[..4].try_into().expect("4 bytes"));
                    let src = u16::from_le_bytes(rec[4..6].try_into().expect("2 bytes"));
                    let n = u16::from_le_bytes(rec[6..8].try_into().expect("2 bytes")) as usize;
                    let row = &pool[(slot * tb) as usize..((slot + 1) * tb) as usize];
                    for p in 0..n.min(c.top_k as usize) {
                        let kk = u16::from_le_bytes(rec[8 + 4 * p..10 + 4 * p].try_into().expect("2 bytes"));
                        let l = u16::from_le_bytes(rec[10 + 4 * p..12 + 4 * p].try_into().expect("2 bytes")) as usize;
                        if l >= le as usize || next[l] >= width {
                            return Err(self.fail(Error::InvalidRequest(format!(
                                "MoE: rank {src} sent a record for local expert {l} beyond the counts"
                            ))));
                        }
                        let at = l * width as usize + next[l] as usize;
                        next[l] += 1;
                        // SAFETY: `at < le * width` (checked above), so the row
                        // lies in the allocation; `row` is in the pool.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                row.as_ptr(),
                                expert_x.as_mut_ptr().add(at * tb as usize),
                                tb as usize,
                            )
                        };
                        sources[at] = (src, token, kk);
                    }
                }
            }
            if round + 1 < rounds[me as usize] {
                for &s in &others {
                    let t = self.local.engine.write_imm(&self.peers[s as usize].pool, self.imm_to[FREED][s as usize]);
                    let t = t.map_err(|e| self.fail(named(s, "releasing the pool", e)))?;
                    f.posted.push((s, t));
                }
            }
        }
        if next != totals {
            return Err(self.fail(Error::InvalidRequest("MoE: the received items do not match the counts".into())));
        }
        for (l, &n) in totals.iter().enumerate() {
            let (from, to) = ((l as u64 * width + n) * tb, (l as u64 + 1) * width * tb);
            // SAFETY: the padding rows of expert `l`, inside the allocation.
            unsafe { std::ptr::write_bytes(expert_x.as_mut_ptr().add(from as usize), 0, (to - from) as usize) };
        }
        // SAFETY: every row below an expert's count was written by the
        // expansion (`next == totals`: each slot exactly once, as `next[l]`
        // only grows), and every row past it was just zeroed.
        unsafe { expert_x.set_len(x_len) };
        // Later rounds this rank still owes others.
        while others.iter().any(|&d| f.next_round[d as usize] < rounds[d as usize]) {
            self.post_freed_rounds(&mut f, &others, &rounds, true)?;
        }
        for (d, t) in std::mem::take(&mut f.posted) {
            self.wait_transfer(d, "dispatch", &t, f.started)?;
        }
        Ok(Dispatched {
            expert_x,
            counts: totals.iter().map(|&n| n as u32).collect(),
            capacity: width as u32,
            handle: MoeHandle {
                tokens: f.tokens,
                topk_idx: f.topk_idx,
                topk_weights: f.topk_weights,
                capacity: width as u32,
                counts: totals.iter().map(|&n| n as u32).collect(),
                sources,
                combine_base: (0..c.ranks)
                    .map(|src| (0..me * le).map(|e| u64::from(f.placement.count(src, e))).sum())
                    .collect(),
                combine_pos: f.combine_pos,
            },
        })
    }

    /// Posts this rank's next round to every rank that has freed its pool
    /// since; with `block`, waits (a slice) for one if none has.
    fn post_freed_rounds(
        &mut self,
        f: &mut DispatchInFlight,
        others: &[u32],
        rounds: &[u64],
        block: bool,
    ) -> Result<()> {
        let owed: Vec<u32> =
            others.iter().copied().filter(|&d| f.next_round[d as usize] < rounds[d as usize]).collect();
        let mut any = false;
        for &d in &owed {
            if self.take_event(FREED, d)? {
                let round = f.next_round[d as usize];
                self.post_round(f, d, round)?;
                f.next_round[d as usize] += 1;
                any = true;
            }
        }
        if block && !any && !owed.is_empty() {
            self.wait_slice(FREED, &owed, f.started, Duration::from_millis(1))?;
        }
        Ok(())
    }

    /// Waits for one dispatch-data event from every other rank, posting
    /// this rank's later rounds meanwhile.
    fn wait_round(&mut self, f: &mut DispatchInFlight, others: &[u32], rounds: &[u64]) -> Result<()> {
        let mut pending: Vec<u32> = others.to_vec();
        loop {
            self.take_events(DATA, &mut pending)?;
            if pending.is_empty() {
                return Ok(());
            }
            let owes = others.iter().any(|&d| f.next_round[d as usize] < rounds[d as usize]);
            if owes {
                self.post_freed_rounds(f, others, rounds, false)?;
            }
            let slice = if owes { Duration::from_millis(1) } else { Duration::from_millis(50) };
            self.wait_slice(DATA, &pending, f.started, slice)?;
        }
    }

    /// Waits up to `slice` for the first of `pending`'s `phase` events;
    /// fails, naming the ranks, once the call's timeout has passed, or when
    /// a ping finds one of them gone.
    fn wait_slice(&mut self, phase: usize, pending: &[u32], started: Instant, slice: Duration) -> Result<()> {
        let timeout = self.local.config.timeout;
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            let names: Vec<String> =
                pending.iter().map(|r| format!("rank {r} ({})", self.peers[*r as usize].owner())).collect();
            let e = Error::PeerUnreachable(format!(
                "MoE: no {} from {} within {timeout:?}",
                PHASES[phase],
                names.join(", ")
            ));
            return Err(self.fail(e));
        }
        let first = pending[0] as usize;
        let counter = self.counters[phase][first].as_ref().expect("a counter per other rank");
        match counter.wait_timeout(slice.min(left)) {
            Ok(()) | Err(Error::Timeout(_)) => {}
            Err(e) => return Err(self.fail(e)),
        }
        self.ping(pending)
    }

    /// Pings the ranks waited for, once per heartbeat each; a ping that
    /// failed means the rank is gone.
    fn ping(&mut self, ranks: &[u32]) -> Result<()> {
        let heartbeat = (self.local.config.timeout / 10).clamp(Duration::from_millis(20), Duration::from_millis(500));
        for &r in ranks {
            let slot = &mut self.pings[r as usize];
            if let Some((_, t)) = slot {
                if let Some(Err(e)) = t.result() {
                    let e = named(r, "a liveness ping", e);
                    return Err(self.fail(e));
                }
            }
            let due = slot.as_ref().is_none_or(|(at, t)| t.is_done() && at.elapsed() >= heartbeat);
            if due {
                match self.local.engine.ping(&self.peers[r as usize].pool) {
                    Ok(t) => self.pings[r as usize] = Some((Instant::now(), t)),
                    Err(e) => return Err(self.fail(named(r, "a liveness ping", e))),
                }
            }
        }
        Ok(())
    }

    /// Consumes `rank`'s next `phase` event if it has arrived (the counter
    /// is re-armed for the one after).
    fn take_event(&self, phase: usize, rank: u32) -> Result<bool> {
        let counter = self.counters[phase][rank as usize].as_ref().expect("a counter per other rank");
        if !counter.is_reached() {
            return Ok(false);
        }
        counter.rearm(1)?;
        Ok(true)
    }

    /// Drops from `pending` the ranks whose `phase` event has arrived.
    fn take_events(&self, phase: usize, pending: &mut Vec<u32>) -> Result<()> {
        let mut i = 0;
        while i < pending.len() {
            if self.take_event(phase, pending[i])? {
                pending.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// Waits for one `phase` event from each of `ranks`.
    fn wait_events(&mut self, phase: usize, ranks: &[u32], started: Instant) -> Result<()> {
        let mut pending = ranks.to_vec();
        loop {
            self.take_events(phase, &mut pending)?;
            if pending.is_empty() {
                return Ok(());
            }
            self.wait_slice(phase, &pending, started, Duration::from_millis(50))?;
        }
    }

    fn wait_transfer(&mut self, rank: u32, what: &str, t: &Transfer, started: Instant) -> Result<()> {
        let timeout = self.local.config.timeout;
        let left = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
        match t.wait_timeout(left) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(named(rank, what, e))),
        }
    }

    /// Sends each expert output row of `expert_y` (laid out as the
    /// dispatch's `expert_x`, with `hidden` elements of the group's dtype
    /// per row) back to its token's rank, and returns this rank's tokens'
    /// outputs: `y[t] = sum over k of topk_weights[t][k] * row of (t, k)`,
    /// accumulated in f32 in k order (bit-identical across reruns), in the
    /// group's dtype. Every rank calls it after its dispatch.
    pub fn combine(&mut self, expert_y: &[u8], handle: &MoeHandle) -> Result<Vec<u8>> {
        self.check()?;
        let c = self.local.config;
        let rb = c.row_bytes();
        let le = c.experts / c.ranks;
        if expert_y.len() as u64 != u64::from(le) * u64::from(handle.capacity) * rb {
            return Err(Error::InvalidRequest(format!(
                "expert_y has {} bytes; the dispatch's layout has {le} x {} rows of {rb}",
                expert_y.len(),
                handle.capacity
            )));
        }
        let started = Instant::now();
        let me = self.local.rank;
        // Rows by destination rank, in expert order: consecutive in the
        // destination's combine region (see `MoeHandle::combine_pos`), so a
        // rank's rows coalesce into a few ranges.
        let mut by_rank: Vec<Vec<(u64, u64)>> = vec![Vec::new(); c.ranks as usize];
        let mut placed = handle.combine_base.clone();
        for e in 0..le {
            for i in 0..handle.counts[e as usize] {
                let (s, _, _) = handle.sources[(e * handle.capacity + i) as usize];
                let from = (u64::from(e) * u64::from(handle.capacity) + u64::from(i)) * rb;
                by_rank[s as usize].push((from, placed[s as usize] * rb));
                placed[s as usize] += 1;
            }
        }
        // This rank's own rows stay where they are: the reduction reads them
        // from `expert_y` (`local[p]`: the offset there of the row that
        // position `p` of this rank's share of the combine region stands for).
        let local_base = handle.combine_base[me as usize];
        let mut local = vec![0u64; by_rank[me as usize].len()];
        for &(from, to) in &by_rank[me as usize] {
            local[(to / rb - local_base) as usize] = from;
        }
        // The others' rows, in rank order, through the staging region
        // `capacity` rows at a time; each rank's last request carries its
        // immediate (a rank owed nothing gets the immediate alone).
        let cap = c.capacity();
        let others = self.others();
        let rows: Vec<(u32, u64, u64)> =
            others.iter().flat_map(|&s| by_rank[s as usize].iter().map(move |&(from, to)| (s, from, to))).collect();
        let mut last_of = vec![usize::MAX; c.ranks as usize];
        for (i, r) in rows.iter().enumerate() {
            last_of[r.0 as usize] = i;
        }
        for (n, chunk) in rows.chunks(cap as usize).enumerate() {
            let base = n * cap as usize;
            let mut posted: Vec<(u32, Transfer)> = Vec::new();
            let mut i = 0;
            while i < chunk.len() {
                let s = chunk[i].0;
                let mut copies = Vec::new();
                while i < chunk.len() && chunk[i].0 == s {
                    let (_, from, to) = chunk[i];
                    // SAFETY: local staging, no remote access; the previous
                    // chunk's requests from it have completed.
                    let out = unsafe { self.local.combine_out.as_mut_slice() };
                    out[i * rb as usize..(i + 1) * rb as usize]
                        .copy_from_slice(&expert_y[from as usize..(from + rb) as usize]);
                    copies.push(Strided::contiguous(i as u64 * rb, to, rb));
                    i += 1;
                }
                let imm = (base + i - 1 == last_of[s as usize]).then_some(self.imm_to[COMBINE][s as usize]);
                let dst = &self.peers[s as usize].combine;
                let t = CopyList::new(copies)
                    .and_then(|list| self.local.engine.write_copies(&self.local.combine_out, 0, dst, 0, &list, imm));
                posted.push((s, t.map_err(|e| self.fail(named(s, "sending combine data", e)))?));
            }
            for (s, t) in posted {
                self.wait_transfer(s, "combine", &t, started)?;
            }
        }
        for &s in &others {
            if by_rank[s as usize].is_empty() {
                let t = self.local.engine.write_imm(&self.peers[s as usize].combine, self.imm_to[COMBINE][s as usize]);
                let t = t.map_err(|e| self.fail(named(s, "sending combine data", e)))?;
                self.wait_transfer(s, "combine", &t, started)?;
            }
        }
        self.wait_events(COMBINE, &others, started)?;
        self.reduce(handle, expert_y, local_base, &local)
    }

    /// The weighted sums of the rows of this rank's tokens: from the combine
    /// region, except this rank's own rows (positions `local_base..` of it),
    /// read from `expert_y` at the offsets `local` gives.
    fn reduce(&self, handle: &MoeHandle, expert_y: &[u8], local_base: u64, local: &[u64]) -> Result<Vec<u8>> {
        let c = &self.local.config;
        let (hidden, k) = (c.hidden as usize, c.top_k as usize);
        let rb = c.row_bytes() as usize;
        let tokens = handle.tokens as usize;
        let mut out = vec![0u8; tokens * rb];
        let mut acc = vec![0f32; hidden];
        // SAFETY: every rank's rows for this call have landed (their
        // immediates came after their bytes), and none writes this region
        // again before this rank's next dispatch has exchanged counts.
        let rows = unsafe { self.local.combine.as_slice() };
        for t in 0..tokens {
            let mut first = true;
            for kk in 0..k {
                if handle.topk_idx[t * k + kk] < 0 {
                    continue;
                }
                let w = handle.topk_weights[t * k + kk];
                let at = handle.combine_pos[t * k + kk] as usize;
                let row = match (at as u64).checked_sub(local_base).filter(|&p| p < local.len() as u64) {
                    Some(p) => {
                        let from = local[p as usize] as usize;
                        &expert_y[from..from + rb]
                    }
                    None => &rows[at * rb..(at + 1) * rb],
                };
                accumulate(&mut acc, row, c.dtype, w, first);
                first = false;
            }
            if first {
                // No expert: the output is zero.
                acc.iter_mut().for_each(|a| *a = 0.0);
            }
            let dst = &mut out[t * rb..(t + 1) * rb];
            match c.dtype {
                MoeDtype::F32 => {
                    dst.chunks_exact_mut(4).zip(&acc).for_each(|(d, a)| d.copy_from_slice(&a.to_le_bytes()))
                }
                MoeDtype::Bf16 => dst
                    .chunks_exact_mut(2)
                    .zip(&acc)
                    .for_each(|(d, a)| d.copy_from_slice(&f32_to_bf16(*a).to_le_bytes())),
            }
        }
        Ok(out)
    }
}

/// `acc = w * row` (first) or `acc += w * row`, `row` holding `acc.len()`
/// little-endian elements of the dtype. Plain loops over aligned words,
/// which the compiler vectorizes.
fn accumulate(acc: &mut [f32], row: &[u8], dtype: MoeDtype, w: f32, first: bool) {
    match dtype {
        MoeDtype::Bf16 => {
            // SAFETY: any bytes are valid u16s; the aligned middle is used
            // only when it covers the whole row.
            let (pre, words, post) = unsafe { row.align_to::<u16>() };
            if pre.is_empty() && post.is_empty() && cfg!(target_endian = "little") {
                if first {
                    acc.iter_mut().zip(words).for_each(|(a, &b)| *a = w * f32::from_bits(u32::from(b) << 16));
                } else {
                    acc.iter_mut().zip(words).for_each(|(a, &b)| *a += w * f32::from_bits(u32::from(b) << 16));
                }
            } else {
                for (a, b) in acc.iter_mut().zip(row.chunks_exact(2)) {
                    let v = w * bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                    *a = if first { v } else { *a + v };
                }
            }
        }
        MoeDtype::F32 => {
            // SAFETY: as above, for f32 (any bits are a valid f32).
            let (pre, words, post) = unsafe { row.align_to::<f32>() };
            if pre.is_empty() && post.is_empty() && cfg!(target_endian = "little") {
                if first {
                    acc.iter_mut().zip(words).for_each(|(a, &b)| *a = w * b);
                } else {
                    acc.iter_mut().zip(words).for_each(|(a, &b)| *a += w * b);
                }
            } else {
                for (a, b) in acc.iter_mut().zip(row.chunks_exact(4)) {
                    let v = w * f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    *a = if first { v } else { *a + v };
                }
            }
        }
    }
}

/// bfloat16 bits to f32.
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// f32 to bfloat16 bits, rounding to nearest even (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// A transport failure toward `rank`, as the error that names it; other
/// errors (a bad argument) pass through.
fn named(rank: u32, what: &str, e: Error) -> Error {
    match e {
        Error::PeerUnreachable(m) => Error::PeerUnreachable(format!("MoE rank {rank}: {what}: {m}")),
        Error::Timeout(t) => Error::PeerUnreachable(format!("MoE rank {rank}: {what}: no completion within {t:?}")),
        e @ (Error::Fabric { .. } | Error::Verbs { .. } | Error::Transport { .. } | Error::RemoteAccess(_)) => {
            Error::PeerUnreachable(format!("MoE rank {rank}: {what}: {e}"))
        }
        other => other,
    }
}
