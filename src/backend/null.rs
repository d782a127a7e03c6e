//! A backend whose NICs complete every operation at the next poll, without
//! moving any bytes. It exists to measure the engine's own cost per work
//! item (the criterion submit-path bench) with no network in the way.
//!
//! Only built with the `test-backend` feature; never a default and never
//! selected by [`Provider`](crate::Provider). Its engines present themselves
//! as `tcp` so that their descriptors pass the same checks as real ones.

use std::ffi::c_void;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Event, Nic, NicRegion, Op, OpKind, Posted};
use crate::descriptor::Access;
use crate::error::Result;

/// Operations one NIC holds before it answers [`Posted::Busy`], like a
/// provider's transmit queue.
const QUEUE_DEPTH: usize = 1024;

static NEXT_ADDRESS: AtomicU64 = AtomicU64::new(1);

/// See the module docs.
pub(crate) struct NullNic {
    address: Box<[u8]>,
    next_key: u64,
    done: Vec<u64>,
    imms: Vec<u32>,
}

impl NullNic {
    pub(crate) fn new() -> Self {
        let address = NEXT_ADDRESS.fetch_add(1, Ordering::Relaxed).to_le_bytes().into();
        NullNic { address, next_key: 1, done: Vec::with_capacity(QUEUE_DEPTH), imms: Vec::with_capacity(QUEUE_DEPTH) }
    }
}

impl Nic for NullNic {
    fn address(&self) -> &[u8] {
        &self.address
    }

    fn virtual_addresses(&self) -> bool {
        false
    }

    unsafe fn register(&mut self, _addr: *mut u8, _len: u64, _access: Access) -> Result<NicRegion> {
        self.next_key += 1;
        Ok(NicRegion { handle: std::ptr::null_mut(), key: self.next_key, desc: std::ptr::null_mut() })
    }

    fn deregister(&mut self, _region: NicRegion) {}

    fn insert_peer(&mut self, _address: &[u8]) -> Result<u64> {
        Ok(0)
    }

    unsafe fn post(&mut self, op: &Op) -> Result<Posted> {
        if self.done.len() >= QUEUE_DEPTH {
            return Ok(Posted::Busy);
        }
        self.done.push(op.token);
        if let (OpKind::Write, Some(imm)) = (op.kind, op.imm) {
            self.imms.push(imm);
        }
        Ok(Posted::Accepted)
    }

    unsafe fn post_recv(&mut self, _buf: *mut u8, _len: usize, _desc: *mut c_void, _token: u64) -> Result<Posted> {
        // Receives wait for messages that never come.
        Ok(Posted::Accepted)
    }

    fn poll(&mut self, events: &mut Vec<Event>) -> usize {
        let before = events.len();
        events.extend(self.done.drain(..).map(|token| Event::Done { token }));
        events.extend(self.imms.drain(..).map(|value| Event::Imm { value }));
        events.len() - before
    }

    fn wait_fd(&self) -> Option<RawFd> {
        None
    }

    fn ready_to_sleep(&mut self) -> bool {
        self.done.is_empty()
    }
}
