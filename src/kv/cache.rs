//! A rank's registered KV cache: its regions, its descriptor, the control
//! service its peers talk to, and the monitor that notices dead peers.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::layout::{KvLayout, Tp};
use super::recv::RecvState;
use super::send::SendState;
use super::wire::{Control, ControlKind, KvCacheDesc};
use crate::error::{Error, Result};
use crate::{Access, EngineAddress, MemoryRegion, MessagePool, Service, TransferEngine};

/// Settings of a [`KvCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvConfig {
    /// A peer a request has not heard from for this long is pinged (a
    /// zero-length write that fails if its engine is gone). With the
    /// engine's request timeout this bounds how long a request waits on a
    /// dead or stopped peer: a killed process is usually noticed at the
    /// first ping (its connections are gone), a stopped one once the ping
    /// expires. Default 250 ms.
    pub heartbeat: Duration,
    /// Control messages in flight at once (default 256).
    pub message_slots: usize,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig { heartbeat: Duration::from_millis(250), message_slots: 256 }
    }
}

/// Bytes of one control message buffer.
const MESSAGE_SIZE: usize = 1024;
/// Request ids cancelled before their request reached this sender: a late
/// request with one of them is refused.
const EARLY_CANCELS: usize = 4096;

/// A live request; the cache holds it until its outcome, so that a request
/// whose handle was dropped still ends properly (a dropped decoder handle
/// cancels).
pub(crate) enum Entry {
    Recv(Arc<RecvState>),
    Send(Arc<SendState>),
}

pub(crate) struct CacheInner {
    pub engine: TransferEngine,
    pub layout: KvLayout,
    pub tp: Tp,
    pub tensors: Vec<MemoryRegion>,
    _control: MemoryRegion,
    pub messages: MessagePool,
    _service: Service,
    pub desc: KvCacheDesc,
    /// `desc.fingerprint()`, computed once.
    pub fingerprint: u64,
    pub config: KvConfig,
    /// Live requests by (id, true for the decoder's side).
    requests: Mutex<HashMap<(u64, bool), Entry>>,
    early_cancels: Mutex<VecDeque<u64>>,
    next_id: AtomicU64,
    stop: AtomicBool,
    monitor: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CacheInner {
    pub(crate) fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn add(&self, id: u64, entry: Entry) {
        let decoder = matches!(entry, Entry::Recv(_));
        lock(&self.requests).insert((id, decoder), entry);
    }

    pub(crate) fn remove(&self, id: u64, decoder: bool) {
        lock(&self.requests).remove(&(id, decoder));
    }

    pub(crate) fn cancelled_early(&self, id: u64) -> bool {
        lock(&self.early_cancels).contains(&id)
    }

    /// Sends a control message; failures are only logged (the peer may be
    /// gone, which its own monitor notices).
    pub(crate) fn tell(&self, to: &EngineAddress, service: u16, kind: ControlKind, id: u64, reason: &str) {
        let control = Control {
            kind,
            id,
            rank: self.tp.rank,
            reply_service: self.desc.service,
            reply_to: self.engine.address().clone(),
            reason: reason.to_owned(),
        };
        if let Err(e) = self.messages.send(to, service, &control.encode()) {
            tracing::debug!(error = %e, id, ?kind, "KV control message not sent");
        }
    }

    fn on_message(&self, bytes: &[u8]) {
        let control = match Control::decode(bytes) {
            Ok(c) => c,
            Err(e) => return tracing::debug!(error = %e, "ignoring a malformed KV control message"),
        };
        let to_decoder = matches!(control.kind, ControlKind::Stopped | ControlKind::Failed);
        let (recv, send) = match lock(&self.requests).get(&(control.id, to_decoder)) {
            Some(Entry::Recv(r)) => (Some(r.clone()), None),
            Some(Entry::Send(s)) => (None, Some(s.clone())),
            None => (None, None),
        };
        if let Some(r) = recv {
            return r.on_control(&control);
        }
        if let Some(s) = send {
            return s.on_control(&control);
        }
        if matches!(control.kind, ControlKind::Cancel | ControlKind::Abort) {
            // Not seen yet (or long over): refuse it if it comes, and
            // confirm at once, nothing being in flight.
            let mut early = lock(&self.early_cancels);
            if early.len() == EARLY_CANCELS {
                early.pop_front();
            }
            early.push_back(control.id);
            drop(early);
            self.tell(&control.reply_to, control.reply_service, ControlKind::Stopped, control.id, "");
        } else {
            tracing::debug!(id = control.id, kind = ?control.kind, "KV control message for no live request");
        }
    }

    fn monitor_tick(&self, now: Instant) {
        let live: Vec<Entry> = lock(&self.requests)
            .values()
            .map(|e| match e {
                Entry::Recv(r) => Entry::Recv(r.clone()),
                Entry::Send(s) => Entry::Send(s.clone()),
            })
            .collect();
        for e in live {
            match e {
                Entry::Recv(r) => r.tick(now),
                Entry::Send(s) => s.tick(now),
            }
        }
    }
}

/// One rank's KV cache, registered with an engine: the handle both sides
/// of a KV transfer start from.
///
/// The decoder side calls [`expect`](Self::expect) (push or pull), sends
/// the request's bytes to every sender rank, and waits on the
/// [`KvRecv`](super::KvRecv). A sender rank decodes the request and calls
/// [`push`](Self::push) (or [`serve_pull`](Self::serve_pull)) with its own
/// blocks. A monitor thread per cache pings peers that have gone quiet.
#[derive(Clone)]
pub struct KvCache {
    pub(crate) inner: Arc<CacheInner>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache").field("layout", &self.inner.layout).field("tp", &self.inner.tp).finish()
    }
}

impl KvCache {
    /// Allocates and registers the cache's tensors (zeroed, remote read and
    /// write) for `layout` at tensor-parallel position `tp`.
    pub fn alloc(engine: &TransferEngine, layout: KvLayout, tp: Tp, config: KvConfig) -> Result<Self> {
        layout.validate(tp)?;
        let access = Access::REMOTE_READ_WRITE;
        let tensors = (0..layout.tensor_count())
            .map(|_| engine.alloc(layout.tensor_bytes(), access))
            .collect::<Result<Vec<_>>>()?;
        Self::new(engine, layout, tp, tensors, config)
    }

    /// A cache over regions registered by the caller: one per layer
    /// ([`KvTensors::PerLayer`](super::KvTensors::PerLayer)) or one pool,
    /// each at least [`KvLayout::tensor_bytes`] long. Decoders in push mode
    /// need remote write access, senders in pull mode remote read.
    pub fn new(
        engine: &TransferEngine,
        layout: KvLayout,
        tp: Tp,
        tensors: Vec<MemoryRegion>,
        config: KvConfig,
    ) -> Result<Self> {
        layout.validate(tp)?;
        if tensors.len() != layout.tensor_count() {
            return Err(Error::InvalidRequest(format!(
                "{} regions for a layout of {} tensors",
                tensors.len(),
                layout.tensor_count()
            )));
        }
        for (i, t) in tensors.iter().enumerate() {
            if t.len() < layout.tensor_bytes() {
                return Err(Error::InvalidRequest(format!(
                    "region {i} has {} bytes, the layout needs {}",
                    t.len(),
                    layout.tensor_bytes()
                )));
            }
            if t.descriptor().owner() != engine.address() {
                return Err(Error::InvalidRequest(format!("region {i} is registered with another engine")));
            }
        }
        let control = engine.alloc(64, Access::REMOTE_WRITE)?;
        let messages = MessagePool::new(engine, config.message_slots.max(1), MESSAGE_SIZE)?;
        let nonce = {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            super::wire::fnv1a(&[&t.as_nanos().to_le_bytes()[..], &std::process::id().to_le_bytes()].concat())
        };
        let cell: Arc<std::sync::OnceLock<Weak<CacheInner>>> = Arc::default();
        let handler_cell = cell.clone();
        let service = engine.serve(move |bytes| {
            if let Some(cache) = handler_cell.get().and_then(Weak::upgrade) {
                cache.on_message(bytes);
            }
        })?;
        let desc = KvCacheDesc {
            layout,
            tp,
            service: service.id(),
            control: control.descriptor().clone(),
            tensors: tensors.iter().map(|t| t.descriptor().clone()).collect(),
        };
        let fingerprint = desc.fingerprint();
        let inner = Arc::new(CacheInner {
            engine: engine.clone(),
            layout,
            tp,
            tensors,
            _control: control,
            messages,
            _service: service,
            desc,
            fingerprint,
            config,
            requests: Mutex::new(HashMap::new()),
            early_cancels: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(nonce & !0xFFFF_FFFF),
            stop: AtomicBool::new(false),
            monitor: Mutex::new(None),
        });
        let _ = cell.set(Arc::downgrade(&inner));
        let weak = Arc::downgrade(&inner);
        let heartbeat = config.heartbeat.max(Duration::from_millis(1));
        let monitor = std::thread::Builder::new()
            .name("strait-kv-monitor".into())
            .spawn(move || loop {
                std::thread::sleep(heartbeat / 4);
                let Some(cache) = weak.upgrade() else { return };
                if cache.stop.load(Ordering::Relaxed) {
                    return;
                }
                cache.monitor_tick(Instant::now());
            })
            .map_err(|e| Error::InvalidRequest(format!("spawning the KV monitor: {e}")))?;
        *lock(&inner.monitor) = Some(monitor);
        Ok(KvCache { inner })
    }

    /// What peers need: send its [`to_bytes`](KvCacheDesc::to_bytes) to
    /// them once, at start-up.
    pub fn descriptor(&self) -> &KvCacheDesc {
        &self.inner.desc
    }

    /// The cache's layout.
    pub fn layout(&self) -> &KvLayout {
        &self.inner.layout
    }

    /// The registered tensors (one per layer, or the pool).
    pub fn tensors(&self) -> &[MemoryRegion] {
        &self.inner.tensors
    }

    /// The engine the cache is registered with.
    pub fn engine(&self) -> &TransferEngine {
        &self.inner.engine
    }
}

impl Drop for CacheInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The monitor holds only a weak handle and exits on its next tick.
        lock(&self.monitor).take();
    }
}
