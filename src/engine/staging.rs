//! Device memory on transports that cannot reach it: staged through
//! host buffers, with every semantic of a direct transfer kept.
//!
//! # When
//! Debian's libfabric `tcp` and `shm` are built without CUDA support, and
//! no provider can reach GPU memory without GPUDirect. On such transports
//! (any whose NICs do not say `Nic::device_memory`) a device region
//! ([`TransferEngine::register_device`]) is registered with no NIC. Its descriptor says it is staged ([`MrDesc::is_staged`]), and
//! requests that touch device memory go through the engine's stager: a
//! thread of its own, started with the engine's first device region or
//! first request to a peer's staged region.
//!
//! # How
//! Each engine has a bounded pool of page-locked host buffers (slots,
//! [`EngineBuilder::staging`]): half for requests it initiates, half for
//! peers' requests it serves (the two never wait for each other, so two
//! engines staging into each other at once cannot deadlock). A request is
//! cut into chunks of a slot; chunks run concurrently, as many as there
//! are slots, so the copy engine of one chunk overlaps the network
//! transfer of another. Per chunk:
//!
//! * write from device memory to host memory: device -> slot (copy
//!   engine), then an RDMA write from the slot;
//! * write into a peer's staged region: (local device or host) -> slot,
//!   then a control message `Put` to the owner, whose stager reads the
//!   slot into one of its own, copies it into the GPU, and answers `Done`;
//! * read of a peer's staged region: a control message `Get`; the owner
//!   copies the GPU range into its slot, writes it into the asker's slot,
//!   and answers `Done`; the asker copies the slot to its destination;
//! * read into local device memory from a peer's host region: an RDMA read
//!   into the slot, then slot -> device;
//! * send from device memory: device -> slot, then the send (at most one
//!   slot long).
//!
//! # Guarantees
//! * A write into a peer's staged region completes at the writer only when
//!   the owner has answered `Done` for every chunk, that is, when every
//!   byte is in the owner's GPU memory.
//! * The immediate of such a write travels on the last chunk's `Put`,
//!   which is sent only after every other chunk is done, and the owner
//!   delivers it (like any received immediate: counters, queues,
//!   callbacks) only after that chunk's copy into the GPU has completed.
//! * A read completes once the bytes are in the reader's memory.
//! * A chunk whose answer does not come within the request timeout fails
//!   the request; its slot is kept out of use for two more timeouts, so a
//!   late answer cannot write into a slot that serves another request.
//!
//! Control messages travel as the engine's other control messages do
//! (sends with the control immediate, see [`super::access`]) and must fit
//! the peer's receive buffers (about 100 bytes plus two engine addresses;
//! the default buffers are 64 KiB).
//!
//! # Encoding (version 1)
//! `"STS" 1`, kind, cookie (u64 LE, the asker's chunk), then
//! * Put (1): key (u64 LE), has-immediate (u8), immediate (u32 LE), the
//!   asker's slot offset (u64 LE), run count (u16 LE, 1 to
//!   [`MAX_RUNS`]), then per run the destination offset and length (u64
//!   LE each; the runs lie one after another in the asker's slot), then
//!   the asker's staging pool descriptor ([`MrDesc`] encoding) to the end.
//! * Get (2): key (u64 LE), the asker's slot offset (u64 LE), run count
//!   (u16 LE, 1 to [`MAX_RUNS`]), per run the source offset and length
//!   (u64 LE each; packed one after another into the asker's slot), then
//!   the asker's staging pool descriptor to the end.
//! * Done (3): status (u8: 0 done, 1 no such region, 2 access or range
//!   refused, 3 failed), then the answering engine's address.
//!
//! Paged writes ([`TransferEngine::write_paged`]) are staged too: their
//! coalesced runs of pages are packed into slots (up to [`MAX_RUNS`] runs
//! per chunk, a run longer than what is left of a slot continuing in the
//! next), so a KV block list costs one `Put` per slot, not one per page.
//!
//! Strided copy lists (`write_copies`, `read_copies`: the KV, MoE and
//! weights primitives) are staged the same way: their rows, joined where
//! they are contiguous on both sides, are the runs (an NHD head slice is a
//! run per token, so its chunks carry up to [`MAX_RUNS`] rows each). Reads
//! pack the peer's runs with `Get` the same way. Batches hand their staged
//! requests to the stager and the others to the worker.
//!
//! Scatters, barriers and pings with staged memory are joined batches of
//! writes (and immediates).
//!
//! # Not staged
//! `Batch::scatter` and `Batch::barrier` refuse staged memory with
//! [`Error::InvalidRequest`] (add each write to the batch instead).
//!
//! [`TransferEngine::write_paged`]: crate::TransferEngine::write_paged
//!
//! [`TransferEngine::register_device`]: crate::TransferEngine::register_device
//! [`EngineBuilder::staging`]: crate::EngineBuilder::staging

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::completion::{Completion, PartGuard, Transfer};
use super::link::Link;
use super::memory::MrInner;
use super::worker::{Command, RequestOp, Submission};
use crate::address::EngineAddress;
use crate::descriptor::MrDesc;
use crate::error::{Error, Result};
use crate::plan::{ShardConfig, ShardPlan};
use crate::wire::Reader;

pub(crate) const MAGIC: &[u8; 3] = b"STS";
/// Runs one chunk (one `Put`) carries at most: the pages of a paged write
/// packed into a slot. 32 keeps the longest `Put` (32 runs and a pool
/// descriptor naming 16 NICs of 64-byte addresses, about 1.7 KiB) inside a
/// control buffer.
pub(crate) const MAX_RUNS: usize = 32;
/// The smallest chunk a request is cut into to spread it over the slots.
const MIN_CHUNK: u64 = 256 << 10;
/// How long answers are awaited when the engine has no request timeout.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
const VERSION: u8 = 1;
const PUT: u8 = 1;
const GET: u8 = 2;
const DONE: u8 = 3;

/// Sizing of the staging pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagingConfig {
    /// Slots for the requests this engine initiates; as many again serve
    /// peers' requests.
    pub slots: usize,
    /// Bytes per slot: the chunk of a staged request.
    pub slot_size: u64,
}

impl Default for StagingConfig {
    /// 4 + 4 slots of 4 MiB: 32 MiB of page-locked memory per engine.
    fn default() -> Self {
        StagingConfig { slots: 4, slot_size: 4 << 20 }
    }
}

impl StagingConfig {
    /// Page-locked bytes the pool takes.
    pub fn pool_bytes(&self) -> u64 {
        2 * self.slots as u64 * self.slot_size
    }
}

/// Copies between host and device memory, completed asynchronously.
pub(crate) trait CopyEngine: Send {
    /// Starts copying `len` bytes from `src` to `dst`; `poll` reports
    /// `ticket` when done. `to_device`: the destination is device memory.
    fn start(&mut self, ticket: u64, dst: u64, src: u64, len: usize, to_device: bool) -> Result<()>;
    /// Appends the copies that have ended since the last call.
    fn poll(&mut self, done: &mut Vec<(u64, Result<()>)>);
    /// Copies are in flight.
    fn busy(&self) -> bool;
}

/// Plain memory copies: the copy engine of host memory, and in tests the
/// stand-in of a GPU's (device regions of host memory; see
/// `EngineBuilder::host_device_stand_in`). A copy is made at the first
/// poll after it starts, never at start, so the stager cannot rely on a
/// copy having happened before it is reported.
#[derive(Default)]
pub(crate) struct HostCopies {
    pending: Vec<(u64, u64, u64, usize)>,
}

impl CopyEngine for HostCopies {
    fn start(&mut self, ticket: u64, dst: u64, src: u64, len: usize, _to_device: bool) -> Result<()> {
        self.pending.push((ticket, dst, src, len));
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<(u64, Result<()>)>) {
        for (ticket, dst, src, len) in self.pending.drain(..) {
            // SAFETY: the stager passes ranges inside memory that lives
            // until the ticket is reported (registered regions it holds and
            // its own pool), and no transfer touches them meanwhile.
            unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
            done.push((ticket, Ok(())));
        }
    }

    fn busy(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// A staged request, as the engine hands it over.
pub(crate) enum StagedOp {
    /// `src` None: an immediate only.
    /// `runs`: (source offset, destination offset, length); a paged write
    /// has one per coalesced run of pages. `len` 0 in a single run: an
    /// immediate only.
    Write {
        src: Option<Arc<MrInner>>,
        dst: MrDesc,
        runs: Vec<(u64, u64, u64)>,
        imm: Option<u32>,
    },
    /// `runs`: (offset in the peer's `src`, offset in `dst`, length).
    Read {
        dst: Arc<MrInner>,
        src: MrDesc,
        runs: Vec<Run>,
    },
    Send {
        peer: EngineAddress,
        src: Arc<MrInner>,
        offset: u64,
        len: u64,
    },
}

pub(crate) enum Msg {
    Submit(StagedOp, PartGuard),
    /// A staged control message from a peer.
    Control(Vec<u8>),
    /// An engine request of chunk `chunk` ended.
    Ended {
        chunk: u64,
        result: Result<()>,
    },
    /// A device region the stager serves to peers.
    AddRegion {
        key: u64,
        region: Weak<MrInner>,
    },
    Stop,
}

/// A decoded staged control message.
#[derive(Debug, PartialEq)]
enum Wire {
    Put { cookie: u64, key: u64, imm: Option<u32>, slot: u64, runs: Vec<(u64, u64)>, pool: MrDesc },
    Get { cookie: u64, key: u64, slot: u64, runs: Vec<(u64, u64)>, pool: MrDesc },
    Done { cookie: u64, status: u8, from: EngineAddress },
}

const OK: u8 = 0;
const NO_REGION: u8 = 1;
const REFUSED: u8 = 2;
const FAILED: u8 = 3;

impl Wire {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        let u64s = |out: &mut Vec<u8>, vs: &[u64]| vs.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        match self {
            Wire::Put { cookie, key, imm, slot, runs, pool } => {
                out.push(PUT);
                u64s(&mut out, &[*cookie, *key]);
                out.push(imm.is_some() as u8);
                out.extend_from_slice(&imm.unwrap_or(0).to_le_bytes());
                u64s(&mut out, &[*slot]);
                put_runs(&mut out, runs);
                out.extend_from_slice(&pool.to_bytes());
            }
            Wire::Get { cookie, key, slot, runs, pool } => {
                out.push(GET);
                u64s(&mut out, &[*cookie, *key, *slot]);
                put_runs(&mut out, runs);
                out.extend_from_slice(&pool.to_bytes());
            }
            Wire::Done { cookie, status, from } => {
                out.push(DONE);
                u64s(&mut out, &[*cookie]);
                out.push(*status);
                out.extend_from_slice(from.encoded());
            }
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<Wire> {
        let mut r = Reader::new(bytes, "staging message");
        r.header(MAGIC, VERSION)?;
        let kind = r.u8("kind")?;
        let cookie = r.u64("cookie")?;
        let rest = |mut r: Reader<'_>| MrDesc::from_bytes(r.rest());
        match kind {
            PUT => {
                let key = r.u64("key")?;
                let has_imm = r.u8("has immediate")?;
                let imm = r.u32("immediate")?;
                let slot = r.u64("slot")?;
                let imm = match has_imm {
                    0 => None,
                    1 => Some(imm),
                    other => return Err(r.error(format!("has-immediate {other}"))),
                };
                let runs = read_runs(&mut r)?;
                Ok(Wire::Put { cookie, key, imm, slot, runs, pool: rest(r)? })
            }
            GET => {
                let (key, slot) = (r.u64("key")?, r.u64("slot")?);
                let runs = read_runs(&mut r)?;
                Ok(Wire::Get { cookie, key, slot, runs, pool: rest(r)? })
            }
            DONE => {
                let status = r.u8("status")?;
                if status > FAILED {
                    return Err(r.error(format!("unknown status {status}")));
                }
                let (provider, nics) = EngineAddress::read(&mut r)?;
                r.finish()?;
                Ok(Wire::Done { cookie, status, from: EngineAddress::new(provider, nics) })
            }
            other => Err(r.error(format!("unknown kind {other}"))),
        }
    }
}

fn put_runs(out: &mut Vec<u8>, runs: &[(u64, u64)]) {
    out.extend_from_slice(&(runs.len() as u16).to_le_bytes());
    for &(offset, len) in runs {
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
}

fn read_runs(r: &mut Reader<'_>) -> Result<Vec<(u64, u64)>> {
    let count = r.u16("run count")? as usize;
    if !(1..=MAX_RUNS).contains(&count) {
        return Err(r.error(format!("{count} runs (1 to {MAX_RUNS})")));
    }
    let mut runs = Vec::with_capacity(count);
    for _ in 0..count {
        let (offset, len) = (r.u64("run offset")?, r.u64("run length")?);
        if offset.checked_add(len).is_none() {
            return Err(r.error("run offset + length overflows"));
        }
        runs.push((offset, len));
    }
    Ok(runs)
}

/// One step of a chunk. Offsets into the chunk's slot are `at`.
enum Step {
    /// Copy `len` bytes from `from` into the slot at `at`.
    ToSlot {
        from: u64,
        at: u64,
        len: u64,
    },
    /// Copy `len` bytes of the slot at `at` to `to` (device memory when
    /// `device`).
    FromSlot {
        to: u64,
        at: u64,
        len: u64,
        device: bool,
    },
    /// RDMA-write the slot's `len` bytes at `at` into `dst` at `offset`.
    Write {
        dst: MrDesc,
        offset: u64,
        at: u64,
        len: u64,
        imm: Option<u32>,
    },
    /// RDMA-read `len` bytes of `src` at `offset` into the slot at `at`.
    Read {
        src: MrDesc,
        offset: u64,
        at: u64,
        len: u64,
    },
    Send {
        peer: EngineAddress,
        len: u64,
    },
    /// Ask the owner of a staged region to take the slot's bytes: `runs`
    /// (destination offset, length) lie one after another from the slot's
    /// start.
    Put {
        owner: EngineAddress,
        key: u64,
        runs: Vec<(u64, u64)>,
        imm: Option<u32>,
    },
    /// Ask the owner of a staged region for the bytes of `runs` (source
    /// offset, length), packed into the slot from its start.
    Get {
        owner: EngineAddress,
        key: u64,
        runs: Vec<(u64, u64)>,
    },
    /// Deliver an immediate to this engine.
    Imm(u32),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    /// This engine's own requests.
    Asker = 0,
    /// Peers' requests.
    Server = 1,
}

#[derive(Debug, PartialEq, Eq)]
enum Wait {
    /// Runnable.
    Ready,
    /// Queued for a slot.
    Slot,
    /// A copy.
    Copy,
    /// An engine request.
    Transfer,
    /// A peer's `Done`, until the deadline.
    Answer(Instant),
}

struct Chunk {
    role: Role,
    /// When it was filed: a peer's request that waited for a slot longer
    /// than the timeout is refused (its asker has given up on it).
    filed: Instant,
    /// Its first step has run.
    started: bool,
    /// The owner a `Put` or `Get` went to: only its `Done` counts.
    asked: Option<EngineAddress>,
    /// The asker's request (Asker), or whom to answer (Server).
    request: u64,
    reply: Option<(EngineAddress, u64)>,
    needs_slot: bool,
    slot: Option<usize>,
    steps: VecDeque<Step>,
    wait: Wait,
    /// The regions whose memory the steps touch, held until the chunk ends.
    _keep: Vec<Arc<MrInner>>,
}

struct Request {
    guard: Option<PartGuard>,
    left: u32,
    error: Option<Error>,
    /// The chunk carrying the immediate: started once it is the last.
    tail: Option<Chunk>,
}

/// What the stager needs of its engine.
pub(crate) struct StagerConfig {
    pub link: Arc<Link>,
    pub address: EngineAddress,
    pub nic_count: usize,
    pub shard: ShardConfig,
    pub timeout: Option<Duration>,
    pub staging: StagingConfig,
    /// The registered pool: `2 * slots` slots of `slot_size`, askers' first.
    pub pool: Arc<MrInner>,
}

pub(crate) struct Stager {
    cfg: StagerConfig,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    copies: Box<dyn CopyEngine>,
    regions: HashMap<u64, Weak<MrInner>>,
    chunks: HashMap<u64, Chunk>,
    requests: HashMap<u64, Request>,
    free: [Vec<usize>; 2],
    queued: [VecDeque<u64>; 2],
    quarantined: Vec<(usize, Instant)>,
    /// When `expire` next scans the chunks.
    next_expiry: Instant,
    next_id: u64,
    rotation: usize,
    copied: Vec<(u64, Result<()>)>,
    stopping: bool,
}

impl Stager {
    pub(crate) fn new(cfg: StagerConfig, copies: Box<dyn CopyEngine>, tx: Sender<Msg>, rx: Receiver<Msg>) -> Self {
        let n = cfg.staging.slots;
        let free = [(0..n).rev().collect(), (n..2 * n).rev().collect()];
        Stager {
            cfg,
            tx,
            rx,
            copies,
            regions: HashMap::new(),
            chunks: HashMap::new(),
            requests: HashMap::new(),
            free,
            queued: [VecDeque::new(), VecDeque::new()],
            quarantined: Vec::new(),
            next_expiry: Instant::now(),
            next_id: 1,
            rotation: 0,
            copied: Vec::new(),
            stopping: false,
        }
    }

    /// The stager's loop; returns on `Msg::Stop` or when every sender is
    /// gone. Chunks still running end with `Shutdown` (their guards drop).
    pub(crate) fn run(mut self) {
        while !self.stopping {
            let wait = if self.copies.busy() { Duration::from_micros(20) } else { Duration::from_millis(10) };
            match self.rx.recv_timeout(wait) {
                Ok(msg) => self.handle(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while let Ok(msg) = self.rx.try_recv() {
                self.handle(msg);
            }
            self.poll_copies();
            self.expire();
        }
        // The copy engine first (CUDA: its streams are synchronized), so no
        // copy is in flight when the pool and the regions are released.
        self.copies = Box::new(HostCopies::default());
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn slot_size(&self) -> u64 {
        self.cfg.staging.slot_size
    }

    /// The chunk of a request of `bytes`: a slot, or less so that the
    /// request is cut into at least as many chunks as there are slots (not
    /// below `MIN_CHUNK`).
    fn chunk_size(&self, bytes: u64) -> u64 {
        let spread = bytes.div_ceil(self.cfg.staging.slots as u64).next_multiple_of(4096);
        self.slot_size().min(spread.max(MIN_CHUNK))
    }

    /// How long a peer's answer, or a peer's request waiting for a slot,
    /// is worth waiting for.
    fn timeout(&self) -> Duration {
        self.cfg.timeout.unwrap_or(ANSWER_TIMEOUT)
    }

    fn slot_addr(&self, slot: usize) -> u64 {
        self.cfg.pool.ptr as u64 + slot as u64 * self.slot_size()
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Submit(op, guard) => self.submit(op, guard),
            Msg::Control(bytes) => match Wire::decode(&bytes) {
                Ok(w) => self.on_wire(w),
                Err(e) => tracing::debug!(error = %e, "ignoring a malformed staging message"),
            },
            Msg::Ended { chunk, result } => {
                if self.chunks.get(&chunk).is_some_and(|c| c.wait == Wait::Transfer) {
                    self.step_done(chunk, result);
                }
            }
            Msg::AddRegion { key, region } => {
                self.regions.retain(|_, r| r.strong_count() > 0);
                self.regions.insert(key, region);
            }
            Msg::Stop => self.stopping = true,
        }
    }

    /// Cuts a request into chunks of a slot.
    fn submit(&mut self, op: StagedOp, guard: PartGuard) {
        let id = self.id();
        let bytes = match &op {
            StagedOp::Write { runs, .. } => runs.iter().map(|r| r.2).sum(),
            StagedOp::Read { runs, .. } => runs.iter().map(|r| r.2).sum(),
            StagedOp::Send { len, .. } => *len,
        };
        // Chunks of a slot, but small enough that a request of a few slots
        // still spreads over all of them (copies overlap the network).
        let size = self.chunk_size(bytes);
        let mut chunks = Vec::new();
        let mut tail_imm = None;
        match op {
            StagedOp::Write { src, dst, runs, imm } => {
                tail_imm = imm;
                for (pieces, last) in pack(&runs, size) {
                    let imm = if last { imm } else { None };
                    let mut steps = VecDeque::new();
                    let mut keep = Vec::new();
                    let mut at = 0;
                    if let Some(src) = &src {
                        for &(src_offset, _, len) in &pieces {
                            steps.push_back(Step::ToSlot { from: src.ptr as u64 + src_offset, at, len });
                            at += len;
                        }
                        keep.push(src.clone());
                    }
                    if dst.is_staged() {
                        let mut runs: Vec<(u64, u64)> = pieces.iter().map(|&(_, d, l)| (d, l)).collect();
                        if runs.is_empty() {
                            runs.push((0, 0));
                        }
                        steps.push_back(Step::Put { owner: dst.owner().clone(), key: dst.key(0), runs, imm });
                    } else if pieces.is_empty() {
                        // No bytes (an immediate alone): a zero-length write.
                        steps.push_back(Step::Write { dst: dst.clone(), offset: 0, at: 0, len: 0, imm });
                    } else {
                        let mut at = 0;
                        let n = pieces.len();
                        for (i, &(_, offset, len)) in pieces.iter().enumerate() {
                            let imm = if i + 1 == n { imm } else { None };
                            steps.push_back(Step::Write { dst: dst.clone(), offset, at, len, imm });
                            at += len;
                        }
                    }
                    chunks.push(self.chunk(Role::Asker, id, at > 0, steps, keep));
                }
            }
            StagedOp::Read { dst, src, runs } => {
                let device = dst.device.is_some();
                for (pieces, _) in pack(&runs, size) {
                    let mut steps = VecDeque::new();
                    if src.is_staged() {
                        let owner = src.owner().clone();
                        let runs = pieces.iter().map(|&(s, _, l)| (s, l)).collect();
                        steps.push_back(Step::Get { owner, key: src.key(0), runs });
                    } else {
                        let mut at = 0;
                        for &(offset, _, len) in &pieces {
                            steps.push_back(Step::Read { src: src.clone(), offset, at, len });
                            at += len;
                        }
                    }
                    let mut at = 0;
                    for &(_, dst_offset, len) in &pieces {
                        steps.push_back(Step::FromSlot { to: dst.ptr as u64 + dst_offset, at, len, device });
                        at += len;
                    }
                    chunks.push(self.chunk(Role::Asker, id, true, steps, vec![dst.clone()]));
                }
            }
            StagedOp::Send { peer, src, offset, len } => {
                let size = self.slot_size();
                if len > size {
                    guard.finish(Err(Error::InvalidRequest(format!(
                        "a send of {len} bytes from device memory is longer than a staging slot ({size} bytes, \
                         EngineBuilder::staging)"
                    ))));
                    return;
                }
                let steps = VecDeque::from([
                    Step::ToSlot { from: src.ptr as u64 + offset, at: 0, len },
                    Step::Send { peer, len },
                ]);
                chunks.push(self.chunk(Role::Asker, id, true, steps, vec![src]));
            }
        }
        let tail = if tail_imm.is_some() && chunks.len() > 1 { chunks.pop() } else { None };
        let left = (chunks.len() + tail.is_some() as usize) as u32;
        self.requests.insert(id, Request { guard: Some(guard), left, error: None, tail });
        for c in chunks {
            self.start(c);
        }
    }

    fn chunk(
        &self,
        role: Role,
        request: u64,
        needs_slot: bool,
        steps: VecDeque<Step>,
        keep: Vec<Arc<MrInner>>,
    ) -> Chunk {
        let filed = Instant::now();
        Chunk {
            role,
            filed,
            started: false,
            asked: None,
            request,
            reply: None,
            needs_slot,
            slot: None,
            steps,
            wait: Wait::Ready,
            _keep: keep,
        }
    }

    /// Files a chunk and runs it as far as it goes.
    fn start(&mut self, mut chunk: Chunk) {
        let id = self.id();
        if chunk.needs_slot {
            let role = chunk.role as usize;
            match self.free[role].pop() {
                Some(slot) => chunk.slot = Some(slot),
                None => {
                    chunk.wait = Wait::Slot;
                    self.queued[role].push_back(id);
                }
            }
        }
        let ready = chunk.wait == Wait::Ready;
        self.chunks.insert(id, chunk);
        if ready {
            self.advance(id);
        }
    }

    /// Runs chunk `id`'s steps until one has to wait, or ends the chunk.
    fn advance(&mut self, id: u64) {
        loop {
            let timeout = self.timeout();
            let Some(chunk) = self.chunks.get_mut(&id) else { return };
            if chunk.role == Role::Asker && self.requests.get(&chunk.request).is_some_and(|r| r.error.is_some()) {
                // The request failed already: the rest is not worth doing.
                return self.end_chunk(id, Ok(()));
            }
            if chunk.role == Role::Server && !chunk.started && chunk.filed.elapsed() > timeout {
                // The asker has given up and may reuse its slot.
                return self.end_chunk(id, Err(Error::Timeout(timeout)));
            }
            chunk.started = true;
            let Some(step) = chunk.steps.pop_front() else { return self.end_chunk(id, Ok(())) };
            if let Step::Put { owner, .. } | Step::Get { owner, .. } = &step {
                chunk.asked = Some(owner.clone());
            }
            let slot_index = chunk.slot;
            let slot = slot_index.map(|s| self.slot_addr(s));
            let slot_offset = slot_index.map_or(0, |s| s as u64 * self.slot_size());
            let started = match step {
                Step::ToSlot { from, at, len } => {
                    let dst = slot.expect("copies have a slot") + at;
                    self.copies.start(id, dst, from, len as usize, false).map(|()| Wait::Copy)
                }
                Step::FromSlot { to, at, len, device } => {
                    let src = slot.expect("copies have a slot") + at;
                    self.copies.start(id, to, src, len as usize, device).map(|()| Wait::Copy)
                }
                Step::Write { dst, offset, at, len, imm } => {
                    let plan = self.plan(slot_offset + at, offset, len, dst.owner().nic_count());
                    let src = (len > 0).then(|| self.cfg.pool.clone());
                    let op = RequestOp::Write { src, dst, plan, imm };
                    self.engine_request(id, op).map(|()| Wait::Transfer)
                }
                Step::Read { src, offset, at, len } => {
                    let plan = self.plan(slot_offset + at, offset, len, src.owner().nic_count());
                    let op = RequestOp::Read { local: self.cfg.pool.clone(), remote: src, plan };
                    self.engine_request(id, op).map(|()| Wait::Transfer)
                }
                Step::Send { peer, len } => {
                    self.rotation += 1;
                    let op = RequestOp::Send {
                        peer,
                        src: self.cfg.pool.clone(),
                        offset: slot_offset,
                        len,
                        rotation: self.rotation,
                    };
                    self.engine_request(id, op).map(|()| Wait::Transfer)
                }
                Step::Put { owner, key, runs, imm } => {
                    let pool = self.cfg.pool.desc.clone();
                    let wire = Wire::Put { cookie: id, key, imm, slot: slot_offset, runs, pool };
                    self.ask(owner, wire)
                }
                Step::Get { owner, key, runs } => {
                    let pool = self.cfg.pool.desc.clone();
                    let wire = Wire::Get { cookie: id, key, slot: slot_offset, runs, pool };
                    self.ask(owner, wire)
                }
                Step::Imm(value) => self.cfg.link.send(Command::DeliverImm(value)).map(|()| Wait::Ready),
            };
            match started {
                Ok(Wait::Ready) => continue,
                Ok(wait) => {
                    if let Some(c) = self.chunks.get_mut(&id) {
                        c.wait = wait;
                    }
                    return;
                }
                Err(e) => return self.end_chunk(id, Err(e)),
            }
        }
    }

    fn plan(&mut self, local: u64, remote: u64, len: u64, remote_nics: usize) -> ShardPlan {
        self.rotation += 1;
        ShardPlan::new(local, remote, len, self.rotation, self.cfg.nic_count, remote_nics, &self.cfg.shard)
    }

    /// Submits an engine request for chunk `id`; its end comes back as
    /// `Msg::Ended`.
    fn engine_request(&mut self, id: u64, op: RequestOp) -> Result<()> {
        let completion = Completion::new(1);
        let tx = self.tx.clone();
        Transfer::new(completion.clone()).on_complete(move |result| {
            let _ = tx.send(Msg::Ended { chunk: id, result: result.clone() });
        });
        let submission = Submission { op, guard: PartGuard::new(completion), submitted: Instant::now() };
        self.cfg.link.send(Command::Submit(submission))
    }

    fn ask(&mut self, owner: EngineAddress, wire: Wire) -> Result<Wait> {
        let bytes = wire.encode();
        if bytes.len() > super::worker::CONTROL_SLOT_SIZE {
            return Err(Error::InvalidRequest(format!(
                "a staging message of {} bytes does not fit a control buffer ({} bytes)",
                bytes.len(),
                super::worker::CONTROL_SLOT_SIZE
            )));
        }
        self.cfg.link.send(Command::SendControl { to: owner, bytes })?;
        Ok(Wait::Answer(Instant::now() + self.timeout()))
    }

    /// The step chunk `id` waited for ended.
    fn step_done(&mut self, id: u64, result: Result<()>) {
        match result {
            Ok(()) => {
                if let Some(c) = self.chunks.get_mut(&id) {
                    c.wait = Wait::Ready;
                }
                self.advance(id)
            }
            Err(e) => self.end_chunk(id, Err(e)),
        }
    }

    fn poll_copies(&mut self) {
        let mut done = std::mem::take(&mut self.copied);
        self.copies.poll(&mut done);
        for (id, result) in done.drain(..) {
            if self.chunks.get(&id).is_some_and(|c| c.wait == Wait::Copy) {
                self.step_done(id, result);
            }
        }
        self.copied = done;
    }

    /// Fails chunks whose answer is overdue, and returns quarantined slots.
    fn expire(&mut self) {
        let now = Instant::now();
        // A scan of every chunk: every 10 ms at most, not every turn (the
        // loop turns every 20 us while copies run, and a large request
        // queues thousands of chunks).
        if now < self.next_expiry {
            return;
        }
        self.next_expiry = now + Duration::from_millis(10);
        let overdue: Vec<u64> = self
            .chunks
            .iter()
            .filter(|(_, c)| matches!(c.wait, Wait::Answer(d) if d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in overdue {
            // end_chunk keeps the slot out of use for a while: the peer may
            // still read it or write into it.
            self.end_chunk(id, Err(Error::Timeout(self.timeout())));
        }
        if !self.quarantined.is_empty() {
            let (back, kept): (Vec<_>, Vec<_>) = self.quarantined.drain(..).partition(|&(_, at)| at <= now);
            self.quarantined = kept;
            for (slot, _) in back {
                self.release(slot);
            }
        }
    }

    fn release(&mut self, slot: usize) {
        let role = usize::from(slot >= self.cfg.staging.slots);
        while let Some(next) = self.queued[role].pop_front() {
            if let Some(c) = self.chunks.get_mut(&next) {
                c.slot = Some(slot);
                c.wait = Wait::Ready;
                return self.advance(next);
            }
        }
        self.free[role].push(slot);
    }

    fn end_chunk(&mut self, id: u64, result: Result<()>) {
        let Some(chunk) = self.chunks.remove(&id) else { return };
        if let Some(slot) = chunk.slot {
            if result.is_err() {
                // A failed step may leave operations in the provider that
                // still read or write the slot (the worker ends a request
                // at its timeout without waiting for them), and a peer that
                // was asked may still use it: kept out of use for two
                // timeouts, past anything the peer's or this engine's
                // timeouts leave running.
                self.quarantined.push((slot, Instant::now() + 2 * self.timeout()));
            } else {
                self.release(slot);
            }
        }
        match chunk.role {
            Role::Server => {
                let status = match &result {
                    Ok(()) => OK,
                    Err(e) => {
                        tracing::debug!(error = %e, "serving a staged request failed");
                        FAILED
                    }
                };
                if let Some((to, cookie)) = chunk.reply {
                    self.answer(to, cookie, status);
                }
            }
            Role::Asker => {
                let Some(r) = self.requests.get_mut(&chunk.request) else { return };
                if let Err(e) = result {
                    if r.error.is_none() {
                        r.error = Some(e);
                        // Its chunks still queued for a slot end now, not
                        // when a slot frees.
                        let request = chunk.request;
                        let (chunks, queued) = (&mut self.chunks, &mut self.queued[Role::Asker as usize]);
                        queued.retain(|q| {
                            let drop = chunks.get(q).is_some_and(|c| c.request == request);
                            if drop {
                                chunks.remove(q);
                                r.left -= 1;
                            }
                            !drop
                        });
                    }
                }
                r.left -= 1;
                if r.left == 1 && r.tail.is_some() && r.error.is_none() {
                    let tail = r.tail.take().expect("checked");
                    return self.start(tail);
                }
                if r.left == 1 && r.error.is_some() && r.tail.take().is_some() {
                    r.left = 0;
                }
                if r.left == 0 {
                    let r = self.requests.remove(&chunk.request).expect("present");
                    if let Some(guard) = r.guard {
                        guard.finish(r.error.map_or(Ok(()), Err));
                        // A thread waiting on a batch's handle drives the
                        // worker and may sleep on its descriptors: wake it
                        // to see the outcome (a staged part ends here, not
                        // on the worker).
                        self.cfg.link.wake();
                    }
                }
            }
        }
    }

    fn answer(&mut self, to: EngineAddress, cookie: u64, status: u8) {
        let wire = Wire::Done { cookie, status, from: self.cfg.address.clone() };
        let _ = self.cfg.link.send(Command::SendControl { to, bytes: wire.encode() });
    }

    fn on_wire(&mut self, wire: Wire) {
        match wire {
            Wire::Done { cookie, status, from } => {
                let asked = |c: &Chunk| matches!(c.wait, Wait::Answer(_)) && c.asked.as_ref() == Some(&from);
                if !self.chunks.get(&cookie).is_some_and(asked) {
                    // Late (the chunk ended), or not from the owner asked.
                    return;
                }
                let result = match status {
                    OK => Ok(()),
                    NO_REGION => {
                        Err(Error::RemoteAccess(format!("{from} no longer holds the staged region (deregistered)")))
                    }
                    REFUSED => Err(Error::RemoteAccess(format!("{from} refused the staged access or range"))),
                    _ => Err(Error::Transport {
                        op: "staged transfer",
                        code: 0,
                        prov_errno: 0,
                        message: format!("{from} could not complete its side of a staged transfer (see its log)"),
                    }),
                };
                self.step_done(cookie, result);
            }
            Wire::Put { cookie, key, imm, slot, runs, pool } => {
                let owner = pool.owner().clone();
                let mut region = None;
                for &(offset, len) in &runs {
                    match self.serve(key, offset, len, true) {
                        Ok(r) => region = Some(r),
                        Err(status) => return self.answer(owner, cookie, status),
                    }
                }
                let region = region.expect("at least one run");
                let device = region.device.is_some();
                let size = self.slot_size();
                let total: u64 = runs.iter().map(|r| r.1).sum();
                let mut steps = VecDeque::new();
                // Windows of one of this engine's slots over the asker's
                // packed runs (whose slots may be larger than ours).
                for window in (0..total).step_by(size as usize) {
                    let end = total.min(window + size);
                    steps.push_back(Step::Read { src: pool.clone(), offset: slot + window, at: 0, len: end - window });
                    let mut run_start = 0;
                    for &(offset, len) in &runs {
                        let (from, to) = (run_start.max(window), (run_start + len).min(end));
                        if from < to {
                            let dst = region.ptr as u64 + offset + (from - run_start);
                            steps.push_back(Step::FromSlot { to: dst, at: from - window, len: to - from, device });
                        }
                        run_start += len;
                    }
                }
                if let Some(v) = imm {
                    steps.push_back(Step::Imm(v));
                }
                let mut chunk = self.chunk(Role::Server, 0, total > 0, steps, vec![region]);
                chunk.reply = Some((owner, cookie));
                self.start(chunk);
            }
            Wire::Get { cookie, key, slot, runs, pool } => {
                let owner = pool.owner().clone();
                let mut region = None;
                for &(offset, len) in &runs {
                    match self.serve(key, offset, len, false) {
                        Ok(r) => region = Some(r),
                        Err(status) => return self.answer(owner, cookie, status),
                    }
                }
                let region = region.expect("at least one run");
                let size = self.slot_size();
                let total: u64 = runs.iter().map(|r| r.1).sum();
                let mut steps = VecDeque::new();
                // Windows of one of this engine's slots over the packed runs,
                // as for a Put, the other way round.
                for window in (0..total).step_by(size as usize) {
                    let end = total.min(window + size);
                    let mut run_start = 0;
                    for &(offset, len) in &runs {
                        let (from, to) = (run_start.max(window), (run_start + len).min(end));
                        if from < to {
                            let src = region.ptr as u64 + offset + (from - run_start);
                            steps.push_back(Step::ToSlot { from: src, at: from - window, len: to - from });
                        }
                        run_start += len;
                    }
                    let (offset, len) = (slot + window, end - window);
                    steps.push_back(Step::Write { dst: pool.clone(), offset, at: 0, len, imm: None });
                }
                let mut chunk = self.chunk(Role::Server, 0, total > 0, steps, vec![region]);
                chunk.reply = Some((owner, cookie));
                self.start(chunk);
            }
        }
    }

    /// The region a peer's request names, if it exists and allows it.
    fn serve(&self, key: u64, offset: u64, len: u64, write: bool) -> std::result::Result<Arc<MrInner>, u8> {
        let region = self.regions.get(&key).and_then(Weak::upgrade).ok_or(NO_REGION)?;
        let access = region.desc.access();
        let allowed = if write { access.remote_write } else { access.remote_read };
        if !allowed || offset.checked_add(len).is_none_or(|end| end > region.len) {
            return Err(REFUSED);
        }
        Ok(region)
    }
}

/// (source offset, destination offset, length) of a staged write.
pub(crate) type Run = (u64, u64, u64);

/// Packs `runs` (source offset, destination offset, length) into chunks of
/// at most `size` bytes and [`MAX_RUNS`] runs, splitting runs longer than
/// what is left of a chunk; each chunk with whether it is the last. Only
/// empty runs (an immediate alone) make one empty chunk.
fn pack(runs: &[Run], size: u64) -> Vec<(Vec<Run>, bool)> {
    let mut chunks: Vec<Vec<Run>> = Vec::new();
    let mut current = Vec::new();
    let mut used = 0;
    for &(mut src, mut dst, mut len) in runs.iter().filter(|r| r.2 > 0) {
        while len > 0 {
            if used == size || current.len() == MAX_RUNS {
                chunks.push(std::mem::take(&mut current));
                used = 0;
            }
            let n = len.min(size - used);
            current.push((src, dst, n));
            (src, dst, len, used) = (src + n, dst + n, len - n, used + n);
        }
    }
    if !current.is_empty() || chunks.is_empty() {
        chunks.push(current);
    }
    let count = chunks.len();
    chunks.into_iter().enumerate().map(|(i, c)| (c, i + 1 == count)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderKind;

    #[test]
    fn runs_pack_into_slots() {
        // An immediate alone: one empty chunk.
        let c = pack(&[(0, 0, 0)], 100);
        assert_eq!(c, vec![(vec![], true)]);
        // A long run splits at slot boundaries.
        let c = pack(&[(0, 1000, 250)], 100);
        let lens: Vec<Vec<(u64, u64, u64)>> = c.iter().map(|x| x.0.clone()).collect();
        assert_eq!(lens, vec![vec![(0, 1000, 100)], vec![(100, 1100, 100)], vec![(200, 1200, 50)]]);
        // Small runs share a slot; a run crossing the end is split.
        let c = pack(&[(0, 0, 40), (500, 900, 40), (1000, 2000, 40)], 100);
        assert_eq!(c[0].0, vec![(0, 0, 40), (500, 900, 40), (1000, 2000, 20)]);
        assert_eq!(c[1], (vec![(1020, 2020, 20)], true));
        // At most MAX_RUNS per chunk.
        let many: Vec<_> = (0..MAX_RUNS as u64 + 1).map(|i| (i * 10, i * 10, 1)).collect();
        let c = pack(&many, 1 << 20);
        assert_eq!((c.len(), c[0].0.len(), c[1].0.len()), (2, MAX_RUNS, 1));
    }

    fn address() -> EngineAddress {
        EngineAddress::new(ProviderKind::Tcp, vec![vec![1, 2, 3, 4].into_boxed_slice()])
    }

    #[test]
    fn messages_round_trip() {
        let pool = MrDesc::new(address(), 0, 1 << 20, crate::Access::REMOTE_READ_WRITE, vec![9]);
        let messages = [
            Wire::Put { cookie: 1, key: 2, imm: Some(5), slot: 6, runs: vec![(3, 4)], pool: pool.clone() },
            Wire::Put { cookie: 1, key: 2, imm: None, slot: 6, runs: vec![(3, 4), (100, 7)], pool: pool.clone() },
            Wire::Get { cookie: 7, key: 8, slot: 11, runs: vec![(9, 10), (40, 2)], pool },
            Wire::Done { cookie: 12, status: REFUSED, from: address() },
        ];
        for m in messages {
            assert_eq!(Wire::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let done = Wire::Done { cookie: 12, status: OK, from: address() }.encode();
        for cut in 0..done.len() {
            assert!(Wire::decode(&done[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = done.clone();
        bad[13] = 9;
        assert!(Wire::decode(&bad).is_err());
        let mut trailing = done;
        trailing.push(0);
        assert!(Wire::decode(&trailing).is_err());
    }

    #[test]
    fn host_copies_happen_at_the_poll_not_at_start() {
        let src = [7u8; 16];
        let mut dst = [0u8; 16];
        let mut c = HostCopies::default();
        c.start(3, dst.as_mut_ptr() as u64, src.as_ptr() as u64, 16, true).unwrap();
        assert!(c.busy());
        assert_eq!(dst, [0; 16]);
        let mut done = Vec::new();
        c.poll(&mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0, 3);
        assert_eq!(dst, [7; 16]);
    }

    #[test]
    fn the_default_pool_is_32_mib() {
        assert_eq!(StagingConfig::default().pool_bytes(), 32 << 20);
    }
}
