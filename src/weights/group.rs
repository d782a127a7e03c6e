//! Driving the engine: a rank's tensors and control regions, the plan's
//! requests built once, and the step's push (sources) and wait
//! (destinations).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::plan::{plan, plan_broadcast, BroadcastPart, PlanConfig, MAX_SOURCES};
use super::spec::{Role, TensorSpec};
use super::wire::{control_len, TensorPlace, WeightsRankDesc};
use crate::error::{Error, Result};
use crate::{Access, CopyList, ImmCounter, ImmSlot, ImmSpace, MemoryRegion, MrDesc, Strided, Transfer, TransferEngine};

/// Broadcast parts a node keeps in flight to the next (sources: to
/// destination 0).
const FORWARD_WINDOW: usize = 2;

const RECORDS: usize = 0;
const PARTS: usize = 1;

/// A source tensor as the prepare hook of
/// [`WeightsGroup::push_with`] sees it: where its share's bytes must be.
#[derive(Debug)]
pub struct TensorSlot<'a> {
    /// Its index in this source's description.
    pub index: usize,
    /// The tensor and this source's share.
    pub spec: &'a TensorSpec,
    /// The region holding the share.
    pub region: &'a MemoryRegion,
    /// The share's offset in the region.
    pub offset: u64,
}

impl TensorSlot<'_> {
    /// Bytes of the share.
    pub fn len(&self) -> u64 {
        self.spec.share_bytes()
    }

    /// True for an empty share.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `bytes` (at most the share's length) to the share's start.
    pub fn write(&self, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 > self.len() {
            return Err(Error::InvalidRequest(format!(
                "{} bytes for tensor {:?}, whose share has {}",
                bytes.len(),
                self.spec.name,
                self.len()
            )));
        }
        self.region.write_at(self.offset, bytes)
    }
}

/// How a step moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Every destination byte is written once, straight from a source
    /// that holds it ([`plan`](super::plan)).
    #[default]
    Direct,
    /// A pipelined chain: the sources write destination 0, and each
    /// destination forwards every part it has received to the next, so
    /// one source feeds many destinations without its links carrying more
    /// than one copy ([`plan_broadcast`](super::plan_broadcast)).
    Broadcast,
}

/// A weights group's settings; every rank must use the same `plan` and
/// `mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightsConfig {
    /// How bytes are cut (and so how the plan looks): the same on every rank.
    pub plan: PlanConfig,
    /// Direct or broadcast: the same on every rank.
    pub mode: Mode,
    /// A step fails when this passes without progress from a peer it
    /// waits for, or when a ping finds that peer gone.
    pub timeout: Duration,
    /// A source prepares tensors (its prepare hook) at most this many
    /// bytes ahead of the writes that have completed.
    pub watermark: u64,
}

impl Default for WeightsConfig {
    fn default() -> Self {
        WeightsConfig {
            plan: PlanConfig::default(),
            mode: Mode::Direct,
            timeout: Duration::from_secs(30),
            watermark: 256 << 20,
        }
    }
}

/// One rank of a weights group before it is connected: its tensors, where
/// they live, and its control region.
pub struct WeightsRank {
    engine: TransferEngine,
    config: WeightsConfig,
    regions: Vec<MemoryRegion>,
    places: Vec<TensorPlace>,
    control: MemoryRegion,
    /// The step number, the payload of records and flags.
    step_buf: MemoryRegion,
    slots: Option<[ImmSlot; 2]>,
    desc: WeightsRankDesc,
}

impl std::fmt::Debug for WeightsRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightsRank")
            .field("role", &self.desc.role)
            .field("rank", &self.desc.rank)
            .field("tensors", &self.places.len())
            .finish()
    }
}

impl WeightsRank {
    /// Rank `rank` of `role`, whose tensor shares live in `regions` at the
    /// places `tensors` gives. A destination's regions must take remote
    /// writes (the sources write straight into them).
    pub fn new(
        engine: &TransferEngine,
        config: WeightsConfig,
        role: Role,
        rank: u32,
        regions: Vec<MemoryRegion>,
        tensors: Vec<TensorPlace>,
    ) -> Result<Self> {
        if config.plan.chunk == 0 {
            return Err(Error::InvalidRequest("a weights chunk of 0 bytes".into()));
        }
        if role == Role::Source && rank as usize >= MAX_SOURCES {
            return Err(Error::InvalidRequest(format!("source rank {rank}: at most {MAX_SOURCES} sources")));
        }
        for t in &tensors {
            t.spec.validate().map_err(Error::WeightsPlan)?;
            let Some(region) = regions.get(t.region as usize) else {
                return Err(Error::InvalidRequest(format!(
                    "tensor {:?} is in region {} of {}",
                    t.spec.name,
                    t.region,
                    regions.len()
                )));
            };
            crate::descriptor::check_range("tensor", t.offset, t.spec.share_bytes(), region.len())?;
            if role == Role::Destination && !region.descriptor().access().remote_write {
                return Err(Error::InvalidRequest(format!(
                    "tensor {:?}: a destination's regions must take remote writes",
                    t.spec.name
                )));
            }
        }
        let (control_bytes, slots) = match role {
            Role::Source => (8, None),
            Role::Destination => (
                control_len(tensors.iter().map(|t| &t.spec), config.plan.chunk),
                Some([engine.imm_slot(ImmSpace::Weights)?, engine.imm_slot(ImmSpace::Weights)?]),
            ),
        };
        let control = engine.alloc(control_bytes, Access::REMOTE_WRITE)?;
        let step_buf = engine.alloc(8, Access::LOCAL)?;
        let desc = WeightsRankDesc {
            role,
            rank,
            chunk: config.plan.chunk,
            tensors: tensors.clone(),
            regions: match role {
                Role::Source => Vec::new(),
                Role::Destination => regions.iter().map(|r| r.descriptor().clone()).collect(),
            },
            control: control.descriptor().clone(),
            slots: slots.as_ref().map_or([0, 0], |s| [s[0].slot(), s[1].slot()]),
        };
        Ok(WeightsRank { engine: engine.clone(), config, regions, places: tensors, control, step_buf, slots, desc })
    }

    /// Rank `rank` of `role` with its shares of `specs` in one region the
    /// engine allocates (zeroed), each share 64-byte aligned, in order.
    pub fn alloc(
        engine: &TransferEngine,
        config: WeightsConfig,
        role: Role,
        rank: u32,
        specs: Vec<TensorSpec>,
    ) -> Result<Self> {
        let mut offset = 0u64;
        let mut places = Vec::with_capacity(specs.len());
        for spec in specs {
            let len = spec.share_bytes();
            places.push(TensorPlace { spec, region: 0, offset });
            offset += len.next_multiple_of(64);
        }
        let access = if role == Role::Destination { Access::REMOTE_WRITE } else { Access::LOCAL };
        let region = engine.alloc(offset.max(64), access)?;
        Self::new(engine, config, role, rank, vec![region], places)
    }

    /// What every other rank needs: send its bytes to each of them.
    pub fn descriptor(&self) -> &WeightsRankDesc {
        &self.desc
    }

    /// The tensors, where they live.
    pub fn tensors(&self) -> &[TensorPlace] {
        &self.places
    }

    /// The region and offset of tensor `i`'s share.
    pub fn tensor(&self, i: usize) -> Result<(&MemoryRegion, u64, u64)> {
        let p = self.places.get(i).ok_or_else(|| Error::InvalidRequest(format!("no tensor {i}")))?;
        Ok((&self.regions[p.region as usize], p.offset, p.spec.share_bytes()))
    }

    /// Joins the group: `ranks` holds every rank's descriptor (sources and
    /// destinations, this rank's own included), in any order. Every rank
    /// plans from the same list and gets the same plan.
    pub fn connect(self, ranks: &[WeightsRankDesc]) -> Result<WeightsGroup> {
        let (mut sources, mut dests): (Vec<&WeightsRankDesc>, Vec<&WeightsRankDesc>) =
            ranks.iter().partition(|d| d.role == Role::Source);
        sources.sort_by_key(|d| d.rank);
        dests.sort_by_key(|d| d.rank);
        for (side, list) in [("source", &sources), ("destination", &dests)] {
            for (i, d) in list.iter().enumerate() {
                if d.rank != i as u32 {
                    return Err(Error::InvalidRequest(format!(
                        "weights group: {side} ranks must be 0..{} once each; found rank {}",
                        list.len(),
                        d.rank
                    )));
                }
                if d.chunk != self.config.plan.chunk {
                    return Err(Error::InvalidRequest(format!(
                        "weights group: {side} rank {i} plans with chunks of {} bytes, this rank with {}",
                        d.chunk, self.config.plan.chunk
                    )));
                }
            }
        }
        let me = self.desc.rank as usize;
        let mine = if self.desc.role == Role::Source { sources.get(me) } else { dests.get(me) };
        if mine.is_none_or(|d| **d != self.desc) {
            return Err(Error::InvalidRequest(format!(
                "weights group: {} rank {me}'s descriptor is not this rank's",
                self.desc.role
            )));
        }
        let src_specs: Vec<Vec<TensorSpec>> = sources.iter().map(|d| d.specs()).collect();
        let dst_specs: Vec<Vec<TensorSpec>> = dests.iter().map(|d| d.specs()).collect();
        let sources: Vec<WeightsRankDesc> = sources.into_iter().cloned().collect();
        let dests: Vec<WeightsRankDesc> = dests.into_iter().cloned().collect();
        let work = match self.config.mode {
            Mode::Direct => {
                let p = plan(&src_specs, &dst_specs, &self.config.plan).map_err(Error::WeightsPlan)?;
                match self.desc.role {
                    Role::Source => Work::DirectSource(direct_source(&self, &p, &dests)?),
                    Role::Destination => {
                        let senders = p.senders(me as u32).to_vec();
                        let slot = &self.slots.as_ref().expect("a destination has slots")[RECORDS];
                        let counters = senders.iter().map(|&s| slot.expect(s as u8, 1)).collect::<Result<_>>()?;
                        let owed = senders
                            .iter()
                            .map(|&s| {
                                let mut names: Vec<u32> = p
                                    .source_writes(s)
                                    .iter()
                                    .filter(|w| w.dest == me as u32)
                                    .map(|w| w.dst_tensor)
                                    .collect();
                                names.dedup();
                                names
                            })
                            .collect();
                        Work::DirectDest { senders, counters, owed }
                    }
                }
            }
            Mode::Broadcast => {
                let p = plan_broadcast(&src_specs, &dst_specs, &self.config.plan).map_err(Error::WeightsPlan)?;
                broadcast_work(&self, &p.parts, &p.first_hop, &dests)?
            }
        };
        let load = match &work {
            Work::DirectSource(reqs) | Work::BroadcastSource(reqs) => reqs.iter().map(|r| r.list.bytes()).sum(),
            _ => 0,
        };
        Ok(WeightsGroup { local: self, sources, dests, work, last_step: None, failed: None, pings: Vec::new(), load })
    }
}

/// One write request of a source's step, built once.
#[derive(Debug)]
struct Request {
    /// Source tensor index (what the prepare hook is called with).
    tensor: u32,
    /// Destination rank.
    dest: u32,
    /// Destination tensor index (for error messages).
    dst_tensor: u32,
    src_region: u32,
    src_base: u64,
    dst: MrDesc,
    dst_base: u64,
    list: CopyList,
    /// Broadcast: the part this request fills.
    part: Option<u32>,
}

fn direct_source(rank: &WeightsRank, p: &super::WeightsPlan, dests: &[WeightsRankDesc]) -> Result<Vec<Request>> {
    let writes = p.source_writes(rank.desc.rank);
    let mut out = Vec::new();
    let mut i = 0;
    while i < writes.len() {
        let w = writes[i];
        let mut j = i;
        while j < writes.len()
            && (writes[j].src_tensor, writes[j].dest, writes[j].dst_tensor) == (w.src_tensor, w.dest, w.dst_tensor)
        {
            j += 1;
        }
        let place = &rank.places[w.src_tensor as usize];
        let d = &dests[w.dest as usize];
        let dplace = &d.tensors[w.dst_tensor as usize];
        out.push(Request {
            tensor: w.src_tensor,
            dest: w.dest,
            dst_tensor: w.dst_tensor,
            src_region: place.region,
            src_base: place.offset,
            dst: d.regions[dplace.region as usize].clone(),
            dst_base: dplace.offset,
            list: CopyList::new(writes[i..j].iter().map(|w| w.copy))?,
            part: None,
        });
        i = j;
    }
    Ok(out)
}

fn broadcast_work(
    rank: &WeightsRank,
    parts: &[BroadcastPart],
    first_hop: &[(u32, u32, Vec<Strided>)],
    dests: &[WeightsRankDesc],
) -> Result<Work> {
    let me = rank.desc.rank;
    match rank.desc.role {
        Role::Source => {
            let d0 = &dests[0];
            let mut reqs = Vec::new();
            for (p, (s, st, copies)) in first_hop.iter().enumerate() {
                if *s != me {
                    continue;
                }
                let part = &parts[p];
                let place = &rank.places[*st as usize];
                let dplace = &d0.tensors[part.tensor as usize];
                reqs.push(Request {
                    tensor: *st,
                    dest: 0,
                    dst_tensor: part.tensor,
                    src_region: place.region,
                    src_base: place.offset,
                    dst: d0.regions[dplace.region as usize].clone(),
                    dst_base: dplace.offset,
                    list: CopyList::new(copies.iter().copied())?,
                    part: Some(p as u32),
                });
            }
            Ok(Work::BroadcastSource(reqs))
        }
        Role::Destination => {
            let next = dests.get(me as usize + 1);
            let forward = match next {
                None => Vec::new(),
                Some(n) => parts
                    .iter()
                    .enumerate()
                    .map(|(p, part)| {
                        let place = &rank.places[part.tensor as usize];
                        let nplace = &n.tensors[part.tensor as usize];
                        Ok(Request {
                            tensor: part.tensor,
                            dest: me + 1,
                            dst_tensor: part.tensor,
                            src_region: place.region,
                            src_base: place.offset + part.offset,
                            dst: n.regions[nplace.region as usize].clone(),
                            dst_base: nplace.offset + part.offset,
                            list: CopyList::new([Strided::contiguous(0, 0, part.len)])?,
                            part: Some(p as u32),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            };
            let upstream: Vec<u32> = if me == 0 {
                let mut s: Vec<u32> = first_hop.iter().map(|(s, _, _)| *s).collect();
                s.sort_unstable();
                s.dedup();
                s
            } else {
                vec![me - 1]
            };
            let counter = rank.slots.as_ref().expect("a destination has slots")[PARTS].expect(0, 1)?;
            Ok(Work::BroadcastDest { parts: parts.to_vec(), forward, upstream, counter })
        }
    }
}

enum Work {
    DirectSource(Vec<Request>),
    DirectDest {
        senders: Vec<u32>,
        counters: Vec<ImmCounter>,
        /// Destination tensors each sender writes here (for the error).
        owed: Vec<Vec<u32>>,
    },
    BroadcastSource(Vec<Request>),
    BroadcastDest {
        parts: Vec<BroadcastPart>,
        /// Part `p` forwarded to the next destination (none for the last).
        forward: Vec<Request>,
        /// Who writes parts here: the sources (destination 0) or the
        /// previous destination.
        upstream: Vec<u32>,
        counter: ImmCounter,
    },
}

/// A connected weights group, seen from one rank: sources
/// [`push`](Self::push) a step, destinations [`wait`](Self::wait) for it.
pub struct WeightsGroup {
    local: WeightsRank,
    sources: Vec<WeightsRankDesc>,
    dests: Vec<WeightsRankDesc>,
    work: Work,
    last_step: Option<u64>,
    failed: Option<Error>,
    pings: Vec<(Role, u32, Instant, Transfer)>,
    load: u64,
}

impl std::fmt::Debug for WeightsGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightsGroup")
            .field("role", &self.local.desc.role)
            .field("rank", &self.local.desc.rank)
            .field("sources", &self.sources.len())
            .field("dests", &self.dests.len())
            .finish()
    }
}

/// A step's progress at one destination, for error messages.
#[derive(Debug, Clone, Copy)]
struct Progress {
    done: usize,
    total: usize,
}

impl WeightsGroup {
    /// This rank's side.
    pub fn role(&self) -> Role {
        self.local.desc.role
    }

    /// This rank among its side's.
    pub fn rank(&self) -> u32 {
        self.local.desc.rank
    }

    /// The rank's local half (its tensors).
    pub fn local(&self) -> &WeightsRank {
        &self.local
    }

    /// Bytes this rank writes per step (a source's share of the plan, or
    /// the bytes a broadcast destination forwards).
    pub fn bytes_per_step(&self) -> u64 {
        match &self.work {
            Work::BroadcastDest { forward, .. } => forward.iter().map(|r| r.list.bytes()).sum(),
            _ => self.load,
        }
    }

    /// Write requests this rank posts per step.
    pub fn requests_per_step(&self) -> usize {
        match &self.work {
            Work::DirectSource(r) | Work::BroadcastSource(r) => r.len(),
            Work::BroadcastDest { forward, .. } => forward.len(),
            Work::DirectDest { .. } => 0,
        }
    }

    fn check(&self, role: Role, step: u64) -> Result<()> {
        if let Some(e) = &self.failed {
            return Err(Error::InvalidRequest(format!("this weights group failed earlier ({e}); build a new one")));
        }
        if self.local.desc.role != role {
            return Err(Error::InvalidRequest(format!("a {} rank cannot do that", self.local.desc.role)));
        }
        if let Some(last) = self.last_step {
            if step <= last {
                return Err(Error::InvalidRequest(format!(
                    "weights step {step} is not newer than step {last}, already done here"
                )));
            }
        }
        Ok(())
    }

    fn fail(&mut self, e: Error) -> Error {
        self.failed = Some(e.clone());
        e
    }

    /// Pushes step `step` (larger than any pushed before): writes this
    /// source's share of the plan into the destinations and tells each it
    /// is complete. Returns when every write has completed.
    pub fn push(&mut self, step: u64) -> Result<()> {
        self.push_with(step, |_| Ok(()))
    }

    /// [`push`](Self::push) with a prepare hook: `prepare(slot)` is called
    /// for each of this source's tensors that the plan sends, just before
    /// its writes are posted, and must leave the share's bytes in place
    /// (gather, cast, quantize: [`TensorSlot`] says where). It runs at most
    /// [`WeightsConfig::watermark`] bytes ahead of the writes that have
    /// completed, so preparing tensor `i + 1` overlaps sending tensor `i`,
    /// and a hook that stages into a bounded pool can recycle a buffer
    /// once that much has been sent after it.
    pub fn push_with(&mut self, step: u64, mut prepare: impl FnMut(&TensorSlot<'_>) -> Result<()>) -> Result<()> {
        self.check(Role::Source, step)?;
        let started = Instant::now();
        let r = match &self.work {
            Work::DirectSource(_) | Work::BroadcastSource(_) => self.run_source(step, &mut prepare, started),
            _ => unreachable!("a source's work"),
        };
        match r {
            Ok(()) => {
                self.last_step = Some(step);
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn run_source(
        &self,
        step: u64,
        prepare: &mut dyn FnMut(&TensorSlot<'_>) -> Result<()>,
        started: Instant,
    ) -> Result<()> {
        let (Work::DirectSource(reqs) | Work::BroadcastSource(reqs)) = &self.work else { unreachable!() };
        let engine = &self.local.engine;
        self.local.step_buf.write_at(0, &step.to_le_bytes())?;
        let me = self.local.desc.rank;
        let mut in_flight: VecDeque<(usize, Transfer)> = VecDeque::new();
        let mut in_bytes = 0u64;
        // Broadcast: a part's flag follows its bytes on the same links, so
        // keep only a few parts in flight; with the whole step queued, the
        // first flag would arrive after the last byte and the chain would
        // not pipeline.
        let window = match self.work {
            Work::BroadcastSource(_) => {
                self.local.config.watermark.min(FORWARD_WINDOW as u64 * self.local.config.plan.chunk)
            }
            _ => self.local.config.watermark,
        };
        let mut tails: Vec<(u32, Transfer)> = Vec::new();
        let mut sent_to = vec![false; self.dests.len()];
        let mut i = 0;
        while i < reqs.len() {
            let tensor = reqs[i].tensor;
            let mut j = i;
            while j < reqs.len() && reqs[j].tensor == tensor {
                j += 1;
            }
            let place = &self.local.places[tensor as usize];
            prepare(&TensorSlot {
                index: tensor as usize,
                spec: &place.spec,
                region: &self.local.regions[place.region as usize],
                offset: place.offset,
            })?;
            let mut batch = engine.batch();
            for r in &reqs[i..j] {
                let src = &self.local.regions[r.src_region as usize];
                batch.write_copies(src, r.src_base, &r.dst, r.dst_base, &r.list, None)?;
                sent_to[r.dest as usize] = true;
            }
            for (k, t) in batch.submit()?.into_iter().enumerate() {
                in_bytes += reqs[i + k].list.bytes();
                in_flight.push_back((i + k, t));
            }
            while in_bytes > window {
                let (k, t) = in_flight.pop_front().expect("bytes in flight");
                self.finish_write(&reqs[k], &t, started, &mut tails)?;
                in_bytes -= reqs[k].list.bytes();
            }
            i = j;
        }
        while let Some((k, t)) = in_flight.pop_front() {
            self.finish_write(&reqs[k], &t, started, &mut tails)?;
        }
        // Direct: one record per destination written, after all of this
        // source's writes to it have completed (delivered).
        if matches!(self.work, Work::DirectSource(_)) {
            for (d, _) in sent_to.iter().enumerate().filter(|(_, s)| **s) {
                let dest = &self.dests[d];
                let imm = crate::reserved_imm(ImmSpace::Weights, dest.slots[RECORDS], me as u8)?;
                let t = engine.write(&self.local.step_buf, 0, &dest.control, u64::from(me) * 8, 8, Some(imm))?;
                tails.push((d as u32, t));
            }
        }
        for (d, t) in &tails {
            self.wait_transfer(Role::Destination, *d, "its completion record", t, started)?;
        }
        Ok(())
    }

    /// Waits for request `r`'s transfer; in broadcast, then flags its part.
    fn finish_write(
        &self,
        r: &Request,
        t: &Transfer,
        started: Instant,
        tails: &mut Vec<(u32, Transfer)>,
    ) -> Result<()> {
        let name = &self.dests[r.dest as usize].tensors[r.dst_tensor as usize].spec.name;
        self.wait_transfer(Role::Destination, r.dest, &format!("writing tensor {name:?}"), t, started)?;
        if let Some(p) = r.part {
            let dest = &self.dests[r.dest as usize];
            let imm = crate::reserved_imm(ImmSpace::Weights, dest.slots[PARTS], 0)?;
            let at = (MAX_SOURCES as u64 + u64::from(p)) * 8;
            tails.push((r.dest, self.local.engine.write(&self.local.step_buf, 0, &dest.control, at, 8, Some(imm))?));
        }
        Ok(())
    }

    fn wait_transfer(&self, side: Role, rank: u32, what: &str, t: &Transfer, started: Instant) -> Result<()> {
        let left = self.local.config.timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
        t.wait_timeout(left).map_err(|e| self.named(side, rank, what, e))
    }

    /// A transport failure toward a rank, as the error naming it.
    fn named(&self, side: Role, rank: u32, what: &str, e: Error) -> Error {
        match e {
            Error::PeerUnreachable(m) => Error::PeerUnreachable(format!("weights: {side} rank {rank}: {what}: {m}")),
            Error::Timeout(t) => {
                Error::PeerUnreachable(format!("weights: {side} rank {rank}: {what}: no completion within {t:?}"))
            }
            e @ (Error::Fabric { .. } | Error::Verbs { .. } | Error::Transport { .. } | Error::RemoteAccess(_)) => {
                Error::PeerUnreachable(format!("weights: {side} rank {rank}: {what}: {e}"))
            }
            other => other,
        }
    }

    /// Waits until step `step` (larger than any waited for before) is
    /// complete here: every byte of this destination's tensors has landed
    /// from its sources (broadcast: and every part has been forwarded to
    /// the next destination). Fails, naming the source rank and the
    /// tensors it still owed, when a source dies or makes no progress
    /// within [`WeightsConfig::timeout`]; a record of a newer step than
    /// `step` fails it too (the step was overtaken).
    pub fn wait(&mut self, step: u64) -> Result<()> {
        self.check(Role::Destination, step)?;
        let started = Instant::now();
        let r = match self.work {
            Work::DirectDest { .. } => self.wait_direct(step, started),
            Work::BroadcastDest { .. } => self.wait_broadcast(step, started),
            _ => unreachable!("a destination's work"),
        };
        self.pings.clear();
        match r {
            Ok(()) => {
                self.last_step = Some(step);
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// The record source `s` wrote here last.
    fn record(&self, at: u64) -> u64 {
        let mut b = [0u8; 8];
        self.local.control.read_at(at, &mut b).expect("inside the control region");
        u64::from_le_bytes(b)
    }

    fn wait_direct(&mut self, step: u64, started: Instant) -> Result<()> {
        let Work::DirectDest { senders, .. } = &self.work else { unreachable!() };
        let total = senders.len();
        let mut pending: Vec<usize> = (0..total).collect();
        let mut last_progress = started;
        while !pending.is_empty() {
            let mut k = 0;
            while k < pending.len() {
                let i = pending[k];
                let Work::DirectDest { senders, counters, .. } = &self.work else { unreachable!() };
                let s = senders[i];
                if counters[i].is_reached() {
                    counters[i].rearm(1)?;
                    let got = self.record(u64::from(s) * 8);
                    if got == step {
                        pending.swap_remove(k);
                        last_progress = Instant::now();
                        continue;
                    }
                    if got > step {
                        return Err(Error::InvalidRequest(format!(
                            "weights step {step} was overtaken: source rank {s} completed step {got}"
                        )));
                    }
                    // An older step's record (one that failed here): keep waiting.
                    continue;
                }
                k += 1;
            }
            if pending.is_empty() {
                break;
            }
            let Work::DirectDest { senders, counters, .. } = &self.work else { unreachable!() };
            let ranks: Vec<u32> = pending.iter().map(|&i| senders[i]).collect();
            let first = pending[0];
            let slice = Duration::from_millis(50);
            match counters[first].wait_timeout(slice) {
                Ok(()) | Err(Error::Timeout(_)) => {}
                Err(e) => return Err(e),
            }
            let progress = Progress { done: total - pending.len(), total };
            self.liveness(step, &ranks, last_progress, progress)?;
        }
        Ok(())
    }

    fn wait_broadcast(&mut self, step: u64, started: Instant) -> Result<()> {
        let n = match &self.work {
            Work::BroadcastDest { parts, .. } => parts.len(),
            _ => unreachable!(),
        };
        let mut received = vec![false; n];
        let (mut arrived, mut found, mut cursor) = (0usize, 0usize, 0usize);
        // Received parts waiting to be forwarded, and those in flight: at
        // most FORWARD_WINDOW, so that each part's flag (posted once its
        // bytes are at the next destination) is not queued behind many
        // parts' bytes on the same link, which would stall the chain.
        let mut ready: VecDeque<usize> = VecDeque::new();
        let mut forwards: VecDeque<(usize, Transfer)> = VecDeque::new();
        let mut flags: Vec<(u32, Transfer)> = Vec::new();
        let mut last_progress = started;
        self.local.step_buf.write_at(0, &step.to_le_bytes())?;
        loop {
            let Work::BroadcastDest { counter, forward, upstream, .. } = &self.work else { unreachable!() };
            while counter.is_reached() {
                counter.rearm(1)?;
                arrived += 1;
            }
            // Find the parts whose flags say this step; arrivals are
            // counted, so the scan stops once it has found them all.
            let mut p = cursor;
            while found < arrived && p < n {
                if !received[p] {
                    let got = self.record((MAX_SOURCES + p) as u64 * 8);
                    if got == step {
                        received[p] = true;
                        found += 1;
                        last_progress = Instant::now();
                        if p < forward.len() {
                            ready.push_back(p);
                        }
                    } else if got > step {
                        return Err(Error::InvalidRequest(format!(
                            "weights step {step} was overtaken: part {p} is of step {got}"
                        )));
                    }
                }
                p += 1;
            }
            if found < arrived {
                // Immediates of an older step: forget them.
                arrived = found;
            }
            while cursor < n && received[cursor] {
                cursor += 1;
            }
            loop {
                while forwards.len() < FORWARD_WINDOW {
                    let Some(p) = ready.pop_front() else { break };
                    let r = &forward[p];
                    let src = &self.local.regions[r.src_region as usize];
                    let t = self.local.engine.write_copies(src, r.src_base, &r.dst, r.dst_base, &r.list, None)?;
                    forwards.push_back((p, t));
                }
                // Flag each forwarded part once its bytes are at the next
                // (blocking only when nothing is left to receive).
                match forwards.front() {
                    Some((_, t)) if t.is_done() || cursor == n => {}
                    _ => break,
                }
                let (p, t) = forwards.pop_front().expect("a front");
                let r = &forward[p];
                self.wait_transfer(Role::Destination, r.dest, "forwarding a broadcast part", &t, started)?;
                let next = &self.dests[r.dest as usize];
                let imm = crate::reserved_imm(ImmSpace::Weights, next.slots[PARTS], 0)?;
                let at = (MAX_SOURCES + p) as u64 * 8;
                flags
                    .push((r.dest, self.local.engine.write(&self.local.step_buf, 0, &next.control, at, 8, Some(imm))?));
            }
            if cursor == n && forwards.is_empty() && ready.is_empty() {
                break;
            }
            if cursor < n {
                let ranks = upstream.clone();
                let upstream_side = if self.local.desc.rank == 0 { Role::Source } else { Role::Destination };
                // Wake for the next arrival, or soon for a forward's end.
                let slice = if forwards.is_empty() { Duration::from_millis(50) } else { Duration::from_millis(1) };
                match counter.wait_timeout(slice) {
                    Ok(()) | Err(Error::Timeout(_)) => {}
                    Err(e) => return Err(e),
                }
                let progress = Progress { done: found, total: n };
                let missing = match &self.work {
                    Work::BroadcastDest { parts, .. } => {
                        let t = parts[cursor].tensor as usize;
                        format!("; first part missing: of tensor {:?}", self.local.places[t].spec.name)
                    }
                    _ => String::new(),
                };
                self.liveness_of(upstream_side, step, &ranks, last_progress, progress, &missing)?;
            }
        }
        for (d, t) in &flags {
            self.wait_transfer(Role::Destination, *d, "flagging a forwarded part", t, started)?;
        }
        Ok(())
    }

    fn liveness(&mut self, step: u64, ranks: &[u32], last_progress: Instant, progress: Progress) -> Result<()> {
        self.liveness_of(Role::Source, step, ranks, last_progress, progress, "")
    }

    /// Fails the step when `ranks` (of `side`) made no progress within the
    /// timeout, or a ping finds one gone; pings each once per heartbeat.
    fn liveness_of(
        &mut self,
        side: Role,
        step: u64,
        ranks: &[u32],
        last_progress: Instant,
        progress: Progress,
        missing: &str,
    ) -> Result<()> {
        let timeout = self.local.config.timeout;
        if last_progress.elapsed() >= timeout {
            let who: Vec<String> = ranks.iter().map(|&r| format!("{side} rank {r}{}", self.owed(r))).collect();
            return Err(Error::PeerUnreachable(format!(
                "weights step {step}: no progress within {timeout:?} ({} of {} done{missing}); waiting for {}",
                progress.done,
                progress.total,
                who.join("; ")
            )));
        }
        let heartbeat = (timeout / 10).clamp(Duration::from_millis(20), Duration::from_millis(500));
        for &r in ranks {
            let at = self.pings.iter().position(|(s, x, _, _)| *s == side && *x == r);
            if let Some(i) = at {
                let (_, _, when, t) = &self.pings[i];
                if let Some(Err(e)) = t.result() {
                    let what = format!("step {step}{}{missing}: a liveness ping", self.owed(r));
                    return Err(self.named(side, r, &what, e));
                }
                if !(t.is_done() && when.elapsed() >= heartbeat) {
                    continue;
                }
                self.pings.swap_remove(i);
            }
            let target = match side {
                Role::Source => &self.sources[r as usize].control,
                Role::Destination => &self.dests[r as usize].control,
            };
            let t = self.local.engine.ping(target).map_err(|e| self.named(side, r, "a liveness ping", e))?;
            self.pings.push((side, r, Instant::now(), t));
        }
        Ok(())
    }

    /// `, which writes tensors "a", "b" and 10 more` for a sender of a
    /// direct destination; empty otherwise.
    fn owed(&self, r: u32) -> String {
        let owed: Vec<&str> = match &self.work {
            Work::DirectDest { senders, owed, .. } => senders
                .iter()
                .position(|&s| s == r)
                .map(|i| owed[i].iter().map(|&t| self.local.places[t as usize].spec.name.as_str()).collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        if owed.is_empty() {
            return String::new();
        }
        let shown: Vec<String> = owed.iter().take(4).map(|n| format!("{n:?}")).collect();
        let mut s = format!(", which writes tensors {} here", shown.join(", "));
        if owed.len() > 4 {
            s += &format!(" and {} more", owed.len() - 4);
        }
        s
    }
}
