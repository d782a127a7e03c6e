//! Expert-parallel dispatch and combine (MoE).
//!
//! Every rank of a group holds `experts / ranks` experts. [`dispatch`]
//! sends each token's hidden state to the ranks of its top-k experts and
//! gives each rank its experts' copies, packed expert by expert;
//! [`combine`] sends the expert outputs back and sums them per token,
//! weighted. Built on the engine's public API only: strided copies with
//! one immediate each, reserved immediates, pings.
//!
//! # Protocol
//! 1. **Counts.** Each rank writes its per-expert counts (`experts` u32s)
//!    into every rank's counts region, with an immediate. Every rank then
//!    knows every rank's counts, and so where every copy lands
//!    ([`plan::Placement`]): a rank's pool is packed expert by expert,
//!    sources in rank order, each source's copies in (token, k) order. The
//!    layout, and so every output, is the same on every rerun.
//! 2. **Data.** Each rank writes its copies for each destination (one
//!    request per destination: a copy list of one range per expert, and
//!    the copies' source records), with one immediate. A destination
//!    expects one such immediate from every other rank, a count known
//!    without looking at the data; nothing assumes ordering. A pool holds
//!    [`MoeConfig::capacity`] copies, not the worst case: a rank that
//!    receives more takes them in rounds (it releases its pool to every
//!    sender with an immediate after each round). Everyone computes the
//!    same rounds from the counts.
//! 3. **Combine.** Each rank writes each expert-output row into its
//!    token's rank's combine region at the token's `(t, k)` slot, and one
//!    immediate per destination. Each rank sums its tokens' rows in k
//!    order, in f32.
//!
//! # Memory
//! Per rank ([`MoeConfig::memory`]): counts `ranks * experts * 4`; pool
//! `capacity * (token_bytes + 8)`; combine `max_tokens * top_k * hidden *
//! dtype`; staging (local) `max_tokens * top_k * (token_bytes + 8) +
//! capacity * hidden * dtype`. DeepSeek-V3 decode on 64 ranks (128 tokens,
//! hidden 7168 bf16, 256 experts, top-8, the default capacity of 2048
//! copies) receives into 44.1 MB (counts 0.07, pool 29.4, combine 14.7);
//! DeepEP's low-latency receive buffers for the same shape are 2 x 470.3
//! MB ([`deepep_low_latency_receive_bytes`]): 1/21 of it.
//!
//! # Failure
//! Every wait has the call's deadline ([`MoeConfig::timeout`]), and the
//! ranks waited for are pinged meanwhile: a rank that died or went quiet
//! fails the call on the others with [`Error::PeerUnreachable`](crate::Error)
//! naming it, never a hang. A failed group refuses further calls; build a
//! new one from the survivors.
//!
//! # Choices made here
//! * A token that routes twice to one rank is sent twice (once per
//!   expert), as the expert layout needs.
//! * Calls run one at a time on a rank, in the same order on every rank.
//! * Host memory; the protocol makes no CPU-only assumption beyond the
//!   packing and the sum, which GPU kernels would do on device.
//!
//! [`dispatch`]: MoeGroup::dispatch
//! [`combine`]: MoeGroup::combine

mod config;
mod group;
pub mod plan;
mod wire;

pub use config::{deepep_low_latency_receive_bytes, MoeConfig, MoeDtype, MoeMemory};
pub use group::{bf16_to_f32, f32_to_bf16, DispatchInFlight, Dispatched, MoeGroup, MoeHandle, MoeRank};
pub use wire::MoeRankDesc;
