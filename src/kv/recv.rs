//! The decoder's side of a KV request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::cache::{CacheInner, Entry, KvCache};
use super::layout::MAX_LAYERS;
use super::outcome::Outcome;
use super::plan::{check_blocks, check_compatible, pair_plan, senders_for, PairPlan};
use super::wire::{Control, ControlKind, KvCacheDesc, KvMode, KvRequest};
use crate::error::{Error, Result};
use crate::{ImmCounter, ImmSlot, ImmSpace};

/// What a decoder expects: from which sender ranks, into which blocks.
#[derive(Clone, Debug)]
pub struct KvExpect<'a> {
    /// The sending side's cache descriptors, one per tensor-parallel rank,
    /// in rank order.
    pub senders: &'a [KvCacheDesc],
    /// This rank's blocks, in token order.
    pub dst_blocks: &'a [u32],
    /// Tokens to move; `None`: every token of `dst_blocks`.
    pub tokens: Option<u64>,
    /// Push (senders write) or pull (this rank reads once told a layer is
    /// ready).
    pub mode: KvMode,
    /// Pull: the senders' blocks, in token order (the same on every sender
    /// rank). Push: empty.
    pub src_blocks: &'a [u32],
    /// The request fails with [`Error::Timeout`] if it has not completed
    /// this long after `expect` (`None`: only dead peers end it).
    pub timeout: Option<Duration>,
}

impl<'a> KvExpect<'a> {
    /// A push request into `dst_blocks` from the ranks of `senders`.
    pub fn push(senders: &'a [KvCacheDesc], dst_blocks: &'a [u32]) -> Self {
        KvExpect { senders, dst_blocks, tokens: None, mode: KvMode::Push, src_blocks: &[], timeout: None }
    }

    /// A pull request: this rank reads `src_blocks` of the senders into
    /// `dst_blocks`.
    pub fn pull(senders: &'a [KvCacheDesc], src_blocks: &'a [u32], dst_blocks: &'a [u32]) -> Self {
        KvExpect { senders, dst_blocks, tokens: None, mode: KvMode::Pull, src_blocks, timeout: None }
    }

    /// Moves `tokens` tokens only (the last block partly filled).
    pub fn tokens(mut self, tokens: u64) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// Gives up after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

enum Phase {
    Running,
    /// Ending with `result` once every sender in `waiting` has confirmed it
    /// stopped (or died) and this rank's own reads have drained.
    Stopping {
        result: Result<()>,
        waiting: Vec<bool>,
    },
    Done,
}

struct Inner {
    phase: Phase,
    counters: Vec<ImmCounter>,
    slot: Option<ImmSlot>,
    layers_left: u32,
    heard: Vec<Instant>,
    pinging: Vec<bool>,
    reads_in_flight: u32,
    /// Pull: reads still to complete per layer.
    layer_reads: Vec<u32>,
}

pub(crate) struct RecvState {
    cache: Arc<CacheInner>,
    request: KvRequest,
    senders: Vec<KvCacheDesc>,
    /// Pull: what to read from each sender.
    pull: Vec<Option<PairPlan>>,
    per_layer: Vec<Vec<u32>>,
    landed: [AtomicU64; (MAX_LAYERS / 64) as usize],
    outcome: Outcome,
    inner: Mutex<Inner>,
    deadline: Option<(Instant, Duration)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl KvCache {
    /// Expects a request's KV bytes: allocates its immediate slot, arms one
    /// counter per layer (counting that layer's senders: `layers x
    /// senders` immediates in all, whatever the blocks and NICs), and
    /// returns the handle whose [`request`](KvRecv::request) is to be sent
    /// to every sender rank.
    pub fn expect(&self, e: &KvExpect<'_>) -> Result<KvRecv> {
        let cache = &self.inner;
        let layout = &cache.layout;
        let p = e.senders.len() as u32;
        if p == 0 {
            return Err(Error::InvalidRequest("a KV request needs at least one sender".into()));
        }
        for (i, s) in e.senders.iter().enumerate() {
            if s.tp.rank != i as u32 || s.tp.size != p {
                return Err(Error::InvalidRequest(format!(
                    "sender {i}'s descriptor is rank {} of {}, not {i} of {p}",
                    s.tp.rank, s.tp.size
                )));
            }
            if s.owner().provider() != cache.engine.provider() {
                return Err(Error::InvalidRequest(format!("sender {i} runs on another provider")));
            }
            check_compatible(&s.layout, layout)?;
        }
        let tokens = e.tokens.unwrap_or(e.dst_blocks.len() as u64 * layout.block_tokens as u64);
        if (e.mode == KvMode::Pull) == e.src_blocks.is_empty() {
            return Err(Error::InvalidRequest("source blocks come with pull requests, and only with them".into()));
        }
        // Push: only this side's blocks are known here (each sender names
        // its own and plans its copies); pull: this rank reads, so it plans.
        check_blocks("destination", layout, e.dst_blocks, tokens)?;
        let pull = match e.mode {
            KvMode::Push => Vec::new(),
            KvMode::Pull => e
                .senders
                .iter()
                .map(|s| pair_plan(&s.layout, s.tp, e.src_blocks, layout, cache.tp, e.dst_blocks, tokens))
                .collect::<Result<_>>()?,
        };
        let per_layer =
            (0..layout.layers).map(|l| senders_for(l, cache.tp, p, layout.total_heads)).collect::<Result<Vec<_>>>()?;
        let slot = cache.engine.imm_slot(ImmSpace::Kv)?;
        let request = KvRequest {
            id: cache.new_id(),
            slot: slot.slot(),
            decoder: cache.fingerprint,
            decoder_tp: cache.tp,
            sender_tp_size: p,
            tokens,
            mode: e.mode,
            dst_blocks: e.dst_blocks.to_vec(),
            src_blocks: e.src_blocks.to_vec(),
        };
        let now = Instant::now();
        let state = Arc::new(RecvState {
            cache: cache.clone(),
            request,
            senders: e.senders.to_vec(),
            pull,
            per_layer,
            landed: Default::default(),
            outcome: Outcome::default(),
            inner: Mutex::new(Inner {
                phase: Phase::Running,
                counters: Vec::with_capacity(layout.layers as usize),
                slot: None,
                layers_left: layout.layers,
                heard: vec![now; p as usize],
                pinging: vec![false; p as usize],
                reads_in_flight: 0,
                layer_reads: vec![0; layout.layers as usize],
            }),
            deadline: e.timeout.map(|t| (now + t, t)),
        });
        // Nobody knows the slot before the request leaves this call, so no
        // counter can be reached (and no callback run) before it is stored.
        let mut counters = Vec::with_capacity(layout.layers as usize);
        for l in 0..layout.layers {
            let counter = slot.expect(l as u8, state.per_layer[l as usize].len() as u64)?;
            let weak = Arc::downgrade(&state);
            counter.on_reached(move |_| {
                if let Some(s) = weak.upgrade() {
                    s.layer_reached(l);
                }
            });
            counters.push(counter);
        }
        let mut g = lock(&state.inner);
        g.slot = Some(slot);
        g.counters = counters;
        drop(g);
        cache.add(state.request.id, Entry::Recv(state.clone()));
        Ok(KvRecv { state })
    }
}

impl RecvState {
    fn layer_reached(self: &Arc<Self>, layer: u32) {
        if self.request.mode == KvMode::Push {
            return self.mark_landed(layer);
        }
        // Pull: the layer is ready at its senders; read it from each.
        let senders = &self.per_layer[layer as usize];
        {
            let mut g = lock(&self.inner);
            if !matches!(g.phase, Phase::Running) {
                return;
            }
            g.heard.iter_mut().for_each(|h| *h = Instant::now());
            g.layer_reads[layer as usize] = senders.len() as u32;
            g.reads_in_flight += senders.len() as u32;
        }
        let cache = &self.cache;
        let (ti, tbase) = cache.layout.layer_base(layer);
        for &s in senders {
            let sender = &self.senders[s as usize];
            let (si, sbase) = sender.layout.layer_base(layer);
            let read = match &self.pull[s as usize] {
                Some(plan) => {
                    cache.engine.read_copies(&cache.tensors[ti], tbase, &sender.tensors[si], sbase, &plan.copies)
                }
                None => Err(Error::InvalidRequest("a sender chosen for a layer shares no heads".into())),
            };
            let weak = Arc::downgrade(self);
            match read {
                Ok(t) => t.on_complete(move |r| {
                    if let Some(s) = weak.upgrade() {
                        s.read_done(layer, r.clone());
                    }
                }),
                Err(e) => self.read_done(layer, Err(e)),
            }
        }
    }

    fn read_done(self: &Arc<Self>, layer: u32, result: Result<()>) {
        let landed = {
            let mut g = lock(&self.inner);
            g.reads_in_flight -= 1;
            let left = &mut g.layer_reads[layer as usize];
            *left -= 1;
            *left == 0 && result.is_ok()
        };
        match result {
            Err(e) => self.stop(Err(e), None),
            Ok(()) if landed => self.mark_landed(layer),
            Ok(()) => self.maybe_finish(),
        }
    }

    fn mark_landed(self: &Arc<Self>, layer: u32) {
        self.landed[(layer / 64) as usize].fetch_or(1 << (layer % 64), Ordering::Release);
        let complete = {
            let mut g = lock(&self.inner);
            g.layers_left -= 1;
            let now = Instant::now();
            for &s in &self.per_layer[layer as usize] {
                g.heard[s as usize] = now;
            }
            g.layers_left == 0 && matches!(g.phase, Phase::Running)
        };
        if complete {
            if self.request.mode == KvMode::Pull {
                for s in &self.senders {
                    self.cache.tell(s.owner(), s.service, ControlKind::Release, self.request.id, "");
                }
            }
            self.finish(Ok(()));
        } else {
            self.maybe_finish();
        }
    }

    /// Ends the request with `result` once the senders (but `gone`, which
    /// has stopped or died) have confirmed they stopped.
    fn stop(self: &Arc<Self>, result: Result<()>, gone: Option<usize>) {
        let told = {
            let mut g = lock(&self.inner);
            if !matches!(g.phase, Phase::Running) {
                drop(g);
                if let Some(r) = gone {
                    self.sender_stopped(r);
                }
                return;
            }
            let waiting: Vec<bool> = (0..self.senders.len()).map(|i| Some(i) != gone).collect();
            let told = waiting.clone();
            let now = Instant::now();
            g.heard.iter_mut().for_each(|h| *h = now);
            g.phase = Phase::Stopping { result: result.clone(), waiting };
            told
        };
        let (kind, reason) = match &result {
            Err(Error::Cancelled) => (ControlKind::Cancel, String::new()),
            Err(e) => (ControlKind::Abort, e.to_string()),
            Ok(()) => (ControlKind::Cancel, String::new()),
        };
        for (s, _) in self.senders.iter().zip(told).filter(|(_, t)| *t) {
            self.cache.tell(s.owner(), s.service, kind, self.request.id, &reason);
        }
        self.maybe_finish();
    }

    fn sender_stopped(self: &Arc<Self>, rank: usize) {
        {
            let mut g = lock(&self.inner);
            if let Phase::Stopping { waiting, .. } = &mut g.phase {
                waiting[rank] = false;
            }
        }
        self.maybe_finish();
    }

    fn maybe_finish(self: &Arc<Self>) {
        let result = {
            let g = lock(&self.inner);
            match &g.phase {
                Phase::Stopping { result, waiting } if g.reads_in_flight == 0 && !waiting.iter().any(|&w| w) => {
                    result.clone()
                }
                _ => return,
            }
        };
        self.finish(result);
    }

    fn finish(self: &Arc<Self>, result: Result<()>) {
        let (counters, slot) = {
            let mut g = lock(&self.inner);
            if matches!(g.phase, Phase::Done) {
                return;
            }
            g.phase = Phase::Done;
            (std::mem::take(&mut g.counters), g.slot.take())
        };
        // Counters before the slot: the slot goes back to the pool last.
        drop(counters);
        drop(slot);
        self.outcome.set(result);
        self.cache.remove(self.request.id, true);
    }

    pub(crate) fn on_control(self: &Arc<Self>, c: &Control) {
        let r = c.rank as usize;
        let Some(sender) = self.senders.get(r) else { return };
        if sender.owner() != &c.reply_to {
            return tracing::debug!(rank = r, "KV control message from an engine that is not that sender");
        }
        lock(&self.inner).heard[r] = Instant::now();
        match c.kind {
            ControlKind::Stopped => self.stop(Err(Error::Cancelled), Some(r)),
            ControlKind::Failed => self.stop(
                Err(Error::Aborted { by: format!("sender rank {r} ({})", c.reply_to), reason: c.reason.clone() }),
                Some(r),
            ),
            _ => {}
        }
    }

    pub(crate) fn tick(self: &Arc<Self>, now: Instant) {
        if let Some((at, t)) = self.deadline {
            if now >= at && matches!(lock(&self.inner).phase, Phase::Running) {
                self.stop(Err(Error::Timeout(t)), None);
            }
        }
        let heartbeat = self.cache.config.heartbeat;
        let due: Vec<usize> = {
            let mut g = lock(&self.inner);
            let g = &mut *g;
            let wanted = |i: usize| match &g.phase {
                Phase::Running => true,
                Phase::Stopping { waiting, .. } => waiting[i],
                Phase::Done => false,
            };
            let due: Vec<usize> = (0..self.senders.len())
                .filter(|&i| wanted(i) && !g.pinging[i] && now.duration_since(g.heard[i]) >= heartbeat)
                .collect();
            for &i in &due {
                g.pinging[i] = true;
            }
            due
        };
        for i in due {
            let weak = Arc::downgrade(self);
            let done = move |r: &Result<()>| {
                if let Some(s) = weak.upgrade() {
                    s.ping_done(i, r.clone());
                }
            };
            match self.cache.engine.ping(&self.senders[i].control) {
                Ok(t) => t.on_complete(done),
                Err(e) => done(&Err(e)),
            }
        }
    }

    fn ping_done(self: &Arc<Self>, rank: usize, result: Result<()>) {
        {
            let mut g = lock(&self.inner);
            g.pinging[rank] = false;
            if result.is_ok() {
                g.heard[rank] = Instant::now();
                return;
            }
        }
        let e = result.expect_err("handled above");
        let addr = self.senders[rank].owner();
        self.stop(Err(Error::PeerUnreachable(format!("KV sender rank {rank} ({addr}): {e}"))), Some(rank));
    }
}

/// The decoder's handle on one KV request: one outcome (`Ok` when every
/// byte of every layer from every expected sender has landed;
/// [`Error::Cancelled`], [`Error::Aborted`] with the sender's reason,
/// [`Error::PeerUnreachable`] for a dead or silent sender,
/// [`Error::Timeout`], or a transfer error), and per-layer progress.
///
/// Every outcome, failures included, is reported only once every sender
/// has confirmed it posts nothing more and has no write in flight (or is
/// dead): once `wait` returns, the blocks are this rank's to reuse.
/// Dropping the handle of an unfinished request cancels it without
/// waiting.
pub struct KvRecv {
    state: Arc<RecvState>,
}

impl std::fmt::Debug for KvRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvRecv").field("id", &self.state.request.id).field("done", &self.is_done()).finish()
    }
}

impl KvRecv {
    /// The request to send to every sender rank
    /// ([`KvRequest::to_bytes`]).
    pub fn request(&self) -> &KvRequest {
        &self.state.request
    }

    /// True once the request has its outcome.
    pub fn is_done(&self) -> bool {
        self.state.outcome.get().is_some()
    }

    /// The outcome, or `None` while it runs.
    pub fn result(&self) -> Option<Result<()>> {
        self.state.outcome.get()
    }

    /// Runs `f` with the outcome once it is known: on the thread that
    /// sets it (the engine's worker or the cache's monitor; keep it short
    /// and do not block there), or at once if it is known already.
    pub fn on_done(&self, f: impl FnOnce(&Result<()>) + Send + 'static) {
        self.state.outcome.on_done(Box::new(f));
    }

    /// Blocks until the outcome.
    pub fn wait(&self) -> Result<()> {
        self.state.outcome.wait(None)
    }

    /// Blocks until the outcome or `timeout` ([`Error::Timeout`]; the
    /// request carries on).
    pub fn wait_timeout(&self, timeout: Duration) -> Result<()> {
        self.state.outcome.wait(Some(timeout))
    }

    /// True once every byte of `layer` has landed.
    pub fn layer_landed(&self, layer: u32) -> bool {
        layer < MAX_LAYERS
            && self.state.landed[(layer / 64) as usize].load(Ordering::Acquire) & (1 << (layer % 64)) != 0
    }

    /// The layers that have fully landed, in order.
    pub fn landed_layers(&self) -> Vec<u32> {
        (0..self.state.cache.layout.layers).filter(|&l| self.layer_landed(l)).collect()
    }

    /// Cancels the request: the senders are told to stop, and the outcome
    /// ([`Error::Cancelled`], or `Ok` if everything had landed already)
    /// comes once each has confirmed. Wait for it before reusing the
    /// blocks.
    pub fn cancel(&self) {
        self.state.stop(Err(Error::Cancelled), None);
    }
}

impl Drop for KvRecv {
    fn drop(&mut self) {
        if !self.is_done() {
            self.cancel();
        }
    }
}

impl std::future::Future for KvRecv {
    type Output = Result<()>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<()>> {
        self.state.outcome.poll(cx)
    }
}
