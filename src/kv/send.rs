//! A sender rank's side of a KV request.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::cache::{CacheInner, Entry, KvCache};
use super::outcome::Outcome;
use super::plan::{pair_plan, sends_layer, PairPlan};
use super::wire::{Control, ControlKind, KvCacheDesc, KvMode, KvRequest};
use crate::error::{Error, Result};
use crate::{reserved_imm, ImmSpace, Transfer};

enum Phase {
    Running,
    /// Posting nothing more; ends with `result` once the operations in
    /// flight have completed, then tells the decoder `tell`.
    Stopping {
        result: Result<()>,
        tell: Option<(ControlKind, String)>,
    },
    Done,
}

struct Inner {
    phase: Phase,
    sent: Vec<bool>,
    in_flight: u32,
    completed: u32,
    heard: Instant,
    pinging: bool,
}

pub(crate) struct SendState {
    cache: Arc<CacheInner>,
    request: KvRequest,
    decoder: KvCacheDesc,
    plan: Option<PairPlan>,
    /// Per layer: this rank sends (push) or announces (pull) it.
    chosen: Vec<bool>,
    to_send: u32,
    outcome: Outcome,
    inner: Mutex<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl KvCache {
    /// Starts sending a push request to the decoder whose cache is
    /// `decoder` (the descriptor the request was made for), from this
    /// rank's `src_blocks` (in token order). Everything is checked here,
    /// before anything is posted: the descriptor, the two layouts, the
    /// tensor-parallel positions, the blocks. Then call
    /// [`KvSend::send_layers`] as layers are computed, or
    /// [`KvSend::send_all`].
    pub fn push(&self, request: &KvRequest, decoder: &KvCacheDesc, src_blocks: &[u32]) -> Result<KvSend> {
        if request.mode != KvMode::Push {
            return Err(Error::InvalidRequest("a pull request is served with serve_pull".into()));
        }
        self.start(request, decoder, src_blocks)
    }

    /// Serves a pull request: the decoder reads this rank's blocks (the
    /// request's source blocks) once [`KvSend::send_layers`] says a layer
    /// is ready; the outcome comes when the decoder releases the blocks
    /// (its reads are done), cancels, fails or dies.
    pub fn serve_pull(&self, request: &KvRequest, decoder: &KvCacheDesc) -> Result<KvSend> {
        if request.mode != KvMode::Pull {
            return Err(Error::InvalidRequest("a push request is served with push".into()));
        }
        self.start(request, decoder, &request.src_blocks)
    }

    fn start(&self, request: &KvRequest, decoder: &KvCacheDesc, src_blocks: &[u32]) -> Result<KvSend> {
        let cache = &self.inner;
        if decoder.fingerprint() != request.decoder {
            return Err(Error::InvalidRequest("the decoder descriptor is not the one the request was made for".into()));
        }
        if decoder.tp != request.decoder_tp {
            return Err(Error::InvalidRequest("the request's decoder rank differs from its descriptor's".into()));
        }
        if request.sender_tp_size != cache.tp.size {
            return Err(Error::InvalidRequest(format!(
                "the request expects {} sender ranks, this rank is one of {}",
                request.sender_tp_size, cache.tp.size
            )));
        }
        if cache.cancelled_early(request.id) {
            return Err(Error::Cancelled);
        }
        let plan = pair_plan(
            &cache.layout,
            cache.tp,
            src_blocks,
            &decoder.layout,
            decoder.tp,
            &request.dst_blocks,
            request.tokens,
        )?;
        let layers = cache.layout.layers;
        let chosen = (0..layers)
            .map(|l| Ok(plan.is_some() && sends_layer(l, cache.tp, decoder.tp, cache.layout.total_heads)?))
            .collect::<Result<Vec<bool>>>()?;
        let to_send = chosen.iter().filter(|&&c| c).count() as u32;
        let state = Arc::new(SendState {
            cache: cache.clone(),
            request: request.clone(),
            decoder: decoder.clone(),
            plan,
            chosen,
            to_send,
            outcome: Outcome::default(),
            inner: Mutex::new(Inner {
                phase: Phase::Running,
                sent: vec![false; layers as usize],
                in_flight: 0,
                completed: 0,
                heard: Instant::now(),
                pinging: false,
            }),
        });
        if to_send == 0 && request.mode == KvMode::Push {
            // This rank holds nothing the decoder needs.
            lock(&state.inner).phase = Phase::Done;
            state.outcome.set(Ok(()));
        } else {
            cache.add(request.id, Entry::Send(state.clone()));
        }
        Ok(KvSend { state })
    }
}

impl SendState {
    fn send_layers(self: &Arc<Self>, layers: Range<u32>) -> Result<()> {
        let total = self.cache.layout.layers;
        if layers.end > total || layers.start > layers.end {
            return Err(Error::InvalidRequest(format!("layers {layers:?} of a cache of {total}")));
        }
        let mut todo = Vec::with_capacity(layers.len());
        {
            let mut g = lock(&self.inner);
            match &g.phase {
                Phase::Running => {}
                Phase::Stopping { result, .. } => return Err(result.clone().err().unwrap_or(Error::Cancelled)),
                Phase::Done => return self.outcome.get().unwrap_or(Ok(())),
            }
            for l in layers {
                if self.chosen[l as usize] && !g.sent[l as usize] {
                    g.sent[l as usize] = true;
                    todo.push(l);
                }
            }
            g.in_flight += todo.len() as u32;
        }
        // Post outside the lock: a completion may call back at once.
        for l in todo {
            let weak = Arc::downgrade(self);
            match self.post(l) {
                Ok(t) => t.on_complete(move |r| {
                    if let Some(s) = weak.upgrade() {
                        s.posted_done(r.clone());
                    }
                }),
                Err(e) => self.posted_done(Err(e)),
            }
        }
        Ok(())
    }

    /// Push: the layer's copies with the layer's immediate. Pull: the
    /// immediate alone, saying the layer is ready to be read.
    fn post(&self, layer: u32) -> Result<Transfer> {
        let imm = reserved_imm(ImmSpace::Kv, self.request.slot, layer as u8)?;
        let engine = &self.cache.engine;
        match (&self.plan, self.request.mode) {
            (Some(plan), KvMode::Push) => {
                let (si, sbase) = self.cache.layout.layer_base(layer);
                let (di, dbase) = self.decoder.layout.layer_base(layer);
                let (src, dst) = (&self.cache.tensors[si], &self.decoder.tensors[di]);
                engine.write_copies(src, sbase, dst, dbase, &plan.copies, Some(imm))
            }
            _ => engine.write_imm(&self.decoder.control, imm),
        }
    }

    fn posted_done(self: &Arc<Self>, result: Result<()>) {
        let mut g = lock(&self.inner);
        g.in_flight -= 1;
        match result {
            Ok(()) => {
                g.completed += 1;
                g.heard = Instant::now();
            }
            Err(e) => {
                if matches!(g.phase, Phase::Running) {
                    let reason = e.to_string();
                    g.phase = Phase::Stopping { result: Err(e), tell: Some((ControlKind::Failed, reason)) };
                }
            }
        }
        let push_done = self.request.mode == KvMode::Push && g.completed == self.to_send;
        drop(g);
        if push_done {
            // Every layer landed: nothing to tell the decoder, which counted them.
            self.stop(Ok(()), None);
        }
        self.maybe_finish();
    }

    /// Stops posting, with `result` and what to tell the decoder.
    fn stop(self: &Arc<Self>, result: Result<()>, tell: Option<(ControlKind, String)>) {
        {
            let mut g = lock(&self.inner);
            if !matches!(g.phase, Phase::Running) {
                return;
            }
            g.phase = Phase::Stopping { result, tell };
        }
        self.maybe_finish();
    }

    fn maybe_finish(self: &Arc<Self>) {
        let (result, tell) = {
            let mut g = lock(&self.inner);
            if g.in_flight > 0 {
                return;
            }
            match std::mem::replace(&mut g.phase, Phase::Done) {
                Phase::Stopping { result, tell } => (result, tell),
                other => {
                    g.phase = other;
                    return;
                }
            }
        };
        self.conclude(result, tell);
    }

    fn conclude(self: &Arc<Self>, result: Result<()>, tell: Option<(ControlKind, String)>) {
        if let Some((kind, reason)) = tell {
            self.cache.tell(self.decoder.owner(), self.decoder.service, kind, self.request.id, &reason);
        }
        self.outcome.set(result);
        self.cache.remove(self.request.id, false);
    }

    pub(crate) fn on_control(self: &Arc<Self>, c: &Control) {
        if &c.reply_to != self.decoder.owner() {
            return tracing::debug!("KV control message from an engine that is not the decoder");
        }
        lock(&self.inner).heard = Instant::now();
        match c.kind {
            ControlKind::Cancel | ControlKind::Abort => {
                let result = match c.kind {
                    ControlKind::Cancel => Err(Error::Cancelled),
                    _ => Err(Error::Aborted { by: format!("decoder ({})", c.reply_to), reason: c.reason.clone() }),
                };
                let done = matches!(lock(&self.inner).phase, Phase::Done);
                if done {
                    // Over already: nothing is in flight; confirm again.
                    self.cache.tell(&c.reply_to, c.reply_service, ControlKind::Stopped, c.id, "");
                } else {
                    self.stop(result, Some((ControlKind::Stopped, String::new())));
                }
            }
            ControlKind::Release => self.stop(Ok(()), None),
            _ => {}
        }
    }

    pub(crate) fn tick(self: &Arc<Self>, now: Instant) {
        let due = {
            let mut g = lock(&self.inner);
            let due = !matches!(g.phase, Phase::Done)
                && !g.pinging
                && now.duration_since(g.heard) >= self.cache.config.heartbeat;
            g.pinging |= due;
            due
        };
        if !due {
            return;
        }
        let weak = Arc::downgrade(self);
        let done = move |r: &Result<()>| {
            if let Some(s) = weak.upgrade() {
                s.ping_done(r.clone());
            }
        };
        match self.cache.engine.ping(&self.decoder.control) {
            Ok(t) => t.on_complete(done),
            Err(e) => done(&Err(e)),
        }
    }

    fn ping_done(self: &Arc<Self>, result: Result<()>) {
        {
            let mut g = lock(&self.inner);
            g.pinging = false;
            if result.is_ok() {
                g.heard = Instant::now();
                return;
            }
        }
        let e = result.expect_err("handled above");
        let addr = self.decoder.owner();
        self.stop(Err(Error::PeerUnreachable(format!("KV decoder ({addr}): {e}"))), None);
    }
}

/// A sender rank's handle on one KV request: post layers as they are
/// ready, and read its one outcome: `Ok` once every layer this rank sends
/// has landed (push) or the decoder has released the blocks (pull);
/// [`Error::Cancelled`] when either side cancelled, reported after every
/// posted write has completed; [`Error::Aborted`]; a transfer error; or
/// [`Error::PeerUnreachable`] for a dead decoder. Dropping the handle
/// leaves the request running to its outcome.
pub struct KvSend {
    state: Arc<SendState>,
}

impl std::fmt::Debug for KvSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvSend").field("id", &self.state.request.id).field("done", &self.is_done()).finish()
    }
}

impl KvSend {
    /// Posts `layers` (push: their bytes; pull: that they are ready), each
    /// layer as one engine request with its immediate. Layers this rank
    /// does not send to this decoder, and layers already posted, are
    /// skipped. Costs no work per block: every layer replays the copy list
    /// planned when the request started. Fails once the request is
    /// stopping or over.
    pub fn send_layers(&self, layers: Range<u32>) -> Result<()> {
        self.state.send_layers(layers)
    }

    /// Posts every layer.
    pub fn send_all(&self) -> Result<()> {
        self.state.send_layers(0..self.state.cache.layout.layers)
    }

    /// Layers this rank sends to this decoder (the others are another
    /// rank's, or hold no heads the decoder needs).
    pub fn layers_to_send(&self) -> Vec<u32> {
        (0..self.state.chosen.len() as u32).filter(|&l| self.state.chosen[l as usize]).collect()
    }

    /// Gives up, telling the decoder `reason` once the writes in flight
    /// have completed; the outcome is [`Error::Aborted`].
    pub fn fail(&self, reason: &str) {
        let e = Error::Aborted { by: "this rank".into(), reason: reason.into() };
        self.state.stop(Err(e), Some((ControlKind::Failed, reason.into())));
    }

    /// Cancels: posts nothing more, and once the writes in flight have
    /// completed tells the decoder, whose request then ends cancelled (its
    /// other senders are told to stop too).
    pub fn cancel(&self) {
        self.state.stop(Err(Error::Cancelled), Some((ControlKind::Stopped, String::new())));
    }

    /// The request.
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
}

impl std::future::Future for KvSend {
    type Output = Result<()>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<()>> {
        self.state.outcome.poll(cx)
    }
}
