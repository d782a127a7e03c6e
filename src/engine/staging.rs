//! Memory the NICs should not move directly, moved through host buffers
//! with every semantic of a direct transfer kept: device memory on
//! transports that cannot reach it, and small runs of host memory on
//! transports whose per-operation cost dwarfs a memory copy.
//!
//! # When
//! * **Device memory.** Debian's libfabric `tcp` and `shm` are built
//!   without CUDA support, and no provider can reach GPU memory without
//!   GPUDirect. On such transports (any whose NICs do not say
//!   `Nic::device_memory`) a device region
//!   ([`TransferEngine::register_device`]) is registered with no NIC. Its
//!   descriptor says it is staged ([`MrDesc::is_staged`]), and requests
//!   that touch device memory go through the engine's *device stager*: a
//!   thread of its own, started with the engine's first device region or
//!   first request to a peer's staged region.
//! * **Packed host memory.** libfabric `tcp` carries RMA in software:
//!   every operation costs system calls and wake-ups on both sides (on
//!   this project's 2-core VM about 14 µs per operation whatever its size
//!   up to 32 KiB, against 0.1 µs to copy a KiB). A strided copy list or
//!   paged write whose runs average fewer bytes than the NICs'
//!   `Nic::pack_runs_below` (an NHD head slice of a KV block: 1 KiB per
//!   token) is packed instead, by the *host packer*: a second stager, with
//!   its own pool of 2 MiB slots and no CUDA. Targets opt in: a host
//!   region registered with remote access on such an engine is served by
//!   its packer, and its descriptor says so ([`MrDesc::is_packed`]); other
//!   descriptors get direct operations. Requests made on the worker
//!   thread before the packer runs go direct too.
//!
//! # How
//! Each stager has a bounded pool of page-locked host buffers (slots,
//! [`EngineBuilder::staging`], [`EngineBuilder::packing`]): half for
//! requests it initiates, half for peers' requests it serves (the two
//! never wait for each other, so two engines staging into each other at
//! once cannot deadlock). A request is cut into chunks of a slot; chunks
//! run concurrently, as many as there are slots, so the copies of one
//! chunk overlap the network transfer of another. Per chunk:
//!
//! * write from device memory to host memory: device -> slot (copy
//!   engine), then an RDMA write from the slot;
//! * write into a peer's staged region: (local device or host) -> slot,
//!   then a control message `Put` to the owner, whose stager reads the
//!   slot into one of its own, copies it into the region, and answers
//!   `Done` (a packed region: see *Packed writes* below);
//! * read of a peer's staged (or packed) region: a control message `Get`;
//!   the owner copies the range into its slot, writes it into the asker's
//!   slot, and answers `Done`; the asker copies the slot to its
//!   destination;
//! * read into local device memory from a peer's host region: an RDMA read
//!   into the slot, then slot -> device;
//! * send from device memory: device -> slot, then the send (at most one
//!   slot long).
//!
//! Copies between host memory and a slot are made on the stager's thread
//! (one pass over the chunk's rows); copies that touch device memory go to
//! the copy engine (CUDA streams), one per contiguous run.
//!
//! # Packed writes: leases
//! A packed write must not wait a round trip per chunk (on tcp every
//! control message also queues behind the data in flight on the same
//! connection), so the host packer writes into slots the target *lends*:
//!
//! * the asker asks a target for a slot (`Lease`), at most 4 per target;
//!   the target answers with one of its serving slots (`Grant`) when it
//!   has one free;
//! * per chunk: the asker writes the chunk's rows into a lent slot, from
//!   its own slot after gathering them there, or straight from the source
//!   region when they lie back to back in it (a KV head slice is
//!   contiguous in the sender's own cache); then `Commit` names the rows'
//!   places (spans) and the immediate; the target copies them in,
//!   delivers the immediate, and answers `Done`;
//! * `Done` says whether the lease stays with the asker (unless another
//!   peer waits for a slot): the asker's next chunk for that target writes
//!   into it at once; a lease nothing waits for goes back (`Release`).
//!
//! A chunk that fails between its write and the `Done` drops its lease;
//! the target takes back a lease unused for a request timeout, and keeps
//! its slot out of use for two more (a late write cannot reach a slot
//! that serves someone else). A refused `Commit` (a dropped region, a
//! range outside it) keeps the lease: the asker's write into it had
//! completed. Packed reads use `Get`, as staged reads do.
//!
//! # Guarantees
//! * A write into a peer's staged or packed region completes at the writer
//!   only when the owner has answered `Done` for every chunk, that is,
//!   when every byte is in the owner's memory.
//! * The immediate of such a write travels on the last chunk's `Put`,
//!   which is sent only after every other chunk is done, and the owner
//!   delivers it (like any received immediate: counters, queues,
//!   callbacks) only after that chunk's copy has completed.
//! * A read completes once the bytes are in the reader's memory.
//! * A chunk whose answer does not come within the request timeout fails
//!   the request; its slot is kept out of use for two more timeouts, so a
//!   late answer cannot write into a slot that serves another request.
//!
//! Control messages travel as the engine's other control messages do
//! (sends with the control immediate, see [`super::access`]) and must fit
//! a control buffer ([`CONTROL_SLOT_SIZE`](super::worker::CONTROL_SLOT_SIZE)):
//! a chunk carries as many spans as fit beside the asker's pool
//! descriptor (about 60 with one NIC, 25 with 16 NICs of 64-byte
//! addresses).
//!
//! # Encoding (version 2)
//! `"STS" 2`, lane (u8: 0 the device stagers, 1 the host packers), kind,
//! cookie (u64 LE: the asker's chunk, except in `Release`), then
//! * Put (1, device lane): key (u64 LE), has-immediate (u8), immediate
//!   (u32 LE), the asker's slot offset (u64 LE), span count (u16 LE, 0
//!   for an immediate alone), then per span the destination offset, row
//!   length, rows and row stride (u64 LE each; the spans' rows lie one
//!   after another in the asker's slot), then the asker's pool descriptor
//!   ([`MrDesc`] encoding) to the end.
//! * Get (2): key (u64 LE), the asker's slot offset (u64 LE), span count
//!   (u16 LE, at least 1), per span the source offset, row length, rows
//!   and stride (packed one after another into the asker's slot), then
//!   the asker's pool descriptor to the end.
//! * Done (3): status (u8: 0 done, 1 no such region, 2 access or range
//!   refused, 3 failed), keep (u8: 1 the lease stays the asker's), then
//!   the answering engine's address.
//! * Lease (4, host lane): the asker's address.
//! * Grant (5): lease (u64 LE), slot offset and length in the target's
//!   pool (u64 LE each), then the target's pool descriptor.
//! * Commit (6): lease, key (u64 LE each), has-immediate, immediate, span
//!   count and spans as in Put (destination side, the rows one after
//!   another from the lent slot's start), then the asker's address.
//! * Release (7): the cookie is the lease; then the asker's address.
//!
//! Spans are checked when decoded (each at least one row of at least one
//! byte, none overflowing, at most [`MAX_CHUNK`] bytes in all) and against
//! the region before any byte is copied.
//!
//! Paged writes ([`TransferEngine::write_paged`]) and strided copy lists
//! (`write_copies`, `read_copies`: the KV, MoE and weights primitives) are
//! staged or packed as spans: a copy of many rows is one span, so an NHD
//! head slice of a block (16 rows of 1 KiB) costs 32 bytes of a `Put`, and
//! a chunk carries up to a slot of rows. Batches hand their staged
//! requests to the device stager and the others to the worker (batches
//! are never packed).
//!
//! Scatters, barriers and pings with staged memory are joined batches of
//! writes (and immediates).
//!
//! # Not staged
//! `Batch::scatter` and `Batch::barrier` refuse staged memory with
//! [`Error::InvalidRequest`] (add each write to the batch instead).
//!
//! [`TransferEngine::write_paged`]: crate::TransferEngine::write_paged
//! [`TransferEngine::register_device`]: crate::TransferEngine::register_device
//! [`EngineBuilder::staging`]: crate::EngineBuilder::staging
//! [`EngineBuilder::packing`]: crate::EngineBuilder::packing

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::completion::{Completion, PartGuard, Transfer};
use super::link::Link;
use super::memory::MrInner;
use super::worker::{Command, RequestOp, Submission, CONTROL_SLOT_SIZE};
use crate::address::EngineAddress;
use crate::descriptor::MrDesc;
use crate::error::{Error, Result};
use crate::plan::{ShardConfig, ShardPlan, Strided};
use crate::wire::Reader;

pub(crate) const MAGIC: &[u8; 3] = b"STS";
/// The smallest chunk a request is cut into to spread it over the slots.
const MIN_CHUNK: u64 = 256 << 10;
/// How long answers are awaited when the engine has no request timeout.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
const VERSION: u8 = 2;
const PUT: u8 = 1;
const GET: u8 = 2;
const DONE: u8 = 3;
const LEASE: u8 = 4;
const GRANT: u8 = 5;
const COMMIT: u8 = 6;
const RELEASE: u8 = 7;
/// Bytes of a `Put` before its spans: magic, version, lane, kind, cookie,
/// key, has-immediate, immediate, slot, span count.
const PUT_HEADER: usize = 3 + 1 + 1 + 1 + 8 + 8 + 1 + 4 + 8 + 2;
/// The packer's slot (and so lease and chunk) size: fixed, so that every
/// engine's chunks fit every peer's leases.
pub(crate) const PACK_SLOT: u64 = 2 << 20;
/// Leases an asker holds at most per owner.
const MAX_LEASES: usize = 4;
/// Bytes of one encoded span.
const SPAN_BYTES: usize = 32;
/// The most bytes one `Put` or `Get` may name: no pool slot is larger
/// (`EngineBuilder::staging` and `packing` cap slots at this), so a peer
/// cannot make a stager plan an unbounded amount of work.
pub(crate) const MAX_CHUNK: u64 = 1 << 30;
/// Where a message's lane is: after the magic and the version.
pub(crate) const LANE_AT: usize = 4;

/// Which of an engine's two stagers a message is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lane {
    /// The device stager: device memory on transports that cannot reach it.
    Device = 0,
    /// The host packer: small runs of host memory.
    Host = 1,
}

impl Lane {
    pub(crate) fn from_byte(b: u8) -> Option<Lane> {
        match b {
            0 => Some(Lane::Device),
            1 => Some(Lane::Host),
            _ => None,
        }
    }
}

/// Sizing of a stager's pool.
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

/// Plain memory copies: the copy engine of a device stager without CUDA
/// (the host packer copies inline, never through it), and in tests the
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

/// One side of a strided group of runs: `rows` runs of `row_len` bytes,
/// `stride` apart, the first at `offset` in a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub offset: u64,
    pub row_len: u64,
    pub rows: u64,
    pub stride: u64,
}

impl Span {
    /// The source side of `g`.
    pub(crate) fn source(g: &Strided) -> Span {
        Span { offset: g.src_offset, row_len: g.row_len, rows: g.rows, stride: g.src_stride }
    }

    /// The destination side of `g`.
    pub(crate) fn destination(g: &Strided) -> Span {
        Span { offset: g.dst_offset, row_len: g.row_len, rows: g.rows, stride: g.dst_stride }
    }

    /// Bytes the span covers (the spans decoded from a peer never
    /// overflow: [`read_spans`] checks).
    fn len(&self) -> u64 {
        self.rows * self.row_len
    }

    /// One past its last byte, or `None` on overflow.
    fn end(&self) -> Option<u64> {
        self.rows.checked_sub(1)?.checked_mul(self.stride)?.checked_add(self.offset)?.checked_add(self.row_len)
    }
}

/// Calls `f(offset in the region, offset from `from`, length)` for each
/// piece of the packed stream of `spans` (their rows one after another)
/// that lies in `[from, to)`: one call per row, or part of a row at the
/// window's edges.
fn for_each_piece(spans: &[Span], from: u64, to: u64, mut f: impl FnMut(u64, u64, u64)) {
    let mut start = 0;
    for s in spans {
        if start >= to {
            return;
        }
        let len = s.len();
        if s.row_len > 0 && start + len > from {
            let mut row = from.saturating_sub(start) / s.row_len;
            while row < s.rows {
                let row_start = start + row * s.row_len;
                if row_start >= to {
                    break;
                }
                let (a, b) = (row_start.max(from), (row_start + s.row_len).min(to));
                f(s.offset + row * s.stride + (a - row_start), a - from, b - a);
                row += 1;
            }
        }
        start += len;
    }
}

/// A staged request, as the engine hands it over.
pub(crate) enum StagedOp {
    /// `src` None: an immediate only (`groups` empty). `groups`: offsets in
    /// `src` and in `dst`.
    Write {
        src: Option<Arc<MrInner>>,
        dst: MrDesc,
        groups: Vec<Strided>,
        imm: Option<u32>,
    },
    /// `groups`: offsets in the peer's `src` and in `dst`.
    Read {
        dst: Arc<MrInner>,
        src: MrDesc,
        groups: Vec<Strided>,
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
    /// A region the stager serves to peers.
    AddRegion {
        key: u64,
        region: Weak<MrInner>,
    },
    Stop,
}

/// A decoded staged control message.
#[derive(Debug, PartialEq)]
enum Wire {
    /// (Device lane) "Read the rows of `spans` (destination side, in
    /// region `key`) from `slot` in `pool`, copy them in, answer `Done`."
    Put { lane: Lane, cookie: u64, key: u64, imm: Option<u32>, slot: u64, spans: Vec<Span>, pool: MrDesc },
    /// "Write the rows of `spans` (source side, in region `key`) at `slot`
    /// in `pool`, answer `Done`."
    Get { lane: Lane, cookie: u64, key: u64, slot: u64, spans: Vec<Span>, pool: MrDesc },
    /// The end of the asker's chunk `cookie`; `keep`: the lease it used
    /// stays the asker's (host lane).
    Done { lane: Lane, cookie: u64, status: u8, keep: bool, from: EngineAddress },
    /// (Host lane) "Lend me one of your slots" (for chunk `cookie`).
    Lease { lane: Lane, cookie: u64, from: EngineAddress },
    /// (Host lane) The owner's answer: lease `lease` is its slot `slot`
    /// (`len` bytes) in `pool`, the asker's until it releases it or a
    /// `Done` says otherwise.
    Grant { lane: Lane, cookie: u64, lease: u64, slot: u64, len: u64, pool: MrDesc },
    /// (Host lane) "The rows of `spans` (destination side, in region
    /// `key`) are in lease `lease`, one after another from its start: copy
    /// them in, deliver `imm`, answer `Done`" (for chunk `cookie`).
    Commit { lane: Lane, cookie: u64, lease: u64, key: u64, imm: Option<u32>, spans: Vec<Span>, from: EngineAddress },
    /// (Host lane) "I am done with lease `lease`" (the message's cookie).
    Release { lane: Lane, lease: u64, from: EngineAddress },
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
        let imm = |out: &mut Vec<u8>, imm: &Option<u32>| {
            out.push(imm.is_some() as u8);
            out.extend_from_slice(&imm.unwrap_or(0).to_le_bytes());
        };
        match self {
            Wire::Put { lane, cookie, key, imm: i, slot, spans, pool } => {
                out.extend_from_slice(&[*lane as u8, PUT]);
                u64s(&mut out, &[*cookie, *key]);
                imm(&mut out, i);
                u64s(&mut out, &[*slot]);
                put_spans(&mut out, spans);
                out.extend_from_slice(&pool.to_bytes());
            }
            Wire::Get { lane, cookie, key, slot, spans, pool } => {
                out.extend_from_slice(&[*lane as u8, GET]);
                u64s(&mut out, &[*cookie, *key, *slot]);
                put_spans(&mut out, spans);
                out.extend_from_slice(&pool.to_bytes());
            }
            Wire::Done { lane, cookie, status, keep, from } => {
                out.extend_from_slice(&[*lane as u8, DONE]);
                u64s(&mut out, &[*cookie]);
                out.extend_from_slice(&[*status, *keep as u8]);
                out.extend_from_slice(from.encoded());
            }
            Wire::Lease { lane, cookie, from } => {
                out.extend_from_slice(&[*lane as u8, LEASE]);
                u64s(&mut out, &[*cookie]);
                out.extend_from_slice(from.encoded());
            }
            Wire::Grant { lane, cookie, lease, slot, len, pool } => {
                out.extend_from_slice(&[*lane as u8, GRANT]);
                u64s(&mut out, &[*cookie, *lease, *slot, *len]);
                out.extend_from_slice(&pool.to_bytes());
            }
            Wire::Commit { lane, cookie, lease, key, imm: i, spans, from } => {
                out.extend_from_slice(&[*lane as u8, COMMIT]);
                u64s(&mut out, &[*cookie, *lease, *key]);
                imm(&mut out, i);
                put_spans(&mut out, spans);
                out.extend_from_slice(from.encoded());
            }
            Wire::Release { lane, lease, from } => {
                out.extend_from_slice(&[*lane as u8, RELEASE]);
                u64s(&mut out, &[*lease]);
                out.extend_from_slice(from.encoded());
            }
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<Wire> {
        let mut r = Reader::new(bytes, "staging message");
        r.header(MAGIC, VERSION)?;
        let lane = r.u8("lane")?;
        let lane = Lane::from_byte(lane).ok_or_else(|| r.error(format!("unknown lane {lane}")))?;
        let kind = r.u8("kind")?;
        let cookie = r.u64("cookie")?;
        let pool = |mut r: Reader<'_>| MrDesc::from_bytes(r.rest());
        let address = |mut r: Reader<'_>| -> Result<EngineAddress> {
            let (provider, nics) = EngineAddress::read(&mut r)?;
            r.finish()?;
            Ok(EngineAddress::new(provider, nics))
        };
        let imm = |r: &mut Reader<'_>| -> Result<Option<u32>> {
            let has = r.u8("has immediate")?;
            let value = r.u32("immediate")?;
            match has {
                0 => Ok(None),
                1 => Ok(Some(value)),
                other => Err(r.error(format!("has-immediate {other}"))),
            }
        };
        match kind {
            PUT => {
                let key = r.u64("key")?;
                let imm = imm(&mut r)?;
                let slot = r.u64("slot")?;
                let spans = read_spans(&mut r, 0)?;
                check_slot(&r, slot, &spans)?;
                Ok(Wire::Put { lane, cookie, key, imm, slot, spans, pool: pool(r)? })
            }
            GET => {
                let (key, slot) = (r.u64("key")?, r.u64("slot")?);
                let spans = read_spans(&mut r, 1)?;
                check_slot(&r, slot, &spans)?;
                Ok(Wire::Get { lane, cookie, key, slot, spans, pool: pool(r)? })
            }
            DONE => {
                let status = r.u8("status")?;
                if status > FAILED {
                    return Err(r.error(format!("unknown status {status}")));
                }
                let keep = match r.u8("keep")? {
                    0 => false,
                    1 => true,
                    other => return Err(r.error(format!("keep {other}"))),
                };
                Ok(Wire::Done { lane, cookie, status, keep, from: address(r)? })
            }
            LEASE => Ok(Wire::Lease { lane, cookie, from: address(r)? }),
            GRANT => {
                let (lease, slot, len) = (r.u64("lease")?, r.u64("slot")?, r.u64("length")?);
                if len == 0 || len > MAX_CHUNK || slot.checked_add(len).is_none() {
                    return Err(r.error(format!("a lease of {len} bytes at {slot}")));
                }
                Ok(Wire::Grant { lane, cookie, lease, slot, len, pool: pool(r)? })
            }
            COMMIT => {
                let (lease, key) = (r.u64("lease")?, r.u64("key")?);
                let imm = imm(&mut r)?;
                let spans = read_spans(&mut r, 0)?;
                Ok(Wire::Commit { lane, cookie, lease, key, imm, spans, from: address(r)? })
            }
            RELEASE => Ok(Wire::Release { lane, lease: cookie, from: address(r)? }),
            other => Err(r.error(format!("unknown kind {other}"))),
        }
    }
}

fn put_spans(out: &mut Vec<u8>, spans: &[Span]) {
    out.extend_from_slice(&(spans.len() as u16).to_le_bytes());
    for s in spans {
        for v in [s.offset, s.row_len, s.rows, s.stride] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Reads at least `min` spans, each of at least one row of at least one
/// byte, none overflowing, together at most [`MAX_CHUNK`] bytes.
fn read_spans(r: &mut Reader<'_>, min: usize) -> Result<Vec<Span>> {
    let count = r.u16("span count")? as usize;
    if count < min {
        return Err(r.error(format!("{count} spans (at least {min})")));
    }
    let mut spans = Vec::with_capacity(count.min(CONTROL_SLOT_SIZE / SPAN_BYTES));
    let mut total = 0u64;
    for _ in 0..count {
        let span = Span {
            offset: r.u64("span offset")?,
            row_len: r.u64("row length")?,
            rows: r.u64("rows")?,
            stride: r.u64("stride")?,
        };
        if span.rows == 0 || span.row_len == 0 {
            return Err(r.error("a span without bytes"));
        }
        let len = span.rows.checked_mul(span.row_len);
        match (span.end(), len.and_then(|l| l.checked_add(total))) {
            (Some(_), Some(t)) if t <= MAX_CHUNK => total = t,
            _ => return Err(r.error(format!("spans past {MAX_CHUNK} bytes or overflowing"))),
        }
        spans.push(span);
    }
    Ok(spans)
}

/// A slot offset whose chunk (the spans' bytes) does not run past the end
/// of the address space.
fn check_slot(r: &Reader<'_>, slot: u64, spans: &[Span]) -> Result<()> {
    let total: u64 = spans.iter().map(Span::len).sum();
    match slot.checked_add(total) {
        Some(_) => Ok(()),
        None => Err(r.error(format!("slot {slot} + {total} bytes overflows"))),
    }
}

/// The most spans a `Put` or `Get` from a pool whose descriptor encodes in
/// `desc_len` bytes may carry within a control buffer (at least 1).
pub(crate) fn max_spans(desc_len: usize) -> usize {
    (CONTROL_SLOT_SIZE.saturating_sub(PUT_HEADER + desc_len) / SPAN_BYTES).max(1)
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
    /// Copy, on this thread, the pieces of the packed stream of `spans`
    /// that lie in `[from, to)` between host memory at `base` (plus each
    /// span's offsets) and the slot (the window's first byte at its start):
    /// into the slot when `to_slot`, else out of it.
    Pack {
        base: u64,
        spans: Arc<[Span]>,
        from: u64,
        to: u64,
        to_slot: bool,
    },
    /// Ask the owner of a staged or packed region to take the slot's
    /// bytes: the rows of `spans` (destination side) lie one after another
    /// from the slot's start.
    Put {
        owner: EngineAddress,
        key: u64,
        spans: Vec<Span>,
        imm: Option<u32>,
    },
    /// Ask the owner of a staged or packed region for the rows of `spans`
    /// (source side), packed into the slot from its start.
    Get {
        owner: EngineAddress,
        key: u64,
        spans: Vec<Span>,
    },
    /// (Asker, host lane) Take a lease on one of `owner`'s slots: an idle
    /// one this engine holds, else a new one (a `Lease` answered by a
    /// `Grant`), else wait for one to come back.
    Acquire {
        owner: EngineAddress,
    },
    /// (Asker, host lane) Write `len` bytes into the chunk's lease: from
    /// `src` at its offset (a contiguous source: no gather), or from the
    /// chunk's slot.
    WriteLeased {
        src: Option<(Arc<MrInner>, u64)>,
        len: u64,
    },
    /// (Asker, host lane) Tell the owner the lease holds the rows of
    /// `spans` (destination side), and wait for its `Done`.
    Commit {
        owner: EngineAddress,
        key: u64,
        spans: Vec<Span>,
        imm: Option<u32>,
    },
    /// (Owner, host lane) Lend the chunk's slot to `to` for its chunk
    /// `cookie`.
    GrantLease {
        to: EngineAddress,
        cookie: u64,
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
    /// A peer's `Done` (or `Grant`), until the deadline.
    Answer(Instant),
    /// (Host lane) A lease to come back from another chunk. No deadline:
    /// the chunks holding the leases have theirs, and each lease that
    /// comes back (or fails) moves the queue on.
    Lease,
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
    /// (Asker) The lease it writes into: the owner, the lease.
    lease: Option<(EngineAddress, u64)>,
    /// (Asker) It sent a `Lease` and awaits the `Grant`.
    acquiring: bool,
    /// (Asker) Its lease is this engine's to reuse or release: nothing is
    /// in flight on it (not written into yet, the write into it landed and
    /// no commit went, or the owner's `Done` left it with this engine).
    /// False while the write runs and from the commit to the `Done`: a
    /// chunk that fails then drops the lease (the owner expires it).
    keep: bool,
    /// (Owner) The lease whose slot it copies out of (`slot` is the
    /// lease's, not the chunk's: it goes back to the lease at the end).
    leased: Option<u64>,
    /// The regions whose memory the steps touch, held until the chunk ends.
    _keep: Vec<Arc<MrInner>>,
}

/// (Asker) A lease on a slot of an owner's packer.
struct Held {
    lease: u64,
    /// Where the slot is in the owner's `pool`, and its length.
    slot: u64,
    len: u64,
    pool: MrDesc,
    /// A chunk uses it.
    busy: bool,
}

/// (Asker) The leases held on one owner's slots.
#[derive(Default)]
struct PeerLeases {
    held: Vec<Held>,
    /// `Lease` requests awaiting their `Grant`.
    asking: usize,
    /// Chunks waiting for a lease to come back.
    waiting: VecDeque<u64>,
}

/// (Owner) A slot lent to a peer.
struct Lent {
    asker: EngineAddress,
    slot: usize,
    /// A committed chunk is being copied out of it.
    busy: bool,
    /// When it was last granted or finished with.
    since: Instant,
}

struct Request {
    guard: Option<PartGuard>,
    left: u32,
    error: Option<Error>,
    /// The chunk carrying the immediate: started once it is the last.
    tail: Option<Chunk>,
}

/// The host packer's counters (`EngineStats::packed`).
#[derive(Default)]
pub(crate) struct PackedCounters {
    pub requests: std::sync::atomic::AtomicU64,
    pub chunks: std::sync::atomic::AtomicU64,
    pub served: std::sync::atomic::AtomicU64,
}

impl PackedCounters {
    pub(crate) fn snapshot(&self) -> crate::stats::PackedStats {
        use std::sync::atomic::Ordering::Relaxed;
        crate::stats::PackedStats {
            requests: self.requests.load(Relaxed),
            chunks: self.chunks.load(Relaxed),
            served: self.served.load(Relaxed),
        }
    }
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
    /// Which stager this is: its messages carry it, and the peer's stager
    /// of the same lane serves them.
    pub lane: Lane,
    pub counters: Arc<PackedCounters>,
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
    /// Spans one `Put` or `Get` carries at most (see [`max_spans`]).
    max_spans: usize,
    /// (Host lane, asker) Leases on peers' slots.
    held: HashMap<EngineAddress, PeerLeases>,
    /// (Host lane, owner) This engine's slots lent to peers.
    lent: HashMap<u64, Lent>,
}

impl Stager {
    pub(crate) fn new(cfg: StagerConfig, copies: Box<dyn CopyEngine>, tx: Sender<Msg>, rx: Receiver<Msg>) -> Self {
        let n = cfg.staging.slots;
        let free = [(0..n).rev().collect(), (n..2 * n).rev().collect()];
        let max_spans = max_spans(cfg.pool.desc.to_bytes().len());
        Stager {
            max_spans,
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
            held: HashMap::new(),
            lent: HashMap::new(),
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
        if self.cfg.lane == Lane::Host {
            // Packed chunks are whole slots: a chunk's cost is mostly fixed
            // (a commit and its answer), and many requests are in flight.
            return self.slot_size();
        }
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
                if let Some(c) = self.chunks.get_mut(&chunk).filter(|c| c.wait == Wait::Transfer) {
                    // A write into a lease that landed leaves nothing in
                    // flight on it: until a commit, it is this engine's.
                    if result.is_ok() && c.lease.is_some() {
                        c.keep = true;
                    }
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
            StagedOp::Write { groups, .. } | StagedOp::Read { groups, .. } => groups.iter().map(Strided::len).sum(),
            StagedOp::Send { len, .. } => *len,
        };
        // Chunks of a slot, but small enough that a request of a few slots
        // still spreads over all of them (copies overlap the network).
        let size = self.chunk_size(bytes);
        let mut chunks = Vec::new();
        let mut tail_imm = None;
        match op {
            StagedOp::Write { src, dst, groups, imm } => {
                tail_imm = imm;
                for (pieces, last) in pack(&groups, size, self.max_spans) {
                    let imm = if last { imm } else { None };
                    let total: u64 = pieces.iter().map(Strided::len).sum();
                    if self.cfg.lane == Lane::Host && total > 0 {
                        let src = src.clone().expect("packed writes have a source");
                        chunks.push(self.leased_chunk(id, src, &dst, &pieces, total, imm));
                        continue;
                    }
                    // The device stager hands chunks for staged regions to
                    // their owner, and writes the others itself.
                    let to_owner = dst.is_staged();
                    let mut steps = VecDeque::new();
                    let mut keep = Vec::new();
                    if let Some(src) = &src {
                        let spans: Arc<[Span]> = pieces.iter().map(Span::source).collect();
                        copy_steps(&mut steps, src, &spans, 0, total, true);
                        keep.push(src.clone());
                    }
                    if to_owner {
                        let spans = pieces.iter().map(Span::destination).collect();
                        steps.push_back(Step::Put { owner: dst.owner().clone(), key: dst.key(0), spans, imm });
                    } else if pieces.is_empty() {
                        // No bytes (an immediate alone): a zero-length write.
                        steps.push_back(Step::Write { dst: dst.clone(), offset: 0, at: 0, len: 0, imm });
                    } else {
                        // One write per contiguous destination run.
                        let spans: Vec<Span> = pieces.iter().map(Span::destination).collect();
                        let mut runs = Vec::new();
                        for_each_piece(&spans, 0, total, |offset, at, len| runs.push((offset, at, len)));
                        let n = runs.len();
                        for (i, (offset, at, len)) in runs.into_iter().enumerate() {
                            let imm = if i + 1 == n { imm } else { None };
                            steps.push_back(Step::Write { dst: dst.clone(), offset, at, len, imm });
                        }
                    }
                    chunks.push(self.chunk(Role::Asker, id, total > 0, steps, keep));
                }
            }
            StagedOp::Read { dst, src, groups } => {
                let to_owner = src.is_staged() || self.cfg.lane == Lane::Host;
                for (pieces, _) in pack(&groups, size, self.max_spans) {
                    let mut steps = VecDeque::new();
                    let total: u64 = pieces.iter().map(Strided::len).sum();
                    if to_owner {
                        let owner = src.owner().clone();
                        let spans = pieces.iter().map(Span::source).collect();
                        steps.push_back(Step::Get { owner, key: src.key(0), spans });
                    } else {
                        let spans: Vec<Span> = pieces.iter().map(Span::source).collect();
                        for_each_piece(&spans, 0, total, |offset, at, len| {
                            steps.push_back(Step::Read { src: src.clone(), offset, at, len })
                        });
                    }
                    let spans: Arc<[Span]> = pieces.iter().map(Span::destination).collect();
                    copy_steps(&mut steps, &dst, &spans, 0, total, false);
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

    /// A packed write's chunk: gathered into a slot unless its source is
    /// one contiguous range, written into a lease on the owner's slots,
    /// committed.
    fn leased_chunk(
        &self,
        request: u64,
        src: Arc<MrInner>,
        dst: &MrDesc,
        pieces: &[Strided],
        total: u64,
        imm: Option<u32>,
    ) -> Chunk {
        let mut steps = VecDeque::new();
        let direct = contiguous_source(pieces);
        if direct.is_none() {
            let spans: Arc<[Span]> = pieces.iter().map(Span::source).collect();
            copy_steps(&mut steps, &src, &spans, 0, total, true);
        }
        let owner = dst.owner().clone();
        steps.push_back(Step::Acquire { owner: owner.clone() });
        steps.push_back(Step::WriteLeased { src: direct.map(|at| (src.clone(), at)), len: total });
        let spans = pieces.iter().map(Span::destination).collect();
        steps.push_back(Step::Commit { owner, key: dst.key(0), spans, imm });
        self.chunk(Role::Asker, request, direct.is_none(), steps, vec![src])
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
            lease: None,
            acquiring: false,
            keep: true,
            leased: None,
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
            if let Step::Put { owner, .. } | Step::Get { owner, .. } | Step::Commit { owner, .. } = &step {
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
                Step::Pack { base, spans, from, to, to_slot } => {
                    let slot = slot.expect("copies have a slot");
                    for_each_piece(&spans, from, to, |offset, at, len| {
                        let (host, slot) = ((base + offset) as *mut u8, (slot + at) as *mut u8);
                        let (src, dst) = if to_slot { (host, slot) } else { (slot, host) };
                        // SAFETY: `host` lies in a region the chunk holds
                        // (`_keep`), inside it (checked when the request was
                        // made, or `serve` checked the peer's spans); `slot`
                        // lies in this chunk's slot (a window is at most a
                        // slot). The region is host memory and no transfer
                        // of this engine touches the slot meanwhile.
                        unsafe { std::ptr::copy_nonoverlapping(src, dst, len as usize) };
                    });
                    Ok(Wait::Ready)
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
                Step::Put { owner, key, spans, imm } => {
                    let (lane, pool) = (self.cfg.lane, self.cfg.pool.desc.clone());
                    let wire = Wire::Put { lane, cookie: id, key, imm, slot: slot_offset, spans, pool };
                    self.ask(owner, wire)
                }
                Step::Get { owner, key, spans } => {
                    let (lane, pool) = (self.cfg.lane, self.cfg.pool.desc.clone());
                    let wire = Wire::Get { lane, cookie: id, key, slot: slot_offset, spans, pool };
                    self.ask(owner, wire)
                }
                Step::Acquire { owner } => self.acquire(id, owner),
                Step::WriteLeased { src, len } => {
                    let chunk = self.chunks.get(&id).expect("advancing");
                    let (owner, lease) = chunk.lease.as_ref().expect("acquired before writing");
                    let held = self.held.get(owner).and_then(|p| p.held.iter().find(|h| h.lease == *lease));
                    let held = held.expect("a chunk's lease is held");
                    if len > held.len {
                        let e = format!("a packed chunk of {len} bytes does not fit the owner's lease of {}", held.len);
                        Err(Error::InvalidRequest(e))
                    } else {
                        let (dst, at) = (held.pool.clone(), held.slot);
                        let (local, from) = match src {
                            Some((region, offset)) => (region, offset),
                            None => (self.cfg.pool.clone(), slot_offset),
                        };
                        let plan = self.plan(from, at, len, dst.owner().nic_count());
                        let op = RequestOp::Write { src: Some(local), dst, plan, imm: None };
                        // From here until the owner's `Done`, the lease's
                        // state is the owner's to say.
                        self.chunks.get_mut(&id).expect("advancing").keep = false;
                        self.engine_request(id, op).map(|()| Wait::Transfer)
                    }
                }
                Step::Commit { owner, key, spans, imm } => {
                    let chunk = self.chunks.get_mut(&id).expect("advancing");
                    let lease = chunk.lease.as_ref().map(|l| l.1).expect("acquired");
                    // Until the owner's `Done`, the lease is the owner's.
                    chunk.keep = false;
                    self.cfg.counters.chunks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (lane, from) = (self.cfg.lane, self.cfg.address.clone());
                    self.ask(owner, Wire::Commit { lane, cookie: id, lease, key, imm, spans, from })
                }
                Step::GrantLease { to, cookie } => {
                    let chunk = self.chunks.get_mut(&id).expect("advancing");
                    let slot = chunk.slot.take().expect("a grant has its slot");
                    let lease = id;
                    self.lent.insert(lease, Lent { asker: to.clone(), slot, busy: false, since: Instant::now() });
                    let (lane, pool, len) = (self.cfg.lane, self.cfg.pool.desc.clone(), self.slot_size());
                    let grant = Wire::Grant { lane, cookie, lease, slot: slot_offset, len, pool };
                    self.tell(to, grant).map(|()| Wait::Ready)
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

    /// (Asker) Step `Acquire` of chunk `id`: an idle lease on `owner`'s
    /// slots, else a `Lease` request (up to [`MAX_LEASES`] per owner), else
    /// a wait for a lease to come back.
    fn acquire(&mut self, id: u64, owner: EngineAddress) -> Result<Wait> {
        let peer = self.held.entry(owner.clone()).or_default();
        if let Some(h) = peer.held.iter_mut().find(|h| !h.busy) {
            h.busy = true;
            let lease = h.lease;
            if let Some(c) = self.chunks.get_mut(&id) {
                c.lease = Some((owner, lease));
            }
            return Ok(Wait::Ready);
        }
        if peer.held.len() + peer.asking >= MAX_LEASES {
            peer.waiting.push_back(id);
            return Ok(Wait::Lease);
        }
        peer.asking += 1;
        if let Some(c) = self.chunks.get_mut(&id) {
            c.acquiring = true;
            c.asked = Some(owner.clone());
        }
        let (lane, from) = (self.cfg.lane, self.cfg.address.clone());
        self.ask(owner, Wire::Lease { lane, cookie: id, from })
    }

    /// (Asker) A chunk has finished with `lease` on `owner`'s slots
    /// (`keep`: the owner left it with this engine): the next chunk
    /// waiting for one takes it, or it goes back.
    fn lease_done(&mut self, owner: &EngineAddress, lease: u64, keep: bool) {
        if !self.held.get(owner).is_some_and(|p| p.held.iter().any(|h| h.lease == lease)) {
            return;
        }
        if keep {
            if let Some(next) = self.next_waiter(owner) {
                let c = self.chunks.get_mut(&next).expect("a live waiter");
                c.lease = Some((owner.clone(), lease));
                c.wait = Wait::Ready;
                return self.advance(next);
            }
        }
        let Some(peer) = self.held.get_mut(owner) else { return };
        let Some(at) = peer.held.iter().position(|h| h.lease == lease) else { return };
        peer.held.swap_remove(at);
        if keep {
            let (lane, from) = (self.cfg.lane, self.cfg.address.clone());
            let _ = self.tell(owner.clone(), Wire::Release { lane, lease, from });
        }
        // A lease fewer: a waiting chunk may ask for one of its own.
        self.retry_acquire(owner);
    }

    /// (Asker) Lets the first chunk waiting for a lease on `owner`'s slots
    /// ask for a new one, if the owner's leases allow.
    fn retry_acquire(&mut self, owner: &EngineAddress) {
        loop {
            let room = self.held.get(owner).is_some_and(|p| p.held.len() + p.asking < MAX_LEASES);
            let Some(next) = room.then(|| self.next_waiter(owner)).flatten() else { return };
            let c = self.chunks.get_mut(&next).expect("a live waiter");
            c.steps.push_front(Step::Acquire { owner: owner.clone() });
            c.wait = Wait::Ready;
            self.advance(next);
        }
    }

    /// (Asker) The first chunk waiting for a lease on `owner`'s slots whose
    /// request is still alive. Waiters of failed requests met on the way
    /// end (they hold nothing), and ids of chunks gone are dropped.
    fn next_waiter(&mut self, owner: &EngineAddress) -> Option<u64> {
        loop {
            let next = self.held.get_mut(owner)?.waiting.pop_front()?;
            let Some(c) = self.chunks.get(&next).filter(|c| c.wait == Wait::Lease) else { continue };
            if self.requests.get(&c.request).is_some_and(|r| r.error.is_none()) {
                return Some(next);
            }
            self.end_chunk(next, Ok(()));
        }
    }

    /// Sends `wire` to `to`, expecting no answer.
    fn tell(&mut self, to: EngineAddress, wire: Wire) -> Result<()> {
        let bytes = wire.encode();
        if bytes.len() > CONTROL_SLOT_SIZE {
            return Err(Error::InvalidRequest(format!(
                "a staging message of {} bytes does not fit a control buffer ({CONTROL_SLOT_SIZE} bytes)",
                bytes.len(),
            )));
        }
        self.cfg.link.send(Command::SendControl { to, bytes })
    }

    /// Sends `wire` to `owner` (the peer of a chunk) and waits, at most
    /// the timeout, for its answer.
    fn ask(&mut self, owner: EngineAddress, wire: Wire) -> Result<Wait> {
        self.tell(owner, wire)?;
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
        // Slots lent to a peer that has used them for nothing for a
        // timeout (a dead asker, or one that lost track): kept out of use
        // for two more, as any slot a peer may still write into.
        let timeout = self.timeout();
        let stale: Vec<u64> = self
            .lent
            .iter()
            .filter(|(_, l)| !l.busy && now.duration_since(l.since) > timeout)
            .map(|(&k, _)| k)
            .collect();
        for lease in stale {
            let l = self.lent.remove(&lease).expect("listed");
            self.quarantined.push((l.slot, now + 2 * timeout));
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
        let Some(mut chunk) = self.chunks.remove(&id) else { return };
        // A lease's slot goes back to the lease, not to the pool.
        let leased = chunk.leased.map(|lease| (lease, chunk.slot.take()));
        // No peer touches a host packer's own slot (owners are written
        // into, and read nothing): only this engine's transfer from it
        // can still be running, when it failed during one.
        let touched = self.cfg.lane == Lane::Device || chunk.wait == Wait::Transfer;
        if let Some(slot) = chunk.slot {
            if result.is_err() && touched {
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
                let keep = match leased {
                    Some((lease, _)) => {
                        if result.is_ok() {
                            self.cfg.counters.served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        self.lease_back(lease, result.is_ok())
                    }
                    None => false,
                };
                if let Some((to, cookie)) = chunk.reply {
                    self.answer(to, cookie, status, keep);
                }
            }
            Role::Asker => {
                if chunk.acquiring && chunk.lease.is_none() {
                    // Its `Lease` is unanswered (a late grant is released):
                    // one request fewer, so a waiting chunk may ask.
                    if let Some(owner) = &chunk.asked {
                        if let Some(peer) = self.held.get_mut(owner) {
                            peer.asking -= 1;
                        }
                        self.retry_acquire(owner);
                    }
                }
                if let Some((owner, lease)) = &chunk.lease {
                    self.lease_done(owner, *lease, chunk.keep);
                }
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
                        // And those waiting for a lease (they hold no slot).
                        for peer in self.held.values_mut() {
                            peer.waiting.retain(|q| {
                                let drop = chunks.get(q).is_some_and(|c| c.request == request && c.wait == Wait::Lease);
                                if drop {
                                    chunks.remove(q);
                                    r.left -= 1;
                                }
                                !drop
                            });
                        }
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

    fn answer(&mut self, to: EngineAddress, cookie: u64, status: u8, keep: bool) {
        let wire = Wire::Done { lane: self.cfg.lane, cookie, status, keep, from: self.cfg.address.clone() };
        let _ = self.cfg.link.send(Command::SendControl { to, bytes: wire.encode() });
    }

    /// (Owner) A committed chunk is done with `lease`: copied out or
    /// refused (`ok`), or failed. The lease stays lent (true) unless it
    /// failed or other peers' requests wait for a slot, when the slot
    /// comes back (or, after a failure, is kept out of use for two
    /// timeouts).
    fn lease_back(&mut self, lease: u64, ok: bool) -> bool {
        let Some(l) = self.lent.get_mut(&lease) else { return false };
        l.busy = false;
        l.since = Instant::now();
        if ok && self.queued[Role::Server as usize].is_empty() {
            return true;
        }
        let l = self.lent.remove(&lease).expect("present");
        if ok {
            self.release(l.slot);
        } else {
            self.quarantined.push((l.slot, Instant::now() + 2 * self.timeout()));
        }
        false
    }

    fn on_wire(&mut self, wire: Wire) {
        match wire {
            Wire::Done { lane: _, cookie, status, keep, from } => {
                let asked = |c: &&mut Chunk| matches!(c.wait, Wait::Answer(_)) && c.asked.as_ref() == Some(&from);
                let Some(chunk) = self.chunks.get_mut(&cookie).filter(asked) else {
                    // Late (the chunk ended), or not from the owner asked.
                    return;
                };
                chunk.keep = keep;
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
            Wire::Lease { lane: _, cookie, from } => {
                // A slot to lend, when one is free: the grant is the chunk's
                // only step (its slot becomes the lease's).
                let steps = VecDeque::from([Step::GrantLease { to: from, cookie }]);
                let chunk = self.chunk(Role::Server, 0, true, steps, Vec::new());
                self.start(chunk);
            }
            Wire::Grant { lane: _, cookie, lease, slot, len, pool } => {
                let owner = pool.owner().clone();
                let waiting = |c: &&mut Chunk| {
                    c.acquiring && matches!(c.wait, Wait::Answer(_)) && c.asked.as_ref() == Some(&owner)
                };
                let Some(chunk) = self.chunks.get_mut(&cookie).filter(waiting) else {
                    // Its chunk gave up waiting: the lease goes straight back.
                    let (lane, from) = (self.cfg.lane, self.cfg.address.clone());
                    let _ = self.tell(owner, Wire::Release { lane, lease, from });
                    return;
                };
                chunk.acquiring = false;
                chunk.lease = Some((owner.clone(), lease));
                let peer = self.held.entry(owner).or_default();
                peer.asking -= 1;
                peer.held.push(Held { lease, slot, len, pool, busy: true });
                self.step_done(cookie, Ok(()));
            }
            Wire::Commit { lane: _, cookie, lease, key, imm, spans, from } => {
                let total: u64 = spans.iter().map(Span::len).sum();
                let slot_size = self.slot_size();
                let lent = self.lent.get(&lease).filter(|l| l.asker == from && !l.busy).map(|l| l.slot);
                let Some(slot) = lent else {
                    // Not a lease of this asker's (expired, or forged): its
                    // bytes went to a slot that is out of use.
                    return self.answer(from, cookie, REFUSED, false);
                };
                let served =
                    self.serve(key, &spans, true).and_then(|r| if total <= slot_size { Ok(r) } else { Err(REFUSED) });
                let region = match served {
                    Ok(r) => r,
                    Err(status) => {
                        // Refused: the slot is as good as before (the asker's
                        // write into it had completed), so the lease stands.
                        let keep = self.lease_back(lease, true);
                        return self.answer(from, cookie, status, keep);
                    }
                };
                let spans: Arc<[Span]> = spans.into();
                let mut steps = VecDeque::new();
                copy_steps(&mut steps, &region, &spans, 0, total, false);
                if let Some(v) = imm {
                    steps.push_back(Step::Imm(v));
                }
                self.lent.get_mut(&lease).expect("checked").busy = true;
                let mut chunk = self.chunk(Role::Server, 0, false, steps, vec![region]);
                chunk.slot = Some(slot);
                chunk.leased = Some(lease);
                chunk.reply = Some((from, cookie));
                self.start(chunk);
            }
            Wire::Release { lane: _, lease, from } => {
                if self.lent.get(&lease).is_some_and(|l| l.asker == from && !l.busy) {
                    let l = self.lent.remove(&lease).expect("present");
                    self.release(l.slot);
                }
            }
            Wire::Put { lane: _, cookie, key, imm, slot, spans, pool } => {
                let owner = pool.owner().clone();
                let region = match self.serve(key, &spans, true) {
                    Ok(r) => r,
                    Err(status) => return self.answer(owner, cookie, status, false),
                };
                let size = self.slot_size();
                let total: u64 = spans.iter().map(Span::len).sum();
                let spans: Arc<[Span]> = spans.into();
                let mut steps = VecDeque::new();
                // Windows of one of this engine's slots over the asker's
                // packed rows (whose slots may be larger than ours).
                for window in (0..total).step_by(size as usize) {
                    let end = total.min(window + size);
                    steps.push_back(Step::Read { src: pool.clone(), offset: slot + window, at: 0, len: end - window });
                    copy_steps(&mut steps, &region, &spans, window, end, false);
                }
                if let Some(v) = imm {
                    steps.push_back(Step::Imm(v));
                }
                let mut chunk = self.chunk(Role::Server, 0, total > 0, steps, vec![region]);
                chunk.reply = Some((owner, cookie));
                self.start(chunk);
            }
            Wire::Get { lane: _, cookie, key, slot, spans, pool } => {
                let owner = pool.owner().clone();
                let region = match self.serve(key, &spans, false) {
                    Ok(r) => r,
                    Err(status) => return self.answer(owner, cookie, status, false),
                };
                let size = self.slot_size();
                let total: u64 = spans.iter().map(Span::len).sum();
                let spans: Arc<[Span]> = spans.into();
                let mut steps = VecDeque::new();
                // Windows of one of this engine's slots over the packed rows,
                // as for a Put, the other way round.
                for window in (0..total).step_by(size as usize) {
                    let end = total.min(window + size);
                    copy_steps(&mut steps, &region, &spans, window, end, true);
                    let (offset, len) = (slot + window, end - window);
                    steps.push_back(Step::Write { dst: pool.clone(), offset, at: 0, len, imm: None });
                }
                let mut chunk = self.chunk(Role::Server, 0, total > 0, steps, vec![region]);
                chunk.reply = Some((owner, cookie));
                self.start(chunk);
            }
        }
    }

    /// The region a peer's request names, if it exists, allows it, and
    /// holds every span.
    fn serve(&self, key: u64, spans: &[Span], write: bool) -> std::result::Result<Arc<MrInner>, u8> {
        let region = self.regions.get(&key).and_then(Weak::upgrade).ok_or(NO_REGION)?;
        let access = region.desc.access();
        let allowed = if write { access.remote_write } else { access.remote_read };
        if !allowed || spans.iter().any(|s| s.end().is_none_or(|end| end > region.len)) {
            return Err(REFUSED);
        }
        Ok(region)
    }
}

/// The steps that copy the window `[from, to)` of the packed rows of
/// `spans` (offsets in `region`) into the slot (`to_slot`) or out of it:
/// one inline pass for host memory, one copy-engine copy per run for
/// device memory.
fn copy_steps(steps: &mut VecDeque<Step>, region: &MrInner, spans: &Arc<[Span]>, from: u64, to: u64, to_slot: bool) {
    let base = region.ptr as u64;
    if region.device.is_none() {
        if from < to {
            steps.push_back(Step::Pack { base, spans: spans.clone(), from, to, to_slot });
        }
        return;
    }
    for_each_piece(spans, from, to, |offset, at, len| {
        steps.push_back(if to_slot {
            Step::ToSlot { from: base + offset, at, len }
        } else {
            Step::FromSlot { to: base + offset, at, len, device: true }
        })
    });
}

/// The offset of the chunk's source, when its rows lie back to back in
/// one contiguous range of the source region (then it is written from
/// there, with no gather).
fn contiguous_source(pieces: &[Strided]) -> Option<u64> {
    let first = pieces.first()?.src_offset;
    let mut next = first;
    for g in pieces {
        if g.src_offset != next || (g.rows > 1 && g.src_stride != g.row_len) {
            return None;
        }
        next += g.len();
    }
    Some(first)
}

/// Packs `groups` into chunks of at most `size` bytes and `max` groups,
/// each chunk with whether it is the last. A group is split between rows
/// where a chunk fills up; a row that does not fit what is left of a chunk
/// starts the next one, unless it is longer than a chunk, when it is cut
/// into pieces that fill chunks. Only no bytes at all (an immediate alone)
/// make one empty chunk.
fn pack(groups: &[Strided], size: u64, max: usize) -> Vec<(Vec<Strided>, bool)> {
    let mut chunks: Vec<Vec<Strided>> = Vec::new();
    let mut current: Vec<Strided> = Vec::new();
    let mut used = 0;
    for g in groups.iter().filter(|g| !g.is_empty()) {
        let (mut row, mut within) = (0, 0);
        while row < g.rows {
            if used == size || current.len() == max || (within == 0 && used > 0 && g.row_len > size - used) {
                chunks.push(std::mem::take(&mut current));
                used = 0;
            }
            let (src, dst) = (g.src_offset + row * g.src_stride, g.dst_offset + row * g.dst_stride);
            if within == 0 && g.row_len <= size - used {
                let rows = (g.rows - row).min((size - used) / g.row_len);
                current.push(Strided { src_offset: src, dst_offset: dst, rows, ..*g });
                used += rows * g.row_len;
                row += rows;
            } else {
                // A row longer than a chunk, in pieces.
                let n = (g.row_len - within).min(size - used);
                current.push(Strided::contiguous(src + within, dst + within, n));
                used += n;
                within += n;
                if within == g.row_len {
                    (row, within) = (row + 1, 0);
                }
            }
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

    fn run(src: u64, dst: u64, len: u64) -> Strided {
        Strided::contiguous(src, dst, len)
    }

    #[test]
    fn groups_pack_into_chunks() {
        // An immediate alone: one empty chunk.
        assert_eq!(pack(&[], 100, 8), vec![(vec![], true)]);
        // A run longer than a chunk is cut to fill chunks.
        let c = pack(&[run(0, 1000, 250)], 100, 8);
        let pieces: Vec<Vec<Strided>> = c.iter().map(|x| x.0.clone()).collect();
        assert_eq!(pieces, vec![vec![run(0, 1000, 100)], vec![run(100, 1100, 100)], vec![run(200, 1200, 50)]]);
        // Small runs share a chunk; one that does not fit what is left
        // starts the next.
        let c = pack(&[run(0, 0, 40), run(500, 900, 40), run(1000, 2000, 40)], 100, 8);
        assert_eq!(c[0].0, vec![run(0, 0, 40), run(500, 900, 40)]);
        assert_eq!(c[1], (vec![run(1000, 2000, 40)], true));
        // At most `max` groups per chunk.
        let many: Vec<_> = (0..9u64).map(|i| run(i * 10, i * 10, 1)).collect();
        let c = pack(&many, 1 << 20, 8);
        assert_eq!((c.len(), c[0].0.len(), c[1].0.len()), (2, 8, 1));
        // A strided group splits between rows.
        let g = Strided { src_offset: 0, dst_offset: 5, rows: 10, row_len: 30, src_stride: 30, dst_stride: 100 };
        let c = pack(&[g], 100, 8);
        assert_eq!(c.len(), 4);
        assert_eq!(c[0].0, vec![Strided { rows: 3, ..g }]);
        assert_eq!(c[1].0, vec![Strided { src_offset: 90, dst_offset: 305, rows: 3, ..g }]);
        assert_eq!(c[3], (vec![Strided { src_offset: 270, dst_offset: 905, rows: 1, ..g }], true));
    }

    proptest::proptest! {
        /// Packing keeps every byte of every row, once, in order, within
        /// the chunk limits.
        #[test]
        fn packing_keeps_every_byte(
            groups in proptest::collection::vec((0u64..4, 1u64..40, 1u64..6, 0u64..20), 0..8),
            size in 1u64..120, max in 1usize..5,
        ) {
            let mut at = 0;
            let groups: Vec<Strided> = groups.into_iter().map(|(gap, row_len, rows, pad)| {
                let g = Strided { src_offset: at + gap, dst_offset: 7 * at + gap, rows, row_len,
                                  src_stride: row_len + pad, dst_stride: row_len + 2 * pad };
                at += gap + rows * (row_len + 2 * pad) + 1;
                g
            }).collect();
            let bytes = |gs: &[Strided]| {
                let mut v = Vec::new();
                for g in gs {
                    for r in 0..g.rows {
                        for b in 0..g.row_len {
                            v.push((g.src_offset + r * g.src_stride + b, g.dst_offset + r * g.dst_stride + b));
                        }
                    }
                }
                v
            };
            let chunks = pack(&groups, size, max);
            let mut all = Vec::new();
            for (i, (c, last)) in chunks.iter().enumerate() {
                proptest::prop_assert_eq!(*last, i + 1 == chunks.len());
                proptest::prop_assert!(c.len() <= max);
                proptest::prop_assert!(c.iter().map(Strided::len).sum::<u64>() <= size);
                all.extend(bytes(c));
            }
            proptest::prop_assert_eq!(all, bytes(&groups));
        }
    }

    #[test]
    fn pieces_walk_a_window_of_the_packed_rows() {
        let spans = [
            Span { offset: 100, row_len: 4, rows: 3, stride: 10 },
            Span { offset: 1000, row_len: 5, rows: 1, stride: 5 },
        ];
        let mut got = Vec::new();
        for_each_piece(&spans, 0, 17, |o, a, l| got.push((o, a, l)));
        assert_eq!(got, vec![(100, 0, 4), (110, 4, 4), (120, 8, 4), (1000, 12, 5)]);
        got.clear();
        for_each_piece(&spans, 6, 14, |o, a, l| got.push((o, a, l)));
        assert_eq!(got, vec![(112, 0, 2), (120, 2, 4), (1000, 6, 2)]);
    }

    fn address() -> EngineAddress {
        EngineAddress::new(ProviderKind::Tcp, vec![vec![1, 2, 3, 4].into_boxed_slice()])
    }

    #[test]
    fn messages_round_trip() {
        let pool = MrDesc::new(address(), 0, 1 << 20, crate::Access::REMOTE_READ_WRITE, vec![9]);
        let span = |offset, row_len, rows, stride| Span { offset, row_len, rows, stride };
        let (d, h) = (Lane::Device, Lane::Host);
        let messages = [
            Wire::Put {
                lane: d,
                cookie: 1,
                key: 2,
                imm: Some(5),
                slot: 6,
                spans: vec![span(3, 4, 1, 4)],
                pool: pool.clone(),
            },
            Wire::Put { lane: h, cookie: 1, key: 2, imm: Some(5), slot: 6, spans: vec![], pool: pool.clone() },
            Wire::Put {
                lane: h,
                cookie: 1,
                key: 2,
                imm: None,
                slot: 6,
                spans: vec![span(3, 4, 1, 4), span(100, 7, 16, 2048)],
                pool: pool.clone(),
            },
            Wire::Get {
                lane: h,
                cookie: 7,
                key: 8,
                slot: 11,
                spans: vec![span(9, 10, 1, 10), span(40, 2, 3, 9)],
                pool: pool.clone(),
            },
            Wire::Done { lane: d, cookie: 12, status: REFUSED, keep: false, from: address() },
            Wire::Done { lane: h, cookie: 12, status: OK, keep: true, from: address() },
            Wire::Lease { lane: h, cookie: 13, from: address() },
            Wire::Grant { lane: h, cookie: 13, lease: 14, slot: 2 << 20, len: 2 << 20, pool },
            Wire::Commit {
                lane: h,
                cookie: 15,
                lease: 14,
                key: 2,
                imm: Some(7),
                spans: vec![span(100, 1024, 16, 2048)],
                from: address(),
            },
            Wire::Commit { lane: h, cookie: 15, lease: 14, key: 2, imm: None, spans: vec![], from: address() },
            Wire::Release { lane: h, lease: 14, from: address() },
        ];
        for m in messages {
            let bytes = m.encode();
            let lane = match &m {
                Wire::Put { lane, .. }
                | Wire::Get { lane, .. }
                | Wire::Done { lane, .. }
                | Wire::Lease { lane, .. }
                | Wire::Grant { lane, .. }
                | Wire::Commit { lane, .. }
                | Wire::Release { lane, .. } => *lane,
            };
            assert_eq!(Lane::from_byte(bytes[LANE_AT]), Some(lane));
            assert_eq!(Wire::decode(&bytes).unwrap(), m);
        }
    }

    #[test]
    fn malformed_messages_are_refused() {
        let done = Wire::Done { lane: Lane::Host, cookie: 12, status: OK, keep: true, from: address() }.encode();
        for cut in 0..done.len() {
            assert!(Wire::decode(&done[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = done.clone();
        bad[14] = 9; // the status
        assert!(Wire::decode(&bad).is_err());
        let mut bad = done.clone();
        bad[15] = 2; // keep
        assert!(Wire::decode(&bad).is_err());
        let mut bad = done.clone();
        bad[LANE_AT] = 2;
        assert!(Wire::decode(&bad).is_err());
        let mut bad = done.clone();
        bad[LANE_AT + 1] = 99; // kind
        assert!(Wire::decode(&bad).is_err());
        // Grants of nothing, or past the largest chunk.
        let pool = MrDesc::new(address(), 0, 1 << 20, crate::Access::REMOTE_READ_WRITE, vec![9]);
        for (slot, len) in [(0, 0), (0, MAX_CHUNK + 1), (u64::MAX, 2)] {
            let grant = Wire::Grant { lane: Lane::Host, cookie: 1, lease: 2, slot, len, pool: pool.clone() };
            assert!(Wire::decode(&grant.encode()).is_err(), "a grant of {len} at {slot}");
        }
        let mut trailing = done;
        trailing.push(0);
        assert!(Wire::decode(&trailing).is_err());
        // Spans without bytes, overflowing, or past the chunk limit.
        for span in [
            Span { offset: 0, row_len: 0, rows: 1, stride: 0 },
            Span { offset: 0, row_len: 1, rows: 0, stride: 0 },
            Span { offset: u64::MAX, row_len: 2, rows: 1, stride: 2 },
            Span { offset: 0, row_len: 1, rows: 3, stride: u64::MAX },
            Span { offset: 0, row_len: MAX_CHUNK, rows: 2, stride: MAX_CHUNK },
        ] {
            let put = Wire::Put {
                lane: Lane::Host,
                cookie: 1,
                key: 2,
                imm: None,
                slot: 0,
                spans: vec![span],
                pool: pool.clone(),
            };
            assert!(Wire::decode(&put.encode()).is_err(), "{span:?}");
        }
        let get = Wire::Get { lane: Lane::Host, cookie: 1, key: 2, slot: 0, spans: vec![], pool };
        assert!(Wire::decode(&get.encode()).is_err(), "a get of nothing");
    }

    #[test]
    fn a_full_put_fits_a_control_buffer() {
        // 16 NICs with 64-byte addresses: the largest pool descriptor.
        let nics = vec![vec![7u8; crate::MAX_NIC_ADDRESS_LEN].into_boxed_slice(); crate::MAX_NICS];
        let owner = EngineAddress::new(ProviderKind::Tcp, nics);
        let pool = MrDesc::new(owner, 0, 1 << 20, crate::Access::REMOTE_READ_WRITE, vec![9; crate::MAX_NICS]);
        let n = max_spans(pool.to_bytes().len());
        assert!(n >= 16, "{n} spans");
        let spans = vec![Span { offset: 1, row_len: 2, rows: 3, stride: 4 }; n];
        let put = Wire::Put { lane: Lane::Host, cookie: 1, key: 2, imm: Some(3), slot: 0, spans, pool };
        assert!(put.encode().len() <= CONTROL_SLOT_SIZE);
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
