//! What the primitives (KV, MoE, weights) share with each other and with
//! users without stepping on them: reserved immediates handed out in
//! slots, a liveness ping, and two-sided service messages routed past the
//! user's message queue. All of it is public: what a primitive does, a user
//! can do.
//!
//! # Reserved immediates
//! Immediates from [`RESERVED_IMM_BASE`] (`0xF000_0000`) up are strait's.
//! [`TransferEngine::expect_imm`](crate::TransferEngine::expect_imm) refuses
//! them, and when no counter claims one it is kept for a later counter of
//! its slot, never handed to the user's unclaimed-immediate callback or
//! queue. The 32 bits read:
//!
//! ```text
//!  31..28  27..24  23........8  7.....0
//!  0xF     space   slot         sub
//! ```
//!
//! `space` names the user of the range ([`ImmSpace`]); `slot` is one
//! request's, allocated by the receiver with
//! [`TransferEngine::imm_slot`](crate::TransferEngine::imm_slot) and carried
//! to the sender inside the request; `sub` is the request's own (the KV
//! cache uses the layer index). Slots are unique per engine and space while
//! held, and are reused oldest-freed first, so a slot comes back only after
//! every other free slot of its space has been used (65,535 requests later
//! at the least). Allocating a slot forgets any of its immediates still
//! kept from an earlier holder: the new holder's senders learn the slot
//! from it, so none of theirs can be early.
//!
//! [`PING_IMM`] (`0xFFFF_FFFF`) is never counted anywhere: a zero-length
//! write carrying it ([`TransferEngine::ping`](crate::TransferEngine::ping))
//! tells the sender whether the peer's engine is reachable and alive, and
//! does nothing at the peer.
//!
//! # Service messages
//! A two-sided message whose first four bytes are [`SERVICE_MAGIC`], then a
//! little-endian `u16` service id, goes to the handler registered for that
//! id ([`TransferEngine::serve`](crate::TransferEngine::serve)) instead of
//! the user's queue or `on_message` callback; one with no handler is
//! dropped. [`MessagePool`] frames and sends them from a small registered
//! staging region.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use super::imm::{ImmCounter, ImmTable};
use super::{MemoryRegion, Transfer, TransferEngine};
use crate::address::EngineAddress;
use crate::descriptor::Access;
use crate::error::{Error, Result};

/// The first reserved immediate.
pub const RESERVED_IMM_BASE: u32 = 0xF000_0000;

/// The liveness ping's immediate: never counted.
pub const PING_IMM: u32 = 0xFFFF_FFFF;

/// First bytes of a service message.
pub const SERVICE_MAGIC: [u8; 4] = *b"STSV";

/// Bytes before a service message's payload: the magic and the service id.
pub const SERVICE_HEADER: usize = 6;

/// Who a range of reserved immediates belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImmSpace {
    /// [`crate::kv`].
    Kv,
    /// Expert-parallel dispatch and combine.
    Moe,
    /// RL weight transfer.
    Weights,
    /// Applications' own protocols (1..=11; 0 is not a user space).
    User(u8),
}

impl ImmSpace {
    fn nibble(self) -> Result<u32> {
        match self {
            ImmSpace::Kv => Ok(1),
            ImmSpace::Moe => Ok(2),
            ImmSpace::Weights => Ok(3),
            ImmSpace::User(n @ 1..=11) => Ok(3 + n as u32),
            ImmSpace::User(n) => Err(Error::InvalidRequest(format!("user immediate space {n} is not in 1..=11"))),
        }
    }
}

/// Slots per space.
const SLOTS: usize = 1 << 16;

/// Free slots per space, oldest-freed first (created on first use).
#[derive(Default)]
pub(crate) struct SlotPool {
    free: Mutex<HashMap<u32, VecDeque<u16>>>,
}

impl SlotPool {
    fn take(&self, space: u32) -> Option<u16> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.entry(space).or_insert_with(|| (0..SLOTS).map(|s| s as u16).collect()).pop_front()
    }

    fn give_back(&self, space: u32, slot: u16) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.entry(space).or_default().push_back(slot);
    }
}

/// One slot of reserved immediates (256 values, `sub` 0..=255), held until
/// dropped. From [`TransferEngine::imm_slot`].
pub struct ImmSlot {
    space: u32,
    slot: u16,
    pool: Arc<SlotPool>,
    table: Arc<ImmTable>,
}

impl std::fmt::Debug for ImmSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImmSlot").field("space", &self.space).field("slot", &self.slot).finish()
    }
}

impl ImmSlot {
    /// The slot number (carry it to the senders).
    pub fn slot(&self) -> u16 {
        self.slot
    }

    /// The immediate value of `sub` in this slot.
    pub fn value(&self, sub: u8) -> u32 {
        reserved_imm_raw(self.space, self.slot, sub)
    }

    /// A counter for `count` immediates of `sub` in this slot (the only way
    /// to count reserved immediates).
    pub fn expect(&self, sub: u8, count: u64) -> Result<ImmCounter> {
        self.table.expect(self.value(sub), count)
    }
}

impl Drop for ImmSlot {
    fn drop(&mut self) {
        self.pool.give_back(self.space, self.slot);
    }
}

fn reserved_imm_raw(space: u32, slot: u16, sub: u8) -> u32 {
    RESERVED_IMM_BASE | (space << 24) | ((slot as u32) << 8) | sub as u32
}

/// The immediate a sender writes for `sub` of the receiver's `slot` in
/// `space` (the receiver's [`ImmSlot::value`] of the same numbers).
pub fn reserved_imm(space: ImmSpace, slot: u16, sub: u8) -> Result<u32> {
    Ok(reserved_imm_raw(space.nibble()?, slot, sub))
}

pub(crate) fn new_slot(engine: &TransferEngine, space: ImmSpace) -> Result<ImmSlot> {
    let space = space.nibble()?;
    let shared = &engine.shared;
    let slot = shared
        .slots
        .take(space)
        .ok_or_else(|| Error::InvalidRequest("all 65536 immediate slots of this space are held".into()))?;
    shared.imm.forget_prefix(reserved_imm_raw(space, slot, 0));
    Ok(ImmSlot { space, slot, pool: shared.slots.clone(), table: shared.imm.clone() })
}

type Handler = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Handlers of service messages, by id.
#[derive(Default)]
pub(crate) struct Services {
    handlers: RwLock<HashMap<u16, Handler>>,
    next: Mutex<u16>,
}

impl Services {
    /// Hands a service message to its handler; false when `bytes` is not
    /// one (it goes to the user).
    pub(crate) fn dispatch(&self, bytes: &[u8]) -> bool {
        if bytes.len() < SERVICE_HEADER || bytes[..4] != SERVICE_MAGIC {
            return false;
        }
        let id = u16::from_le_bytes([bytes[4], bytes[5]]);
        let handler = self.handlers.read().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
        match handler {
            Some(h) => h(&bytes[SERVICE_HEADER..]),
            None => tracing::debug!(id, "dropping a message for a service nobody serves"),
        }
        true
    }

    fn add(self: &Arc<Self>, handler: Handler) -> Result<Service> {
        let mut handlers = self.handlers.write().unwrap_or_else(|e| e.into_inner());
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..=u16::MAX as u32 {
            let id = *next;
            *next = next.wrapping_add(1);
            if let std::collections::hash_map::Entry::Vacant(v) = handlers.entry(id) {
                v.insert(handler);
                return Ok(Service { id, services: self.clone() });
            }
        }
        Err(Error::InvalidRequest("all 65536 service ids are in use".into()))
    }
}

pub(crate) fn serve(engine: &TransferEngine, handler: impl Fn(&[u8]) + Send + Sync + 'static) -> Result<Service> {
    engine.shared.services.add(Arc::new(handler))
}

/// A registered service message handler; dropping it unregisters it.
pub struct Service {
    id: u16,
    services: Arc<Services>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("id", &self.id).finish()
    }
}

impl Service {
    /// The id peers address their messages to.
    pub fn id(&self) -> u16 {
        self.id
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.services.handlers.write().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

/// Sends service messages from a registered staging region of `slots`
/// buffers of `slot_size` bytes; a buffer is free again once its send has
/// completed. Usable from completion callbacks (it never blocks).
pub struct MessagePool {
    engine: TransferEngine,
    region: MemoryRegion,
    slot_size: usize,
    free: Arc<Mutex<Vec<usize>>>,
}

impl std::fmt::Debug for MessagePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessagePool").field("slot_size", &self.slot_size).finish()
    }
}

impl MessagePool {
    /// A pool for `engine` (allocates and registers `slots * slot_size`
    /// bytes).
    pub fn new(engine: &TransferEngine, slots: usize, slot_size: usize) -> Result<Self> {
        if slots == 0 || slot_size <= SERVICE_HEADER {
            return Err(Error::InvalidRequest("a message pool needs slots larger than the header".into()));
        }
        let region = engine.alloc((slots * slot_size) as u64, Access::LOCAL)?;
        Ok(MessagePool {
            engine: engine.clone(),
            region,
            slot_size,
            free: Arc::new(Mutex::new((0..slots).rev().collect())),
        })
    }

    /// Largest payload of one message.
    pub fn max_payload(&self) -> usize {
        self.slot_size - SERVICE_HEADER
    }

    /// Sends `payload` to service `service` of `peer`. Fails with
    /// [`Error::InvalidRequest`] when it is too long or every buffer is in
    /// flight.
    pub fn send(&self, peer: &EngineAddress, service: u16, payload: &[u8]) -> Result<Transfer> {
        if payload.len() > self.max_payload() {
            return Err(Error::InvalidRequest(format!(
                "a service message of {} bytes exceeds the pool's {}",
                payload.len(),
                self.max_payload()
            )));
        }
        let slot = self
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .ok_or_else(|| Error::InvalidRequest("every message buffer is in flight".into()))?;
        let offset = (slot * self.slot_size) as u64;
        let mut header = [0u8; SERVICE_HEADER];
        header[..4].copy_from_slice(&SERVICE_MAGIC);
        header[4..].copy_from_slice(&service.to_le_bytes());
        let sent = self
            .region
            .write_at(offset, &header)
            .and_then(|_| self.region.write_at(offset + SERVICE_HEADER as u64, payload))
            .and_then(|_| self.engine.send(peer, &self.region, offset, (SERVICE_HEADER + payload.len()) as u64));
        match sent {
            Ok(transfer) => {
                let free = self.free.clone();
                transfer.on_complete(move |_| free.lock().unwrap_or_else(|e| e.into_inner()).push(slot));
                Ok(transfer)
            }
            Err(e) => {
                self.free.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
                Err(e)
            }
        }
    }
}
