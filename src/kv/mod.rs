//! KV-cache transfer for disaggregated prefill/decode.
//!
//! A decode rank allocates blocks for a request and expects its KV; the
//! prefill ranks put each layer into those blocks as soon as it is
//! computed (push), or say it is ready and the decoder reads it (pull).
//! Every request ends in exactly one outcome on each side, within a bound,
//! and a decoder's blocks are its own again once its outcome is reported.
//!
//! # Pieces
//! * [`KvLayout`]: where one rank's cache bytes are, as byte strides
//!   (named constructors for vLLM flash-attention, FlashInfer NHD/HND, MLA,
//!   per-layer tensors or one pool). [`KvCache`] registers the tensors
//!   and gives a [`KvCacheDesc`]: the layout plus one memory descriptor per
//!   tensor, never one per block. Exchange it once at start-up.
//! * The decoder calls [`KvCache::expect`] with the senders' descriptors
//!   and its blocks, and sends [`KvRecv::request`]'s bytes to every sender
//!   rank (by the serving engine's own channel). Each sender calls
//!   [`KvCache::push`] with its blocks and then [`KvSend::send_layers`] as
//!   layers finish.
//!
//! # What moves
//! The plan ([`plan`]) maps tokens by position (block sizes may differ
//! between the sides), gives each sender rank only the KV heads it shares
//! with the decoder rank (prefill TP `p` to decode TP `d`, either larger),
//! and coalesces runs contiguous on both sides. Head slices that are
//! strided per token (NHD) become strided copies
//! ([`CopyList`](crate::CopyList)): one engine request per layer, one work
//! item per row, no request per token. The copy list is computed once per
//! request and replayed for every layer, so a layer's submit costs no work
//! per block. A head held by several sender ranks (more prefill ranks than
//! KV heads; MLA's latent, held by all) is sent by one of them per layer,
//! chosen deterministically to spread the layers.
//!
//! # Completion
//! Each layer's request carries one immediate from the [reserved
//! range](crate::RESERVED_IMM_BASE) (space [`ImmSpace::Kv`](crate::ImmSpace),
//! the decoder's slot for the request, the layer index), so a KV request
//! can never be confused with a user's immediates or another request's.
//! The decoder counts, per layer, one immediate per sender rank that sends
//! that layer: `layers x senders`, computed from the request alone. A layer
//! has landed when its count is reached ([`KvRecv::layer_landed`]).
//!
//! # Failure and cancellation
//! Control messages (cancel, stopped, failed, release) are two-sided
//! service messages (see [`MessagePool`](crate::MessagePool)). A sender
//! that fails (its write fails, or [`KvSend::fail`]) tells the decoder why
//! once its writes in flight have completed; a decoder that cancels
//! ([`KvRecv::cancel`]) tells every sender, and each confirms once nothing
//! more is posted and every posted write has completed. The decoder's
//! outcome, whatever it is, is reported only after every sender has
//! confirmed (or is dead): the blocks can then be reused without a late
//! write landing in them. A peer that goes quiet is pinged every
//! [`KvConfig::heartbeat`]; a dead one is noticed at the first failed ping
//! (a killed process on tcp or shm: at once; a stopped one: within the
//! engine's request timeout), and only its own requests fail.
//!
//! # Choices made here
//! * In pull mode every sender rank holds the request's source blocks
//!   under the same ids (the ranks of one TP engine share block tables).
//! * A request moves every layer of the cache.
//! * Block ids are `u32`; a cache has at most [`MAX_LAYERS`] layers (the
//!   layer is the low byte of the immediate).

mod cache;
mod layout;
mod outcome;
pub mod plan;
mod recv;
mod send;
mod wire;

pub use cache::{KvCache, KvConfig};
pub use layout::{heads_of, KvKind, KvLayout, KvShape, KvTensors, Tp, MAX_LAYERS};
pub use recv::{KvExpect, KvRecv};
pub use send::KvSend;
pub use wire::{KvCacheDesc, KvMode, KvRequest, MAX_REQUEST_BLOCKS};
