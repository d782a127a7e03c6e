//! RL weight transfer: trainer ranks (sources) push new weights straight
//! into inference ranks' (destinations') parameter memory after every
//! training step, by a static plan computed once and replayed.
//!
//! # Describe
//! Each rank describes the tensors it holds (a source) or needs (a
//! destination) as [`TensorSpec`]s: name, element size, full shape, and
//! its [`Share`]: the whole tensor, or a range along one dimension (FSDP
//! dim-0 shards, TP column or row splits, uneven ranges). A
//! [`WeightsRank`] places the shares in registered memory and gives a
//! [`WeightsRankDesc`]; every rank sends its descriptor's bytes to every
//! other (in Python through the job's `torch.distributed` group), and
//! [`WeightsRank::connect`] plans from the full list.
//!
//! # Plan
//! [`plan`] (pure; the same on every rank) gives every destination byte to
//! exactly one source write: a strided copy between the two shares' own
//! row-major layouts, so a source reads only its share and a destination
//! needs no staging. Bytes held by several sources (replicas) are cut into
//! parts of [`PlanConfig::chunk`] and spread over the replicas (each
//! source's load is within one part of the ideal); the engine spreads each
//! request over the NICs of both ends. Descriptions that cannot be planned
//! are refused before anything moves, with a typed [`PlanError`] naming
//! the tensor and ranks. The plan's size grows with the number of
//! (destination share, source share) pairs that meet, never with bytes.
//!
//! # Steps
//! A source's [`WeightsGroup::push`] posts its writes tensor by tensor
//! (optionally calling a prepare hook first, bounded by a watermark, see
//! [`WeightsGroup::push_with`]); once all of its writes to a destination
//! have completed, it writes an 8-byte completion record (the step
//! number) into that destination's control region with one immediate
//! (reserved space [`ImmSpace::Weights`](crate::ImmSpace), slot of the
//! destination, `sub` = source rank). A destination's
//! [`WeightsGroup::wait`] returns once every source that writes to it has
//! recorded this step: one immediate per source per step. Records carry
//! the step, so an immediate of an older step (one that failed) never
//! completes a newer one, and a step number not above the last one done
//! is refused on both sides. While waiting, a destination pings the
//! sources it waits for: a dead source fails the step with
//! [`Error::PeerUnreachable`](crate::Error) naming its rank, address and
//! the tensors it writes here, within [`WeightsConfig::timeout`]. A failed
//! group refuses further steps; build a new one.
//!
//! Destinations must not be read while a step is in flight (the usual RL
//! loop pauses generation, pushes, waits, resumes).
//!
//! # Broadcast
//! With [`Mode::Broadcast`], for one source (or a few) feeding many
//! replicas: every destination describes the same shares, each tensor is
//! held whole by some source, and the destinations form a chain. The
//! sources write each part (a tensor share cut along dimension 0 into at
//! most `chunk` bytes) into destination 0 and then flag it (8 bytes and an
//! immediate, after the part's write completed); destination `i` forwards
//! each part as soon as its flag is there, and flags it at `i + 1`. Each
//! byte crosses each link once, so the root's links carry one copy
//! whatever the number of destinations; the last destination has the step
//! after `destinations` part-times of pipeline latency. A destination's
//! `wait` drives its forwarding and returns once it has received and
//! forwarded everything. A dead link in the chain fails every destination
//! after it (naming the rank it waited for).
//!
//! # Choices made here
//! * At most 256 sources (the immediate's sub byte names the source).
//! * Tensor names match the two sides; a name on one side only is an
//!   error (filter what the other side does not need, e.g. optimizer
//!   state, before describing).
//! * Dtype conversion (bf16 to fp8, say) belongs in the prepare hook: the
//!   plan moves bytes, so both sides describe the element size sent.

mod group;
mod plan;
mod spec;
mod wire;

pub use group::{Mode, TensorSlot, WeightsConfig, WeightsGroup, WeightsRank};
pub use plan::{
    broadcast_parts, plan, plan_broadcast, BroadcastPart, BroadcastPlan, PlanConfig, PlannedWrite, WeightsPlan,
    MAX_SOURCES,
};
pub use spec::{PlanError, Role, Share, TensorSpec, MAX_DIMS, MAX_NAME};
pub use wire::{TensorPlace, WeightsRankDesc, MAX_REGIONS, MAX_TENSORS};
