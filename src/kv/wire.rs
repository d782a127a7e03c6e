//! The KV primitive's bytes between processes: the cache descriptor, the
//! request, and the control messages. Versioned, little-endian, decoded by
//! validating readers that never panic (fuzzed under `fuzz/`).

use super::layout::{KvKind, KvLayout, KvTensors, Tp};
use crate::error::{Error, Result};
use crate::wire::{from_hex, put_bytes, put_u32s, to_hex, Reader};
use crate::{EngineAddress, MrDesc};

const DESC_MAGIC: &[u8; 3] = b"SKC";
const REQUEST_MAGIC: &[u8; 3] = b"SKR";
const VERSION: u8 = 1;
/// Longest memory descriptor accepted inside a KV descriptor.
const MAX_MR_DESC: usize = 4096;
/// Most blocks one request may name.
pub const MAX_REQUEST_BLOCKS: usize = 1 << 24;
/// Longest failure reason carried.
pub const MAX_REASON: usize = 512;

/// What a peer needs to move KV bytes to or from a rank's cache: its
/// layout, its tensor-parallel position, and one memory descriptor per
/// tensor (one per layer, or one for a pool), never one per block, plus
/// where its control messages and liveness pings go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvCacheDesc {
    /// The cache's layout.
    pub layout: KvLayout,
    /// The rank's tensor-parallel position.
    pub tp: Tp,
    /// Service id of the cache's control messages.
    pub service: u16,
    /// A small region of the cache's engine that takes remote writes
    /// (liveness pings).
    pub control: MrDesc,
    /// One descriptor per tensor.
    pub tensors: Vec<MrDesc>,
}

impl KvCacheDesc {
    /// The engine that owns the cache.
    pub fn owner(&self) -> &EngineAddress {
        self.control.owner()
    }

    /// Encodes it for another process ([`from_bytes`](Self::from_bytes)).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.tensors.len() * 128);
        out.extend_from_slice(DESC_MAGIC);
        out.push(VERSION);
        put_layout(&mut out, &self.layout);
        out.extend_from_slice(&self.tp.rank.to_le_bytes());
        out.extend_from_slice(&self.tp.size.to_le_bytes());
        out.extend_from_slice(&self.service.to_le_bytes());
        put_bytes(&mut out, &self.control.to_bytes());
        out.extend_from_slice(&(self.tensors.len() as u32).to_le_bytes());
        for t in &self.tensors {
            put_bytes(&mut out, &t.to_bytes());
        }
        out
    }

    /// Decodes and checks a descriptor from another process: the layout is
    /// well formed for its rank, there is one descriptor per tensor, each
    /// large enough, all of one engine.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "KV cache descriptor");
        r.header(DESC_MAGIC, VERSION)?;
        let layout = read_layout(&mut r)?;
        let (rank, size) = (r.u32("tp rank")?, r.u32("tp size")?);
        let tp = Tp::new(rank, size).map_err(|e| r.error(e.to_string()))?;
        layout.validate(tp).map_err(|e| r.error(e.to_string()))?;
        let service = r.u16("service")?;
        let control = MrDesc::from_bytes(r.bytes(MAX_MR_DESC, "control descriptor")?)?;
        if !control.access().remote_write {
            return Err(r.error("the control region does not take remote writes"));
        }
        let n = r.u32("tensor count")? as usize;
        if n != layout.tensor_count() {
            return Err(r.error(format!("{n} tensors for a layout of {}", layout.tensor_count())));
        }
        let mut tensors = Vec::with_capacity(n);
        for i in 0..n {
            let t = MrDesc::from_bytes(r.bytes(MAX_MR_DESC, "tensor descriptor")?)?;
            if t.len() < layout.tensor_bytes() {
                return Err(r.error(format!(
                    "tensor {i} has {} bytes, the layout needs {}",
                    t.len(),
                    layout.tensor_bytes()
                )));
            }
            if t.owner() != control.owner() {
                return Err(r.error(format!("tensor {i} belongs to another engine")));
            }
            tensors.push(t);
        }
        r.finish()?;
        Ok(KvCacheDesc { layout, tp, service, control, tensors })
    }

    /// A 64-bit digest of the encoding (FNV-1a), carried in requests so a
    /// sender can tell it was given the descriptor the decoder meant.
    pub fn fingerprint(&self) -> u64 {
        fnv1a(&self.to_bytes())
    }
}

/// Hex text of `to_bytes`, and its parse (as [`MrDesc`]'s), for carrying
/// descriptors and requests in text (JSON, environment variables, logs).
macro_rules! hex_text {
    ($ty:ty, $what:literal) => {
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&to_hex(&self.to_bytes()))
            }
        }

        impl std::str::FromStr for $ty {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                let bytes = from_hex(s)
                    .ok_or_else(|| Error::InvalidDescriptor { what: $what, reason: "not a hex string".into() })?;
                Self::from_bytes(&bytes)
            }
        }
    };
}

hex_text!(KvCacheDesc, "KV cache descriptor");
hex_text!(KvRequest, "KV request");

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

fn put_layout(out: &mut Vec<u8>, l: &KvLayout) {
    out.push(match l.kind {
        KvKind::Mha => 0,
        KvKind::Mla => 1,
    });
    for v in [l.layers, l.blocks, l.block_tokens, l.heads, l.total_heads, l.head_dim, l.elem_bytes] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    match l.tensors {
        KvTensors::PerLayer => {
            out.push(0);
            out.extend_from_slice(&0u64.to_le_bytes());
        }
        KvTensors::Pool { layer_stride } => {
            out.push(1);
            out.extend_from_slice(&layer_stride.to_le_bytes());
        }
    }
    for v in [l.kv_stride, l.block_stride, l.token_stride, l.head_stride] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn read_layout(r: &mut Reader<'_>) -> Result<KvLayout> {
    let kind = match r.u8("kind")? {
        0 => KvKind::Mha,
        1 => KvKind::Mla,
        k => return Err(r.error(format!("unknown cache kind {k}"))),
    };
    let mut dims = [0u32; 7];
    for d in &mut dims {
        *d = r.u32("dimension")?;
    }
    let tensors = match (r.u8("tensors")?, r.u64("layer stride")?) {
        (0, 0) => KvTensors::PerLayer,
        (1, layer_stride) => KvTensors::Pool { layer_stride },
        (t, _) => return Err(r.error(format!("unknown tensor arrangement {t}"))),
    };
    let [layers, blocks, block_tokens, heads, total_heads, head_dim, elem_bytes] = dims;
    Ok(KvLayout {
        kind,
        layers,
        blocks,
        block_tokens,
        heads,
        total_heads,
        head_dim,
        elem_bytes,
        tensors,
        kv_stride: r.u64("kv stride")?,
        block_stride: r.u64("block stride")?,
        token_stride: r.u64("token stride")?,
        head_stride: r.u64("head stride")?,
    })
}

/// Push (the sender writes into the decoder's blocks) or pull (the decoder
/// reads the sender's blocks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvMode {
    /// The sender writes each layer into the decoder's blocks.
    Push,
    /// The decoder reads each layer once the sender says it is ready.
    Pull,
}

/// One KV request, made by the decoder and carried to each sender rank by
/// any means (the serving engine's scheduler). Its size grows with the
/// request's blocks, never with the cache's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvRequest {
    /// Unique id, chosen by the decoder.
    pub id: u64,
    /// The decoder's immediate slot for this request.
    pub slot: u16,
    /// [`KvCacheDesc::fingerprint`] of the decoder's cache.
    pub decoder: u64,
    /// The decoder rank's tensor-parallel position.
    pub decoder_tp: Tp,
    /// Tensor-parallel size of the sending side.
    pub sender_tp_size: u32,
    /// Tokens to move (positions `0..tokens` of the block lists).
    pub tokens: u64,
    /// Push or pull.
    pub mode: KvMode,
    /// The decoder's blocks, in token order.
    pub dst_blocks: Vec<u32>,
    /// Pull: the senders' blocks, in token order (the same ids on every
    /// sender rank, as the ranks of one tensor-parallel engine share their
    /// block tables). Push: empty (each sender names its own).
    pub src_blocks: Vec<u32>,
}

impl KvRequest {
    /// Encodes it ([`from_bytes`](Self::from_bytes)).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 4 * (self.dst_blocks.len() + self.src_blocks.len()));
        out.extend_from_slice(REQUEST_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.slot.to_le_bytes());
        out.extend_from_slice(&self.decoder.to_le_bytes());
        out.extend_from_slice(&self.decoder_tp.rank.to_le_bytes());
        out.extend_from_slice(&self.decoder_tp.size.to_le_bytes());
        out.extend_from_slice(&self.sender_tp_size.to_le_bytes());
        out.extend_from_slice(&self.tokens.to_le_bytes());
        out.push(match self.mode {
            KvMode::Push => 0,
            KvMode::Pull => 1,
        });
        put_u32s(&mut out, &self.dst_blocks);
        put_u32s(&mut out, &self.src_blocks);
        out
    }

    /// Decodes and checks a request from another process.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "KV request");
        r.header(REQUEST_MAGIC, VERSION)?;
        let id = r.u64("id")?;
        let slot = r.u16("slot")?;
        let decoder = r.u64("decoder")?;
        let (rank, size) = (r.u32("decoder tp rank")?, r.u32("decoder tp size")?);
        let decoder_tp = Tp::new(rank, size).map_err(|e| r.error(e.to_string()))?;
        let sender_tp_size = r.u32("sender tp size")?;
        if sender_tp_size == 0 {
            return Err(r.error("sender tp size 0"));
        }
        let tokens = r.u64("tokens")?;
        let mode = match r.u8("mode")? {
            0 => KvMode::Push,
            1 => KvMode::Pull,
            m => return Err(r.error(format!("unknown mode {m}"))),
        };
        let dst_blocks = r.u32s(MAX_REQUEST_BLOCKS, "destination blocks")?;
        let src_blocks = r.u32s(MAX_REQUEST_BLOCKS, "source blocks")?;
        if dst_blocks.is_empty() || tokens == 0 {
            return Err(r.error("no tokens"));
        }
        if (mode == KvMode::Pull) == src_blocks.is_empty() {
            return Err(r.error("source blocks come with pull requests, and only with them"));
        }
        r.finish()?;
        Ok(KvRequest { id, slot, decoder, decoder_tp, sender_tp_size, tokens, mode, dst_blocks, src_blocks })
    }
}

/// What a control message says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ControlKind {
    /// Stop: post nothing more for the request, then confirm.
    Cancel = 1,
    /// Confirmed: nothing more is posted and every posted operation has
    /// completed.
    Stopped = 2,
    /// The sender gave up, with a reason (after its operations drained).
    Failed = 3,
    /// Pull: the decoder's reads are done, the sender may free its blocks.
    Release = 4,
    /// The decoder gave up, with a reason: stop, then confirm.
    Abort = 5,
}

/// A control message, as the payload of a service message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Control {
    pub kind: ControlKind,
    pub id: u64,
    /// The sender's tensor-parallel rank (messages from senders), or the
    /// decoder's (messages from decoders).
    pub rank: u32,
    /// Where an answer goes.
    pub reply_service: u16,
    pub reply_to: EngineAddress,
    pub reason: String,
}

impl Control {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.reason.len());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.extend_from_slice(&self.reply_service.to_le_bytes());
        put_bytes(&mut out, &self.reply_to.to_bytes());
        let mut end = self.reason.len().min(MAX_REASON);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        put_bytes(&mut out, &self.reason.as_bytes()[..end]);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "KV control message");
        let kind = match r.u8("kind")? {
            1 => ControlKind::Cancel,
            2 => ControlKind::Stopped,
            3 => ControlKind::Failed,
            4 => ControlKind::Release,
            5 => ControlKind::Abort,
            k => return Err(r.error(format!("unknown kind {k}"))),
        };
        let id = r.u64("id")?;
        let rank = r.u32("rank")?;
        let reply_service = r.u16("reply service")?;
        let reply_to = EngineAddress::from_bytes(r.bytes(4096, "reply address")?)?;
        let reason = String::from_utf8_lossy(r.bytes(MAX_REASON, "reason")?).into_owned();
        r.finish()?;
        Ok(Control { kind, id, rank, reply_service, reply_to, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request() -> KvRequest {
        KvRequest {
            id: 7,
            slot: 3,
            decoder: 99,
            decoder_tp: Tp { rank: 1, size: 2 },
            sender_tp_size: 4,
            tokens: 40,
            mode: KvMode::Push,
            dst_blocks: vec![5, 6, 9],
            src_blocks: vec![],
        }
    }

    #[test]
    fn requests_round_trip_and_are_checked() {
        let r = request();
        assert_eq!(KvRequest::from_bytes(&r.to_bytes()).unwrap(), r);
        let pull = KvRequest { mode: KvMode::Pull, src_blocks: vec![1, 2, 3], ..request() };
        assert_eq!(KvRequest::from_bytes(&pull.to_bytes()).unwrap(), pull);
        let bad = KvRequest { mode: KvMode::Pull, ..request() };
        assert!(KvRequest::from_bytes(&bad.to_bytes()).is_err());
        let mut bytes = r.to_bytes();
        bytes.push(0);
        assert!(KvRequest::from_bytes(&bytes).is_err());
        bytes.truncate(10);
        assert!(KvRequest::from_bytes(&bytes).is_err());
        assert_eq!(r.to_string().parse::<KvRequest>().unwrap(), r);
        assert!("zz".parse::<KvRequest>().is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = KvRequest::from_bytes(&bytes);
            let _ = KvCacheDesc::from_bytes(&bytes);
            let _ = Control::decode(&bytes);
        }

        #[test]
        fn mutated_requests_never_panic(flip in 0usize..60, value in any::<u8>()) {
            let mut bytes = request().to_bytes();
            let i = flip % bytes.len();
            bytes[i] = value;
            if let Ok(r) = KvRequest::from_bytes(&bytes) {
                prop_assert_eq!(r.to_bytes(), bytes);
            }
        }
    }
}
