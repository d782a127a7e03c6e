//! The worker thread: owns a group's NICs, posts work items, reads
//! completions, and turns every outcome into exactly one completion.
//!
//! The thread is a thin loop around [`Worker::step`]. A transport error never
//! panics the loop: it becomes the outcome of the request it belongs to.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::access::{self, Answer, Control, Grant, Query, Wanted, CONTROL_IMM};
use super::completion::PartGuard;
use super::imm::ImmTable;
use super::link::Link;
use super::memory::{AlignedBuf, MrInner, Owner};
use super::stats::{error_kind, EngineStats, ErrorCounts, Latency, NicStats, OpCounts, PeerStats};
use crate::address::EngineAddress;
use crate::backend::{Event, Nic, NicRegion, Op, OpKind, Posted};
use crate::descriptor::{Access, MrDesc};
use crate::error::{Error, Result};
use crate::plan::{PagedPlan, Piece, Rows, Sequencer, ShardPlan, StridedPlan};

/// Statements that only keep the stats' counters. Building with
/// `RUSTFLAGS="--cfg strait_no_stats"` leaves them out: that build exists
/// only to measure what counting costs (the criterion submit bench, A/B),
/// and its `stats()` reports zeros.
macro_rules! counting {
    ($($body:tt)*) => {
        #[cfg(not(strait_no_stats))]
        {
            $($body)*
        }
    };
}

/// How the worker waits for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    /// Never sleeps: lowest latency, one core per engine. For production
    /// with pinned workers.
    Busy,
    /// Spins for `spin` after the last piece of work, then sleeps on the
    /// completion queues' wait descriptors (or, for providers without one,
    /// in naps of 20 µs doubling to 200 µs) until a completion or a new
    /// request arrives; once asleep it does not spin again until there is
    /// work. Keeps several engines on a small machine fast; the default.
    Adaptive {
        /// How long to keep spinning when idle before sleeping.
        spin: Duration,
    },
}

impl Default for PollMode {
    fn default() -> Self {
        PollMode::Adaptive { spin: Duration::from_micros(50) }
    }
}

/// A user callback for two-sided messages.
pub(crate) type MessageCallback = Box<dyn Fn(&[u8]) + Send + Sync>;

/// Where two-sided messages go.
pub(crate) enum MessageSink {
    Queue(super::mailbox::Poster<Vec<u8>>),
    Callback(MessageCallback),
}

/// Registered per-NIC handles for one region, as the worker returns them.
pub(crate) struct Registration {
    pub id: u64,
    pub regions: Vec<NicRegion>,
}

// SAFETY: NicRegion holds provider handles that are only dereferenced by the
// provider on the worker thread; carrying them through a channel is inert.
unsafe impl Send for Registration {}
// SAFETY: as above.
unsafe impl Send for NicRegion {}

pub(crate) enum Command {
    Submit(Submission),
    /// Several submissions in one message (`TransferEngine::batch`).
    SubmitBatch(Vec<Submission>),
    Register {
        ptr: usize,
        len: u64,
        access: Access,
        /// Device memory the NICs reach (GPUDirect): its GPU and dma-buf
        /// (fd, offset), see `Nic::register_device`.
        device: Option<(u32, Option<(i32, u64)>)>,
        reply: Sender<Result<Registration>>,
    },
    Deregister {
        id: u64,
        memory: Option<Owner>,
        done: Option<Sender<()>>,
    },
    /// A snapshot of the counters (`TransferEngine::stats`).
    Stats {
        reply: Sender<EngineStats>,
    },
    /// Sends a control message (the stager's) to `to`, through NIC 0.
    SendControl {
        to: EngineAddress,
        bytes: Vec<u8>,
    },
    /// Delivers an immediate as if a peer's had arrived (a staged write's,
    /// once its bytes are in device memory).
    DeliverImm(u32),
    /// From now on, staged control messages of this lane go to this
    /// stager.
    Staging(super::staging::Lane, Sender<super::staging::Msg>),
    Shutdown,
}

/// One part of a request, ready for the worker.
pub(crate) struct Submission {
    pub op: RequestOp,
    pub guard: PartGuard,
    /// When the caller submitted it: a request's age (its timeout, the
    /// latency histogram, `oldest_in_flight`) counts from here, not from
    /// when a busy worker got round to it.
    pub submitted: Instant,
}

pub(crate) enum RequestOp {
    /// A contiguous write (zero-length with an immediate: immediate only).
    Write { src: Option<Arc<MrInner>>, dst: MrDesc, plan: ShardPlan, imm: Option<u32> },
    /// A paged write.
    Paged { src: Arc<MrInner>, dst: MrDesc, plan: Box<PagedPlan>, imm: Option<u32> },
    /// A one-sided read: `plan`'s source offsets are in `local`, its
    /// destination offsets in `remote`.
    Read { local: Arc<MrInner>, remote: MrDesc, plan: ShardPlan },
    /// Strided copies, written (`read: false`: `plan`'s source offsets in
    /// `local`, destination offsets in `remote`) or read (`read: true`:
    /// `plan`'s source offsets in `remote`, destination offsets in `local`).
    Strided { local: Arc<MrInner>, remote: MrDesc, plan: Box<StridedPlan>, imm: Option<u32>, read: bool },
    /// A two-sided send.
    Send { peer: EngineAddress, src: Arc<MrInner>, offset: u64, len: u64, rotation: usize },
}

impl RequestOp {
    fn pieces(&self) -> u64 {
        match self {
            RequestOp::Write { plan, .. } | RequestOp::Read { plan, .. } => plan.count(),
            RequestOp::Paged { plan, .. } => plan.count(),
            RequestOp::Strided { plan, .. } => plan.count(),
            RequestOp::Send { .. } => 1,
        }
    }

    fn imm(&self) -> Option<u32> {
        match self {
            RequestOp::Write { imm, .. } | RequestOp::Paged { imm, .. } => *imm,
            RequestOp::Strided { imm, read: false, .. } => *imm,
            _ => None,
        }
    }

    fn peer(&self) -> &EngineAddress {
        match self {
            RequestOp::Write { dst, .. } | RequestOp::Paged { dst, .. } => dst.owner(),
            RequestOp::Read { remote, .. } | RequestOp::Strided { remote, .. } => remote.owner(),
            RequestOp::Send { peer, .. } => peer,
        }
    }

    /// Piece `index`; pieces are asked for in order, once each.
    fn piece(&mut self, index: u64, local_nics: usize, remote_nics: usize) -> Piece {
        match self {
            RequestOp::Write { plan, .. } | RequestOp::Read { plan, .. } => plan.piece(index),
            RequestOp::Paged { plan, .. } => plan.next_piece().expect("sequencer asks for counted pieces only"),
            RequestOp::Strided { plan, read, .. } => {
                let p = plan.next_piece().expect("sequencer asks for counted pieces only");
                // A piece's `src_offset` is always local, `dst_offset` remote.
                if *read {
                    let rows = Rows { src_stride: p.rows.dst_stride, dst_stride: p.rows.src_stride, ..p.rows };
                    Piece { src_offset: p.dst_offset, dst_offset: p.src_offset, rows, ..p }
                } else {
                    p
                }
            }
            RequestOp::Send { offset, len, rotation, .. } => {
                let (local_nic, remote_nic) = crate::plan::nic_pair(0, *rotation, local_nics, remote_nics);
                Piece { local_nic, remote_nic, src_offset: *offset, dst_offset: 0, len: *len, rows: Rows::ONE }
            }
        }
    }
}

struct Active {
    op: RequestOp,
    seq: Sequencer,
    guard: Option<PartGuard>,
    peer: usize,
    error: Option<Error>,
    retry: Option<Piece>,
    queued: bool,
    /// When the caller submitted the request.
    since: Instant,
    /// The request's `tracing` span (target `strait::request`, debug
    /// level), when a subscriber wants it: none otherwise, at the cost of
    /// one check of the callsite's interest per request.
    span: Option<tracing::Span>,
    /// Pieces that carry data; a sequenced piece past these is the
    /// zero-length write carrying the immediate.
    data_pieces: u64,
    /// Waiting for the owner's verdict on its key (see `engine::access`);
    /// the request's outcome waits with it.
    diagnosing: bool,
    /// The verdict came (or its window closed): do not ask again.
    diagnosed: bool,
    /// Bytes and operations posted so far (counted per peer at the end).
    bytes: u64,
    ops: u32,
    imm_posted: bool,
    /// Operations in flight per local NIC.
    in_flight: [u16; crate::wire::MAX_NICS],
    /// Waits for the peer's welcome before posting (see [`Intro`]).
    held: bool,
}

/// One question to a region's owner, and the failed requests waiting on it.
struct Diagnosis {
    peer: usize,
    query: Query,
    requests: Vec<usize>,
    deadline: Instant,
    retry_at: Instant,
    state: QueryState,
    /// Sends that could not be posted or failed.
    failures: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QueryState {
    Unsent,
    /// Posted with this token.
    Sending(u64),
    Delivered,
}

/// An answer (to a key query, or a welcome) that could not be posted yet.
struct PendingAnswer {
    nic: usize,
    to: u64,
    answer: Control,
    deadline: Instant,
    retry_at: Instant,
}

/// Whether a peer can be the target of this engine's writes and reads.
///
/// On transports whose RMA target must already have the initiator in its
/// address vector ([`Nic::needs_introduction`]: EFA's efa-direct, where a
/// write from an unknown initiator fails with an unknown-peer error), an
/// engine introduces itself before anything else goes to a new peer: a
/// hello control message carrying its address (two-sided messages need no
/// such entry at the receiver), which the peer answers, after inserting
/// the address on every NIC, with a welcome. Requests to the peer wait
/// until then (`Active::held`); they expire as usual if no welcome comes.
/// An engine that received a hello knows its sender knows it (the sender
/// inserted it before saying hello), so it needs no hello of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Intro {
    /// The peer knows this engine (or the transport needs no introduction).
    Known,
    /// Not introduced yet: the next request sends a hello.
    Unknown,
    /// A hello (`cookie`) is out or due at `retry_at`; `sending` is the
    /// token of its send in flight.
    Hello { cookie: u64, sending: Option<u64>, retry_at: Instant },
}

/// A hello that was delivered but not answered is sent again after this
/// (the welcome is idempotent); one that could not be posted or failed,
/// after `access::RETRY`.
const HELLO_RESEND: Duration = Duration::from_millis(200);

/// Send buffers for control messages, per NIC, registered on first use.
struct ControlPool {
    memory: AlignedBuf,
    region: NicRegion,
    free: Vec<usize>,
}

const CONTROL_TOKEN: u64 = 1 << 62;
const CONTROL_SLOTS: usize = 16;
pub(crate) const CONTROL_SLOT_SIZE: usize = access::MAX_QUERY.next_power_of_two();

struct Peer {
    /// When an operation to this peer last completed (or the peer was
    /// inserted): requests to it expire after `request_timeout` without one.
    last_progress: Instant,
    /// When an operation to this peer through local NIC `n` last completed
    /// (or the peer was inserted): a request with operations in flight on
    /// a NIC expires when that NIC has made no progress to the peer for
    /// the request timeout, even while its other NICs do (a dead link).
    nic_progress: Vec<Instant>,
    remote_nics: usize,
    /// `fi_addr` of remote NIC `r` in local NIC `l`'s AV at `l * remote_nics + r`.
    addrs: Vec<u64>,
    address: EngineAddress,
    stats: PeerCounters,
    intro: Intro,
    /// Requests held for the welcome (see [`Intro`]).
    held: u32,
}

/// A peer's counters (see `stats::PeerStats`), the worker's alone.
#[derive(Default)]
struct PeerCounters {
    posted: OpCounts,
    bytes_posted: u64,
    imms_out: u64,
    completed: u64,
    errors: ErrorCounts,
    requests_ok: u64,
    requests_failed: u64,
    expired: u64,
    resets: u64,
}

struct RecvPool {
    memory: AlignedBuf,
    region: NicRegion,
    size: usize,
}

const RECV_TOKEN: u64 = 1 << 63;

/// Receive buffers per NIC and their size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecvConfig {
    pub count: usize,
    pub size: usize,
}

/// How the worker runs.
#[derive(Clone, Debug)]
pub(crate) struct WorkerConfig {
    pub poll_mode: PollMode,
    pub recv: RecvConfig,
    /// A request fails once its peer has completed none of this engine's
    /// operations for this long (see `EngineBuilder::request_timeout`).
    pub request_timeout: Option<Duration>,
    /// This engine's address (control messages name it for answers).
    pub address: EngineAddress,
}

pub(crate) struct Worker<N: Nic> {
    nics: Vec<N>,
    commands: Receiver<Command>,
    link: Arc<Link>,
    imm: Arc<ImmTable>,
    messages: MessageSink,
    services: Arc<super::reserved::Services>,
    poll_mode: PollMode,
    request_timeout: Option<Duration>,
    /// The time at the start of the current turn.
    now: Instant,
    /// When to look for expired requests next.
    next_expiry_check: Instant,
    active: Vec<Option<Active>>,
    free: Vec<usize>,
    ready: VecDeque<usize>,
    peers: Vec<Peer>,
    peer_index: HashMap<EngineAddress, usize>,
    /// Per NIC, written by the worker alone (see `stats`).
    nic_stats: Vec<NicStats>,
    latency: Latency,
    /// The last request id given (the `id` of requests' trace spans).
    next_id: u64,
    regions: HashMap<u64, Vec<NicRegion>>,
    next_region: u64,
    /// Whether failed writes and reads ask the owner about their key (the
    /// NICs do not report rejected keys themselves); then `grants` holds
    /// what this engine's remotely accessible regions grant, to answer.
    diagnose: bool,
    /// Whether peers must be introduced before RMA (see [`Intro`]), and
    /// how many introductions are under way.
    introduce: bool,
    introducing: usize,
    grants: HashMap<u64, Grant>,
    address: EngineAddress,
    diagnoses: Vec<Diagnosis>,
    answers: Vec<PendingAnswer>,
    /// The stager, once the engine has one: staged control messages go there.
    /// The stagers, by lane (device, host packer).
    staging: [Option<Sender<super::staging::Msg>>; 2],
    next_cookie: u64,
    control: Vec<Option<ControlPool>>,
    scratch: Vec<u8>,
    pools: Vec<RecvPool>,
    recv: RecvConfig,
    events: Vec<Event>,
    /// The eventfd and the NICs' wait descriptors (see `start`).
    pollfds: Vec<libc::pollfd>,
    /// (local NIC, peer address) pairs whose post was refused as busy in the
    /// current round of `pump`: the rest of the round skips them.
    busy_paths: Vec<(usize, u64)>,
    /// Next nap when the NICs have no wait descriptor.
    nap: Duration,
    stopping: bool,
}

/// Naps without a wait descriptor start here after activity...
const NAP_MIN: Duration = Duration::from_micros(20);
/// ...and double up to this while idle.
const NAP_MAX: Duration = Duration::from_micros(200);

impl<N: Nic> Worker<N> {
    pub(crate) fn new(
        nics: Vec<N>,
        commands: Receiver<Command>,
        link: Arc<Link>,
        imm: Arc<ImmTable>,
        messages: MessageSink,
        services: Arc<super::reserved::Services>,
        config: WorkerConfig,
    ) -> Self {
        let nic_count = nics.len();
        let now = Instant::now();
        let diagnose = !nics.iter().all(|n| n.reports_rejected_keys());
        let introduce = nics.iter().any(|n| n.needs_introduction());
        let control = nics.iter().map(|_| None).collect();
        Worker {
            diagnose,
            introduce,
            introducing: 0,
            grants: HashMap::new(),
            address: config.address,
            diagnoses: Vec::new(),
            answers: Vec::new(),
            staging: [None, None],
            next_cookie: 1,
            control,
            scratch: Vec::new(),
            nics,
            commands,
            link,
            imm,
            messages,
            services,
            poll_mode: config.poll_mode,
            request_timeout: config.request_timeout,
            now,
            next_expiry_check: now,
            active: Vec::new(),
            free: Vec::new(),
            ready: VecDeque::new(),
            peers: Vec::new(),
            peer_index: HashMap::new(),
            nic_stats: vec![NicStats::default(); nic_count],
            latency: Latency::default(),
            next_id: 0,
            regions: HashMap::new(),
            next_region: 1,
            pools: Vec::new(),
            recv: config.recv,
            events: Vec::with_capacity(256),
            pollfds: Vec::new(),
            busy_paths: Vec::new(),
            nap: NAP_MIN,
            stopping: false,
        }
    }

    /// Posts every NIC's receive pool. Runs on the worker before the loop.
    fn post_receive_pools(&mut self) -> Result<()> {
        let RecvConfig { count, size } = self.recv;
        for nic in 0..self.nics.len() {
            let memory = AlignedBuf::zeroed((count * size) as u64)?;
            // SAFETY: the pool memory lives in self.pools until it is
            // deregistered at shutdown.
            let region = unsafe { self.nics[nic].register_receive_pool(memory.as_ptr(), (count * size) as u64)? };
            self.pools.push(RecvPool { memory, region, size });
            for i in 0..count {
                self.post_recv(nic, i)?;
            }
        }
        Ok(())
    }

    fn post_recv(&mut self, nic: usize, index: usize) -> Result<()> {
        let pool = &self.pools[nic];
        // SAFETY: index < count, so the buffer lies inside the pool memory.
        let buf = unsafe { pool.memory.as_ptr().add(index * pool.size) };
        let token = RECV_TOKEN | (nic as u64) << 32 | index as u64;
        // SAFETY: the buffer is registered and stays valid until shutdown.
        match unsafe { self.nics[nic].post_recv(buf, pool.size, pool.region.desc, token)? } {
            Posted::Accepted => {
                self.nic_stats[nic].receives_posted += 1;
                Ok(())
            }
            Posted::Busy => Err(Error::InvalidRequest("receive queue smaller than the receive pool".into())),
        }
    }

    /// Posts the receive pools and returns the descriptors the thread
    /// sleeps on (the eventfd first). Runs once, before the first turn.
    pub(crate) fn start(&mut self) -> Vec<libc::pollfd> {
        if let Err(e) = self.post_receive_pools() {
            tracing::error!(error = %e, "posting receive buffers failed; two-sided receives are unavailable");
        }
        self.pollfds = std::iter::once(self.link.eventfd())
            .chain(self.nics.iter().filter_map(|n| n.wait_fd()))
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        self.pollfds.clone()
    }

    /// The descriptors to sleep on (the eventfd first), for a driving thread.
    pub(crate) fn pollfds(&mut self) -> &mut [libc::pollfd] {
        &mut self.pollfds
    }

    /// The time read at the start of the last turn.
    pub(crate) fn now(&self) -> Instant {
        self.now
    }

    pub(crate) fn poll_mode(&self) -> PollMode {
        self.poll_mode
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping
    }

    /// After a turn that did something: the next nap starts short again.
    pub(crate) fn worked(&mut self) {
        self.nap = NAP_MIN;
    }

    /// One turn: take commands, post what can go, read completions. Returns
    /// whether anything happened.
    pub(crate) fn step(&mut self) -> bool {
        let mut busy = false;
        self.now = Instant::now();
        loop {
            match self.commands.try_recv() {
                Ok(command) => {
                    busy = true;
                    self.handle(command);
                    if self.stopping {
                        return true;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.stopping = true;
                    return true;
                }
            }
        }
        busy |= self.pump();
        for nic in 0..self.nics.len() {
            let before = self.events.len();
            self.nics[nic].poll(&mut self.events);
            // One pass over what the NIC reported: per-NIC progress and
            // in-flight counts (the request timeout's clock; see
            // `Peer::nic_progress`) and the NIC's counters.
            let counters = &mut self.nic_stats[nic];
            for event in &self.events[before..] {
                match event {
                    Event::Done { token } | Event::Failed { token, .. } => {
                        counting! {
                            counters.completed += 1;
                            if let Event::Failed { error, .. } = event {
                                counters.errors.0[error_kind(error)] += 1;
                            }
                        }
                        if token & CONTROL_TOKEN != 0 {
                            continue;
                        }
                        if let Some(a) = self.active.get_mut(*token as usize).and_then(Option::as_mut) {
                            a.in_flight[nic] = a.in_flight[nic].saturating_sub(1);
                            if matches!(event, Event::Done { .. }) {
                                self.peers[a.peer].nic_progress[nic] = self.now;
                            }
                        }
                    }
                    Event::Imm { .. } => {
                        counting! { counters.imms_in += 1; }
                    }
                    Event::Received { message, imm, .. } => {
                        counting! {
                            if *message {
                                counters.messages_in += 1;
                            } else if imm.is_some() {
                                counters.imms_in += 1;
                            }
                        }
                    }
                    Event::ReceiveFailed { error, .. } => {
                        counting! { counters.errors.0[error_kind(error)] += 1; }
                    }
                }
            }
        }
        if !self.events.is_empty() {
            busy = true;
            // Requests completing now are timed (`stats`) at this turn's
            // start: no clock read per batch of completions; what the turn
            // did before polling (taking commands, posting) is at most a
            // few microseconds.
            let mut events = std::mem::take(&mut self.events);
            for event in events.drain(..) {
                self.on_event(event);
            }
            self.events = events;
            busy |= self.pump();
        }
        if self.request_timeout.is_some() && self.now >= self.next_expiry_check {
            busy |= self.expire();
        }
        if !self.diagnoses.is_empty() || !self.answers.is_empty() {
            self.tend_diagnoses();
        }
        if self.introducing > 0 {
            self.tend_introductions();
        }
        busy
    }

    /// Fails every request whose peer has made no progress for the request
    /// timeout. Returns whether any request expired.
    ///
    /// The user gets the outcome now, but operations already posted may
    /// still be in the provider, reading or writing the request's memory:
    /// the request keeps its slot (and so its regions registered and alive)
    /// until they complete, or until the NICs are closed at shutdown.
    fn expire(&mut self) -> bool {
        let Some(timeout) = self.request_timeout else { return false };
        let now = self.now;
        self.next_expiry_check = now + (timeout / 8).clamp(Duration::from_millis(1), Duration::from_millis(100));
        let mut expired = Vec::new();
        let mut stuck: Vec<usize> = Vec::new();
        for (index, slot) in self.active.iter_mut().enumerate() {
            let Some(a) = slot.as_mut() else { continue };
            if a.guard.is_none() || a.diagnosing {
                continue;
            }
            // The stalest NIC this request waits on, else the peer as a whole.
            let peer = &self.peers[a.peer];
            let stalest = (0..self.nics.len()).filter(|&n| a.in_flight[n] > 0).min_by_key(|&n| peer.nic_progress[n]);
            let quiet_since = a.since.max(stalest.map_or(peer.last_progress, |n| peer.nic_progress[n]));
            if now.saturating_duration_since(quiet_since) < timeout {
                continue;
            }
            let through = match stalest {
                Some(n) if self.nics.len() > 1 => format!(" through NIC {n}"),
                _ => String::new(),
            };
            let error = if a.held {
                Error::PeerUnreachable(format!(
                    "the peer did not answer this engine's introduction (a hello, which efa-direct needs before \
                     the first write or read to a peer) within the request timeout of {timeout:?}: it is dead, \
                     stalled or unreachable, or runs on another EFA fabric"
                ))
            } else {
                Error::PeerUnreachable(format!(
                    "no operation to the peer{through} completed within the request timeout of {timeout:?} \
                     (the peer is dead, stalled or unreachable, or that link is down); {} operation(s) of this \
                     request were still in flight",
                    a.seq.in_flight()
                ))
            };
            if !matches!(a.error, Some(Error::RemoteAccess(_))) {
                a.error = Some(error);
            }
            a.seq.abort();
            a.retry = None;
            self.peers[a.peer].stats.expired += 1;
            expired.push(index);
            if !stuck.contains(&a.peer) {
                stuck.push(a.peer);
            }
        }
        // Let the NICs route later requests around what is stuck (shm).
        for peer in stuck {
            self.peers[peer].stats.resets += 1;
            let Peer { remote_nics, addrs, .. } = &self.peers[peer];
            for (l, nic) in self.nics.iter_mut().enumerate() {
                for &addr in &addrs[l * remote_nics..(l + 1) * remote_nics] {
                    nic.reset_peer(addr);
                }
            }
        }
        // After the reset, so that a query to an shm peer takes the new path.
        for &index in &expired {
            self.conclude(index);
        }
        if !expired.is_empty() {
            tracing::warn!(requests = expired.len(), "requests expired: their peers made no progress");
        }
        !expired.is_empty()
    }

    /// Gets ready to sleep: returns how long the thread may sleep on the
    /// descriptors, or `None` when there is work or a NIC must be polled
    /// first. The caller has already told submitters that it is about to
    /// sleep (so that a command queued after the check here wakes it).
    pub(crate) fn prepare_sleep(&mut self) -> Option<Duration> {
        if !self.commands.is_empty() || !self.ready.is_empty() {
            return None;
        }

        let all_have_fds = self.nics.iter().all(|n| n.wait_fd().is_some());
        for nic in &mut self.nics {
            if !nic.ready_to_sleep() {
                return None;
            }
        }
        // With wait descriptors the cap only bounds a missed wake-up; without
        // them (shm, EFA, busy CQs) the provider needs regular progress
        // calls, and peers may be waiting on ours (shm's delivery-complete
        // acknowledgements): nap briefly, doubling while nothing happens.
        Some(if all_have_fds {
            Duration::from_millis(10)
        } else {
            let nap = self.nap;
            self.nap = (self.nap * 2).min(NAP_MAX);
            nap
        })
    }

    /// The counters, and what is in flight now.
    fn stats(&self) -> EngineStats {
        let now = Instant::now();
        let mut in_flight = vec![(0u64, None::<Duration>); self.peers.len()];
        let (mut total, mut oldest) = (0u64, None::<Duration>);
        for a in self.active.iter().flatten() {
            if a.guard.is_none() {
                continue;
            }
            let age = now.saturating_duration_since(a.since);
            let slot = &mut in_flight[a.peer];
            slot.0 += 1;
            slot.1 = Some(slot.1.map_or(age, |o| o.max(age)));
            total += 1;
            oldest = Some(oldest.map_or(age, |o: Duration| o.max(age)));
        }
        let peers = self
            .peers
            .iter()
            .zip(in_flight)
            .map(|(p, (n, age))| {
                let c = &p.stats;
                PeerStats {
                    address: p.address.clone(),
                    label: None,
                    posted: c.posted,
                    bytes_posted: c.bytes_posted,
                    imms_out: c.imms_out,
                    completed: c.completed,
                    errors: c.errors,
                    requests_ok: c.requests_ok,
                    requests_failed: c.requests_failed,
                    in_flight: n,
                    oldest_in_flight: age,
                    expired: c.expired,
                    resets: c.resets,
                }
            })
            .collect();
        EngineStats {
            nics: self.nic_stats.clone(),
            peers,
            in_flight: total,
            oldest_in_flight: oldest,
            latency: self.latency.clone(),
            receive_buffers: self.recv.count,
            packed: Default::default(),
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit(s) => self.submit(s),
            Command::SubmitBatch(batch) => {
                for s in batch {
                    self.submit(s);
                }
            }
            Command::Register { ptr, len, access, device, reply } => {
                let _ = reply.send(self.register(ptr as *mut u8, len, access, device));
            }
            Command::Deregister { id, memory, done } => {
                self.grants.remove(&id);
                if let Some(regions) = self.regions.remove(&id) {
                    for (nic, region) in regions.into_iter().enumerate() {
                        self.nics[nic].deregister(region);
                    }
                }
                drop(memory);
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Command::SendControl { to, bytes } => self.send_staged(&to, bytes),
            Command::DeliverImm(value) => {
                let _ = self.imm.deliver(value, self.now);
            }
            Command::Staging(lane, tx) => self.staging[lane as usize] = Some(tx),
            Command::Shutdown => self.stopping = true,
        }
    }

    fn register(
        &mut self,
        ptr: *mut u8,
        len: u64,
        access: Access,
        device: Option<(u32, Option<(i32, u64)>)>,
    ) -> Result<Registration> {
        let mut regions = Vec::with_capacity(self.nics.len());
        for nic in 0..self.nics.len() {
            // SAFETY: the caller of register_raw/alloc/register_device keeps
            // the memory valid until the region's Deregister command,
            // handled above.
            let registered = unsafe {
                match device {
                    Some((gpu, dmabuf)) => self.nics[nic].register_device(ptr as u64, len, access, gpu, dmabuf),
                    None => self.nics[nic].register(ptr, len, access),
                }
            };
            match registered {
                Ok(r) => regions.push(r),
                Err(e) => {
                    for (n, r) in regions.into_iter().enumerate() {
                        self.nics[n].deregister(r);
                    }
                    return Err(e);
                }
            }
        }
        let id = self.next_region;
        self.next_region += 1;
        if self.diagnose && (access.remote_write || access.remote_read) {
            let addr = if self.nics[0].virtual_addresses() { ptr as u64 } else { 0 };
            let grant = Grant {
                key: regions[0].key,
                addr,
                len,
                remote_write: access.remote_write,
                remote_read: access.remote_read,
            };
            self.grants.insert(id, grant);
        }
        self.regions.insert(id, regions.clone());
        Ok(Registration { id, regions })
    }

    fn resolve_peer(&mut self, address: &EngineAddress) -> Result<usize> {
        if let Some(&i) = self.peer_index.get(address) {
            return Ok(i);
        }
        let remote_nics = address.nic_count();
        let mut addrs = Vec::with_capacity(self.nics.len() * remote_nics);
        for nic in &mut self.nics {
            for r in 0..remote_nics {
                addrs.push(nic.insert_peer(address.nic(r))?);
            }
        }
        tracing::debug!(peer = %address, remote_nics, "peer inserted");
        self.peers.push(Peer {
            last_progress: self.now,
            nic_progress: vec![self.now; self.nics.len()],
            remote_nics,
            addrs,
            address: address.clone(),
            stats: PeerCounters::default(),
            intro: if self.introduce { Intro::Unknown } else { Intro::Known },
            held: 0,
        });
        self.peer_index.insert(address.clone(), self.peers.len() - 1);
        Ok(self.peers.len() - 1)
    }

    fn submit(&mut self, s: Submission) {
        let peer = match self.resolve_peer(s.op.peer()) {
            Ok(p) => p,
            Err(e) => return s.guard.finish(Err(e)),
        };
        let data_pieces = s.op.pieces();
        // A request split into several pieces sends its immediate alone, in
        // a zero-length write after every data piece has completed; a
        // single piece carries it itself.
        let trailer = s.op.imm().is_some() && data_pieces > 1;
        let seq = Sequencer::new(data_pieces + u64::from(trailer), s.op.imm().is_some());
        self.next_id += 1;
        let span = if tracing::enabled!(target: "strait::request", tracing::Level::DEBUG) {
            Some(request_span(self.next_id, &self.peers[peer].address, &s.op))
        } else {
            None
        };
        let active = Active {
            op: s.op,
            seq,
            guard: Some(s.guard),
            peer,
            error: None,
            retry: None,
            queued: true,
            since: s.submitted,
            span,
            data_pieces,
            diagnosing: false,
            diagnosed: false,
            bytes: 0,
            ops: 0,
            imm_posted: false,
            in_flight: [0; crate::wire::MAX_NICS],
            held: self.peers[peer].intro != Intro::Known,
        };
        let held = active.held;
        let index = match self.free.pop() {
            Some(i) => {
                self.active[i] = Some(active);
                i
            }
            None => {
                self.active.push(Some(active));
                self.active.len() - 1
            }
        };
        if held {
            self.peers[peer].held += 1;
            if self.peers[peer].intro == Intro::Unknown {
                self.start_intro(peer);
            }
        } else {
            self.ready.push_back(index);
        }
    }

    /// Starts introducing this engine to `peer` (see [`Intro`]).
    fn start_intro(&mut self, peer: usize) {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.peers[peer].intro = Intro::Hello { cookie, sending: None, retry_at: self.now };
        self.introducing += 1;
        tracing::debug!(peer = %self.peers[peer].address, "introducing this engine to a new peer");
        self.send_hello(peer);
    }

    /// Sends the hello of `peer`'s introduction (again), to its NIC 0.
    fn send_hello(&mut self, peer: usize) {
        let Intro::Hello { cookie, .. } = self.peers[peer].intro else { return };
        let bytes = Control::Hello { cookie, reply_to: self.address.clone() }.encode();
        let to = self.peers[peer].addrs[0];
        let sent = self.send_control(0, to, &bytes);
        if let Intro::Hello { sending, retry_at, .. } = &mut self.peers[peer].intro {
            *sending = sent;
            *retry_at = self.now + access::RETRY;
        }
    }

    /// `peer` knows this engine now: its held requests go.
    fn introduced(&mut self, peer: usize) {
        if matches!(self.peers[peer].intro, Intro::Hello { .. }) {
            self.introducing -= 1;
        }
        self.peers[peer].intro = Intro::Known;
        if std::mem::take(&mut self.peers[peer].held) == 0 {
            return;
        }
        for (index, slot) in self.active.iter_mut().enumerate() {
            if let Some(a) = slot.as_mut().filter(|a| a.peer == peer && a.held) {
                a.held = false;
                a.queued = true;
                self.ready.push_back(index);
            }
        }
    }

    /// Resends hellos that are due; gives up on introductions no request
    /// waits for any more (they expired), until the next request.
    fn tend_introductions(&mut self) {
        for peer in 0..self.peers.len() {
            let Intro::Hello { sending, retry_at, .. } = self.peers[peer].intro else { continue };
            if self.peers[peer].held == 0 {
                self.peers[peer].intro = Intro::Unknown;
                self.introducing -= 1;
            } else if sending.is_none() && self.now >= retry_at {
                self.send_hello(peer);
            }
        }
    }

    /// Posts what the ready requests may post. Returns whether anything moved.
    fn pump(&mut self) -> bool {
        let mut moved = false;
        if self.ready.is_empty() {
            return false;
        }
        for nic in &mut self.nics {
            nic.start_round();
        }
        self.busy_paths.clear();
        for _ in 0..self.ready.len() {
            let Some(index) = self.ready.pop_front() else { break };
            let (posted, busy) = self.post_some(index);
            moved |= posted > 0;
            if busy {
                if let Some(a) = self.active[index].as_mut() {
                    a.queued = true;
                    self.ready.push_back(index);
                }
            }
        }
        if moved {
            for nic in &mut self.nics {
                nic.flush();
            }
        }
        moved
    }

    /// Posts pieces of one request until it blocks. Returns (posted, busy).
    fn post_some(&mut self, index: usize) -> (u64, bool) {
        let local_nics = self.nics.len();
        let Some(a) = self.active[index].as_mut().filter(|a| !a.held) else { return (0, false) };
        a.queued = false;
        let remote_nics = self.peers[a.peer].remote_nics;
        let mut posted = 0;
        let mut busy = false;
        while let Some(i) = a.seq.next_to_post() {
            let piece = match a.retry.take() {
                Some(p) => p,
                None if i == a.data_pieces => {
                    let (local_nic, remote_nic) = crate::plan::nic_pair(i, index, local_nics, remote_nics);
                    Piece { local_nic, remote_nic, src_offset: 0, dst_offset: 0, len: 0, rows: Rows::ONE }
                }
                None => a.op.piece(i, local_nics, remote_nics),
            };
            let last = a.seq.is_last(i);
            let imm = a.op.imm();
            let fi_addr = self.peers[a.peer].addrs[piece.local_nic * remote_nics + piece.remote_nic];
            if self.busy_paths.contains(&(piece.local_nic, fi_addr)) {
                // That path refused a post this round: retrying now would
                // only take the provider's locks again (shm: the peer's).
                a.retry = Some(piece);
                busy = true;
                break;
            }
            // Delivery-complete on every data piece, or, where the path
            // applies operations in order, on the last one only (see
            // `Nic::in_order_delivery`).
            let in_order = local_nics == 1 && remote_nics == 1 && self.nics[0].in_order_delivery();
            let delivery = !in_order || i + 1 >= a.data_pieces;
            let op = build_op(&a.op, &piece, fi_addr, if last { imm } else { None }, index as u64, delivery);
            // SAFETY: the op's local buffer lies in a region held by
            // `a.op` (an Arc of its registration) until the request ends,
            // which is after this op's completion.
            match unsafe { self.nics[piece.local_nic].post(&op) } {
                Ok(Posted::Accepted) => {
                    a.seq.posted();
                    a.in_flight[piece.local_nic] += 1;
                    posted += 1;
                    // Per NIC here; per peer once, when the request ends.
                    let bytes = op.len * u64::from(op.rows.count.max(1));
                    a.bytes += bytes;
                    a.ops += 1;
                    counting! {
                        let n = &mut self.nic_stats[piece.local_nic];
                        match op.kind {
                            OpKind::Write => n.posted.writes += 1,
                            OpKind::Read => n.posted.reads += 1,
                            OpKind::Send => n.posted.sends += 1,
                        }
                        n.bytes_posted += bytes;
                        n.imms_out += u64::from(op.imm.is_some());
                    }
                    a.imm_posted |= op.imm.is_some();
                }
                Ok(Posted::Busy) => {
                    self.nic_stats[piece.local_nic].busy += 1;
                    a.retry = Some(piece);
                    busy = true;
                    self.busy_paths.push((piece.local_nic, fi_addr));
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "post failed");
                    a.error.get_or_insert(e);
                    a.seq.abort();
                    break;
                }
            }
        }
        if a.seq.outcome().is_some() {
            self.finish(index);
        }
        (posted, busy)
    }

    /// A request's outcome is decided (`a.error` set, or every piece done):
    /// hands it to the user, unless its error calls for asking the owner
    /// first; an expired request whose operations are still in flight keeps
    /// its slot until they complete.
    fn conclude(&mut self, index: usize) {
        if self.start_diagnosis(index) {
            return;
        }
        let Some(a) = self.active[index].as_mut() else { return };
        if a.seq.outcome().is_some() {
            self.finish(index);
        } else if let Some(guard) = a.guard.take() {
            let result = a.error.take().map_or(Ok(()), Err);
            let a = self.active[index].take().expect("looked at above");
            self.record_outcome(index, &a, &result);
            self.active[index] = Some(a);
            guard.finish(result);
        }
    }

    fn finish(&mut self, index: usize) {
        // A request waiting for the verdict is finished by it; start_diagnosis
        // leaves the others alone.
        if self.diagnose && (self.active[index].as_ref().is_some_and(|a| a.diagnosing) || self.start_diagnosis(index)) {
            return;
        }
        let mut a = self.active[index].take().expect("finishing a live request");
        self.free.push(index);
        if a.held {
            self.peers[a.peer].held -= 1;
        }
        let result = match a.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if let Some(guard) = a.guard.take() {
            counting! { self.record_outcome(index, &a, &result); }
            guard.finish(result);
        }
    }

    /// Counts a request's outcome, the moment the user gets it, and traces
    /// it at debug level.
    // Out of line: keeps the completion path it is called from as small as
    // the build without counters (see `counting!`).
    #[inline(never)]
    fn record_outcome(&mut self, index: usize, a: &Active, result: &Result<()>) {
        let peer = &mut self.peers[a.peer];
        let c = &mut peer.stats;
        if result.is_ok() {
            c.requests_ok += 1;
        } else {
            c.requests_failed += 1;
        }
        let ops = u64::from(a.ops);
        match &a.op {
            RequestOp::Read { .. } | RequestOp::Strided { read: true, .. } => c.posted.reads += ops,
            RequestOp::Send { .. } => c.posted.sends += ops,
            _ => c.posted.writes += ops,
        }
        c.bytes_posted += a.bytes;
        // Every request with an immediate delivers it once, if it posted.
        c.imms_out += u64::from(a.imm_posted);
        let took = self.now.saturating_duration_since(a.since);
        match &a.op {
            RequestOp::Read { .. } | RequestOp::Strided { read: true, .. } => self.latency.read.record(took),
            RequestOp::Send { .. } => self.latency.send.record(took),
            _ => self.latency.write.record(took),
        }
        if let Some(span) = &a.span {
            trace_outcome(span, index, a.bytes, took, result);
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Done { token } if token & CONTROL_TOKEN != 0 => self.control_sent(token, None),
            Event::Failed { token, error } if token & CONTROL_TOKEN != 0 => self.control_sent(token, Some(error)),
            Event::Done { token } => self.piece_done(token as usize, None),
            Event::Failed { token, error } => self.piece_done(token as usize, Some(error)),
            Event::Imm { value } => {
                let _took = self.imm.deliver(value, self.now);
                counting! {
                    if let Some(took) = _took {
                        self.latency.imm.record(took);
                    }
                }
            }
            Event::Received { token, len, message, imm } => {
                let (nic, index) = recv_slot(token);
                self.nic_stats[nic].receives_posted = self.nic_stats[nic].receives_posted.saturating_sub(1);
                if message && imm.is_some() {
                    // Only the engine's control messages carry an immediate.
                    if imm == Some(CONTROL_IMM)
                        && (self.diagnose || self.introduce || self.staging.iter().any(Option::is_some))
                    {
                        let pool = &self.pools[nic];
                        // SAFETY: as for messages below.
                        let bytes = unsafe {
                            std::slice::from_raw_parts(pool.memory.as_ptr().add(index * pool.size), len.min(pool.size))
                        };
                        match Control::decode(bytes) {
                            Ok(control) => self.on_control(nic, control),
                            Err(e) => tracing::debug!(error = %e, "ignoring a malformed control message"),
                        }
                    }
                    return self.repost(nic, index);
                }
                if let Some(value) = imm {
                    let _took = self.imm.deliver(value, self.now);
                    counting! {
                        if let Some(took) = _took {
                            self.latency.imm.record(took);
                        }
                    }
                }
                if message {
                    let pool = &self.pools[nic];
                    // SAFETY: the provider wrote `len` bytes (at most the
                    // buffer size) into this buffer, which we own again.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(pool.memory.as_ptr().add(index * pool.size), len.min(pool.size))
                    };
                    if !self.services.dispatch(bytes) {
                        match &self.messages {
                            MessageSink::Queue(tx) => tx.push(bytes.to_vec()),
                            MessageSink::Callback(cb) => cb(bytes),
                        }
                    }
                }
                self.repost(nic, index);
            }
            Event::ReceiveFailed { token, error } => {
                tracing::warn!(%error, "receive failed");
                let (nic, index) = recv_slot(token);
                self.nic_stats[nic].receives_posted = self.nic_stats[nic].receives_posted.saturating_sub(1);
                self.repost(nic, index);
            }
        }
    }

    /// Starts asking the owner about the key of a failed write or read, if
    /// the NICs cannot tell a rejected key themselves and the error may be
    /// one. Returns true when the request now waits for the verdict.
    fn start_diagnosis(&mut self, index: usize) -> bool {
        if !self.diagnose {
            return false;
        }
        let Some(a) = self.active[index].as_mut() else { return false };
        if a.diagnosing
            || a.diagnosed
            || a.guard.is_none()
            || !matches!(a.error, Some(Error::Transport { .. } | Error::PeerUnreachable(_)))
        {
            return false;
        }
        let (wanted, desc) = match &a.op {
            RequestOp::Write { dst, .. } | RequestOp::Paged { dst, .. } => (Wanted::Write, dst),
            RequestOp::Read { remote, .. } | RequestOp::Strided { remote, read: true, .. } => (Wanted::Read, remote),
            RequestOp::Strided { remote, read: false, .. } => (Wanted::Write, remote),
            RequestOp::Send { .. } => return false,
        };
        let (key, addr, len, peer) = (desc.key(0), desc.remote_addr(0), desc.len(), a.peer);
        a.diagnosing = true;
        // Requests about the same region share one question.
        if let Some(d) = self.diagnoses.iter_mut().find(|d| {
            d.peer == peer
                && d.query.wanted == wanted
                && d.query.key == key
                && d.query.addr == addr
                && d.query.len == len
        }) {
            d.requests.push(index);
            return true;
        }
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let query = Query { wanted, cookie, key, addr, len, reply_to: self.address.clone() };
        self.diagnoses.push(Diagnosis {
            peer,
            query,
            requests: vec![index],
            deadline: self.now + access::WINDOW,
            retry_at: self.now,
            state: QueryState::Unsent,
            failures: 0,
        });
        self.send_query(self.diagnoses.len() - 1);
        true
    }

    /// Sends (again) the question of diagnosis `pos`, to the owner's NIC 0.
    fn send_query(&mut self, pos: usize) {
        let d = &mut self.diagnoses[pos];
        d.query.encode(&mut self.scratch);
        let to = self.peers[d.peer].addrs[0];
        let bytes = std::mem::take(&mut self.scratch);
        let sent = self.send_control(0, to, &bytes);
        self.scratch = bytes;
        let d = &mut self.diagnoses[pos];
        match sent {
            Some(token) => d.state = QueryState::Sending(token),
            None => {
                d.failures += 1;
                d.retry_at = self.now + access::RETRY;
            }
        }
    }

    /// Resends what could not be sent; ends diagnoses whose window closed
    /// with their original errors.
    fn tend_diagnoses(&mut self) {
        let mut i = 0;
        while i < self.answers.len() {
            let p = &self.answers[i];
            if self.now >= p.retry_at {
                let (nic, to, bytes) = (p.nic, p.to, p.answer.encode());
                if self.send_control(nic, to, &bytes).is_some() || self.now >= self.answers[i].deadline {
                    self.answers.swap_remove(i);
                    continue;
                }
                self.answers[i].retry_at = self.now + access::RETRY;
            }
            i += 1;
        }
        let mut i = 0;
        while i < self.diagnoses.len() {
            let d = &self.diagnoses[i];
            if self.now >= d.deadline || d.failures >= access::TRIES {
                self.end_diagnosis(i, false);
                continue;
            }
            if d.state == QueryState::Unsent && self.now >= d.retry_at {
                self.send_query(i);
            }
            i += 1;
        }
    }

    /// Ends diagnosis `pos`: with `denied`, its requests fail with
    /// `RemoteAccess`; otherwise they keep their errors.
    fn end_diagnosis(&mut self, pos: usize, denied: bool) {
        let d = self.diagnoses.swap_remove(pos);
        for index in d.requests {
            let Some(a) = self.active[index].as_mut() else { continue };
            a.diagnosing = false;
            a.diagnosed = true;
            if denied {
                let q = &d.query;
                let what = if q.wanted == Wanted::Write { "write" } else { "read" };
                let original = a.error.as_ref().map(ToString::to_string).unwrap_or_default();
                a.error = Some(Error::RemoteAccess(format!(
                    "{what} refused: the region's owner reports that key {:#x} grants no {what} access to the \
                     region ({} bytes at {:#x}): it was deregistered, or never shared for this access; \
                     the transport reported: {original}",
                    q.key, q.len, q.addr
                )));
            }
            self.conclude(index);
        }
    }

    /// A control message from a peer.
    fn on_control(&mut self, nic: usize, control: Control) {
        match control {
            Control::Query(q) => {
                if !self.diagnose || q.reply_to.provider() != self.address.provider() {
                    return;
                }
                let denied = !self.grants.values().any(|g| g.grants(&q));
                let peer = match self.resolve_peer(&q.reply_to) {
                    Ok(p) => p,
                    Err(e) => return tracing::debug!(error = %e, "cannot answer a key query"),
                };
                let to = self.peers[peer].addrs[nic * self.peers[peer].remote_nics];
                let answer = Control::Answer(Answer { cookie: q.cookie, denied });
                if self.send_control(nic, to, &answer.encode()).is_none() {
                    // A peer new to this NIC may need connecting first.
                    let (deadline, retry_at) = (self.now + access::WINDOW, self.now + access::RETRY);
                    self.answers.push(PendingAnswer { nic, to, answer, deadline, retry_at });
                }
            }
            Control::Answer(a) => {
                if let Some(pos) = self.diagnoses.iter().position(|d| d.query.cookie == a.cookie) {
                    self.end_diagnosis(pos, a.denied);
                }
            }
            Control::Hello { cookie, reply_to } => {
                if reply_to.provider() != self.address.provider() {
                    return;
                }
                // Inserting the sender on every NIC is what it asked for.
                let peer = match self.resolve_peer(&reply_to) {
                    Ok(p) => p,
                    Err(e) => return tracing::debug!(error = %e, "cannot take a hello"),
                };
                self.introduced(peer);
                let to = self.peers[peer].addrs[nic * self.peers[peer].remote_nics];
                let welcome = Control::Welcome { cookie };
                if self.send_control(nic, to, &welcome.encode()).is_none() {
                    let (deadline, retry_at) = (self.now + access::WINDOW, self.now + access::RETRY);
                    self.answers.push(PendingAnswer { nic, to, answer: welcome, deadline, retry_at });
                }
            }
            Control::Staged(bytes) => {
                let lane = bytes.get(super::staging::LANE_AT).copied().and_then(super::staging::Lane::from_byte);
                if let Some(tx) = lane.and_then(|l| self.staging[l as usize].as_ref()) {
                    let _ = tx.send(super::staging::Msg::Control(bytes));
                }
            }
            Control::Welcome { cookie } => {
                let peer =
                    self.peers.iter().position(|p| matches!(p.intro, Intro::Hello { cookie: c, .. } if c == cookie));
                if let Some(peer) = peer {
                    tracing::debug!(peer = %self.peers[peer].address, "introduced to a peer");
                    self.introduced(peer);
                }
            }
        }
    }

    /// Sends a staging message to `to` through NIC 0 (retried like the
    /// answers to queries while no control buffer or connection is ready;
    /// a message that cannot go within the window is dropped, and its
    /// chunk expires at the asker).
    fn send_staged(&mut self, to: &EngineAddress, bytes: Vec<u8>) {
        if bytes.len() > CONTROL_SLOT_SIZE {
            return tracing::warn!(len = bytes.len(), "a staging message does not fit a control buffer");
        }
        let peer = match self.resolve_peer(to) {
            Ok(p) => p,
            Err(e) => return tracing::debug!(error = %e, "cannot reach a staging peer"),
        };
        let at = self.peers[peer].addrs[0];
        if self.send_control(0, at, &bytes).is_none() {
            let (deadline, retry_at) = (self.now + access::WINDOW, self.now + access::RETRY);
            self.answers.push(PendingAnswer { nic: 0, to: at, answer: Control::Staged(bytes), deadline, retry_at });
        }
    }

    /// Posts `bytes` as a control message through local NIC `nic` to
    /// `peer` (an AV address of that NIC). Returns the send's token, or
    /// `None` when it could not be posted now.
    fn send_control(&mut self, nic: usize, peer: u64, bytes: &[u8]) -> Option<u64> {
        debug_assert!(bytes.len() <= CONTROL_SLOT_SIZE);
        self.nics[nic].start_round();
        if self.control[nic].is_none() {
            let size = (CONTROL_SLOTS * CONTROL_SLOT_SIZE) as u64;
            let memory = AlignedBuf::zeroed(size).ok()?;
            // SAFETY: the memory lives in self.control until shutdown, after
            // the NICs are closed.
            let region = unsafe { self.nics[nic].register(memory.as_ptr(), size, Access::LOCAL) }.ok()?;
            self.control[nic] = Some(ControlPool { memory, region, free: (0..CONTROL_SLOTS).rev().collect() });
        }
        let pool = self.control[nic].as_mut().expect("created above");
        let slot = pool.free.pop()?;
        // SAFETY: slot < CONTROL_SLOTS, so the slot lies inside the memory,
        // which no posted operation uses (the slot was free).
        let local = unsafe { pool.memory.as_ptr().add(slot * CONTROL_SLOT_SIZE) };
        // SAFETY: as above; bytes fits a slot.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), local, bytes.len()) };
        let token = CONTROL_TOKEN | (nic as u64) << 32 | slot as u64;
        let op = Op {
            kind: OpKind::Send,
            local,
            len: bytes.len() as u64,
            local_desc: pool.region.desc,
            peer,
            remote_addr: 0,
            key: 0,
            imm: Some(CONTROL_IMM),
            delivery_complete: false,
            host_memory: true,
            rows: Rows::ONE,
            token,
        };
        // SAFETY: the buffer is registered and stays valid until shutdown.
        match unsafe { self.nics[nic].post(&op) } {
            Ok(Posted::Accepted) => {
                self.nics[nic].flush();
                Some(token)
            }
            Ok(Posted::Busy) | Err(_) => {
                pool.free.push(slot);
                None
            }
        }
    }

    /// A control message's send completed (or failed).
    fn control_sent(&mut self, token: u64, error: Option<Error>) {
        let (nic, slot) = (((token & !CONTROL_TOKEN) >> 32) as usize, (token & 0xffff_ffff) as usize);
        if let Some(pool) = self.control.get_mut(nic).and_then(Option::as_mut) {
            pool.free.push(slot);
        }
        if self.introducing > 0 {
            let now = self.now;
            for p in &mut self.peers {
                if let Intro::Hello { sending: sending @ Some(_), retry_at, .. } = &mut p.intro {
                    if *sending == Some(token) {
                        *sending = None;
                        *retry_at = now + if error.is_none() { HELLO_RESEND } else { access::RETRY };
                        if let Some(e) = &error {
                            tracing::debug!(error = %e, "a hello was not delivered; trying again");
                        }
                    }
                }
            }
        }
        if let Some(d) = self.diagnoses.iter_mut().find(|d| d.state == QueryState::Sending(token)) {
            match error {
                None => d.state = QueryState::Delivered,
                Some(e) => {
                    tracing::debug!(error = %e, "a key query was not delivered; trying again");
                    d.state = QueryState::Unsent;
                    d.failures += 1;
                    d.retry_at = self.now + access::RETRY;
                }
            }
        }
    }

    fn repost(&mut self, nic: usize, index: usize) {
        if self.stopping {
            return;
        }
        if let Err(e) = self.post_recv(nic, index) {
            tracing::error!(error = %e, nic, "reposting a receive buffer failed");
        }
    }

    fn piece_done(&mut self, index: usize, error: Option<Error>) {
        let Some(a) = self.active.get_mut(index).and_then(Option::as_mut) else {
            tracing::error!(index, "completion for no request");
            return;
        };
        let ok = error.is_none();
        counting! {
            let counters = &mut self.peers[a.peer].stats;
            counters.completed += 1;
            if let Some(e) = &error {
                counters.errors.0[error_kind(e)] += 1;
            }
        }
        if let Some(e) = error {
            // The first error wins, except that a rejected key is the root
            // cause of the errors that follow it (the tcp provider drops the
            // connection after rejecting a key), so it replaces them.
            let specific = matches!(e, Error::RemoteAccess(_));
            if a.error.is_none() || (specific && !matches!(a.error, Some(Error::RemoteAccess(_)))) {
                a.error = Some(e);
            }
        } else {
            self.peers[a.peer].last_progress = self.now;
        }
        a.seq.completed(ok);
        if a.seq.outcome().is_some() {
            self.finish(index);
        } else if !a.queued && a.seq.next_to_post().is_some() {
            a.queued = true;
            self.ready.push_back(index);
        }
    }

    /// Fails what is left, releases every registration, then the NICs.
    pub(crate) fn teardown(mut self) {
        let left = self.active.iter().filter(|a| a.is_some()).count();
        if left > 0 {
            tracing::info!(requests = left, "engine shutting down with requests in flight");
        }
        for slot in &mut self.active {
            if let Some(mut a) = slot.take() {
                if let Some(g) = a.guard.take() {
                    g.finish(Err(Error::Shutdown));
                }
                // Its registrations are released below with the rest; any
                // Deregister the drop queues is answered from the drain.
                drop(a);
            }
        }
        // Endpoints first: nothing may still be posted on the memory
        // deregistered below (the receive pool's buffers, on EFA).
        for nic in &mut self.nics {
            nic.close_endpoints();
        }
        for (_, regions) in self.regions.drain() {
            for (nic, region) in regions.into_iter().enumerate() {
                self.nics[nic].deregister(region);
            }
        }
        let pools = std::mem::take(&mut self.pools);
        for (nic, pool) in pools.iter().enumerate() {
            self.nics[nic].deregister(pool.region);
        }
        let control = std::mem::take(&mut self.control);
        for (nic, pool) in control.iter().enumerate() {
            if let Some(pool) = pool {
                self.nics[nic].deregister(pool.region);
            }
        }
        // Close the NICs before any memory they may still touch (posted
        // receives, operations of the requests failed above) is freed.
        self.nics.clear();
        drop(pools);
        drop(control);
        // Anything still queued gets its outcome: submissions end with
        // Shutdown as their guards drop, deregistrations are confirmed and
        // their memory freed.
        while let Ok(command) = self.commands.try_recv() {
            if let Command::Deregister { done: Some(done), .. } = command {
                let _ = done.send(());
            }
        }
    }
}

/// A request's span: its id (unique per engine, in submission order), its
/// peer and kind; `bytes`, `us` and `outcome` are recorded when it ends.
/// Out of the hot path: only when a subscriber wants it.
#[cold]
#[inline(never)]
fn request_span(id: u64, peer: &EngineAddress, op: &RequestOp) -> tracing::Span {
    let kind = match op {
        RequestOp::Write { src: None, .. } => "write_imm",
        RequestOp::Write { .. } => "write",
        RequestOp::Paged { .. } => "write_paged",
        RequestOp::Strided { read: false, .. } => "write_copies",
        RequestOp::Strided { read: true, .. } => "read_copies",
        RequestOp::Read { .. } => "read",
        RequestOp::Send { .. } => "send",
    };
    let span = tracing::debug_span!(
        target: "strait::request",
        "request",
        id,
        peer = %peer,
        kind,
        bytes = tracing::field::Empty,
        us = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    tracing::debug!(target: "strait::request", parent: &span, "request submitted");
    span
}

/// The end of a request's span: what it moved, how long it took, and its
/// outcome.
#[cold]
#[inline(never)]
fn trace_outcome(span: &tracing::Span, slot: usize, bytes: u64, took: Duration, result: &Result<()>) {
    span.record("bytes", bytes);
    span.record("us", took.as_micros() as u64);
    match result {
        Ok(()) => span.record("outcome", "ok"),
        Err(e) => span.record("outcome", tracing::field::display(e)),
    };
    tracing::debug!(target: "strait::request", parent: span, slot, "request ended");
}

fn recv_slot(token: u64) -> (usize, usize) {
    (((token & !RECV_TOKEN) >> 32) as usize, (token & 0xffff_ffff) as usize)
}

/// Writes complete at the initiator only once their bytes are visible at
/// the target (delivery complete), like RC writes on verbs: a write's
/// `Transfer` succeeding means the data has landed, with or without an
/// immediate, and the pieces of a request ahead of its immediate are known
/// to have landed before the immediate goes. `delivery` false (a piece
/// before the last, on an in-order path) lets the transport complete the
/// piece once it has taken the bytes; the last piece's delivery completion
/// then covers it.
fn build_op(op: &RequestOp, piece: &Piece, peer: u64, imm: Option<u32>, token: u64, delivery: bool) -> Op {
    let (kind, local, remote): (OpKind, Option<&MrInner>, Option<&MrDesc>) = match op {
        RequestOp::Write { src, dst, .. } => (OpKind::Write, src.as_deref(), Some(dst)),
        RequestOp::Paged { src, dst, .. } => (OpKind::Write, Some(src), Some(dst)),
        RequestOp::Read { local, remote, .. } => (OpKind::Read, Some(local), Some(remote)),
        RequestOp::Strided { local, remote, read, .. } => {
            (if *read { OpKind::Read } else { OpKind::Write }, Some(local), Some(remote))
        }
        RequestOp::Send { src, .. } => (OpKind::Send, Some(src), None),
    };
    let (ptr, desc) = match local {
        // SAFETY: offsets were checked against the region at submission.
        Some(mr) if piece.len > 0 => (unsafe { mr.ptr.add(piece.src_offset as usize) }, mr.descs[piece.local_nic]),
        _ => (std::ptr::null_mut(), std::ptr::null_mut()),
    };
    let host_memory = local.is_none_or(|mr| mr.host);
    Op {
        kind,
        local: ptr,
        len: piece.len,
        local_desc: desc,
        peer,
        remote_addr: remote.map_or(0, |d| d.remote_addr(piece.dst_offset)),
        key: remote.map_or(0, |d| d.key(piece.remote_nic)),
        imm: if kind == OpKind::Write { imm } else { None },
        delivery_complete: kind == OpKind::Write && delivery,
        host_memory,
        rows: piece.rows,
        token,
    }
}
