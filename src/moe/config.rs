//! A MoE group's shape and sizes, and the memory they take.

use std::time::Duration;

use super::plan::Shape;
use crate::error::{Error, Result};

/// Element type of the expert outputs combine sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MoeDtype {
    /// 4-byte floats.
    F32,
    /// bfloat16 (converted to f32 to accumulate, rounded to nearest even).
    Bf16,
}

impl MoeDtype {
    /// Bytes per element.
    pub fn size(self) -> u32 {
        match self {
            MoeDtype::F32 => 4,
            MoeDtype::Bf16 => 2,
        }
    }
}

/// What every rank of a MoE group agrees on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    /// Ranks in the group (at most 256).
    pub ranks: u32,
    /// Experts in all, a multiple of `ranks` (`experts / ranks` per rank).
    pub experts: u32,
    /// Experts per token.
    pub top_k: u32,
    /// Most tokens a rank passes to one dispatch.
    pub max_tokens: u32,
    /// Bytes dispatched per token: the hidden state, and any per-token
    /// scales (fp8), as opaque bytes.
    pub token_bytes: u32,
    /// Elements per token of the expert outputs (combine).
    pub hidden: u32,
    /// Their element type.
    pub dtype: MoeDtype,
    /// Items (a token's trip to a rank) a rank's receive pool holds. A rank
    /// that receives more takes them in rounds of this many (exact,
    /// slower); the default (`None`) is `2 * max_tokens * top_k`, at least
    /// twice a rank's share under even routing.
    pub capacity: Option<u32>,
    /// A call fails, naming the rank it waited for, when a phase has not
    /// completed this long after it started (default 10 s).
    pub timeout: Duration,
}

/// Bytes of a group's regions, per rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeMemory {
    /// Every rank's per-expert and per-rank counts (`ranks * (experts +
    /// ranks) * 4`).
    pub counts: u64,
    /// The receive pool: `capacity` items (a token sent to a rank once) of
    /// `token_bytes` and an `8 + 4 * top_k`-byte record each.
    pub pool: u64,
    /// The expert outputs of this rank's tokens: `max_tokens * top_k` rows
    /// of `hidden * dtype` bytes.
    pub combine: u64,
    /// Send staging (local only): this rank's items (`max_tokens *
    /// min(ranks, top_k)` of `token_bytes` and a record) and `capacity`
    /// rows of expert outputs.
    pub staging: u64,
}

impl MoeMemory {
    /// What peers write into: counts, pool and combine.
    pub fn receive(&self) -> u64 {
        self.counts + self.pool + self.combine
    }

    /// Everything registered.
    pub fn total(&self) -> u64 {
        self.receive() + self.staging
    }
}

/// Bytes of an item's record in the pool: token (u32), source rank (u16),
/// pairs (u16), then `top_k` (k, local expert) pairs of two u16s.
pub(crate) fn record_bytes(top_k: u32) -> u64 {
    8 + 4 * u64::from(top_k)
}

impl MoeConfig {
    /// A configuration with the defaults (`capacity: None`, 10 s timeout).
    pub fn new(ranks: u32, experts: u32, top_k: u32, max_tokens: u32, hidden: u32, dtype: MoeDtype) -> Self {
        MoeConfig {
            ranks,
            experts,
            top_k,
            max_tokens,
            token_bytes: hidden * dtype.size(),
            hidden,
            dtype,
            capacity: None,
            timeout: Duration::from_secs(10),
        }
    }

    pub(crate) fn shape(&self) -> Shape {
        Shape { ranks: self.ranks, experts: self.experts, top_k: self.top_k }
    }

    /// Copies the receive pool holds.
    pub fn capacity(&self) -> u64 {
        self.capacity.map_or(2 * u64::from(self.max_tokens) * u64::from(self.top_k), u64::from).max(1)
    }

    /// Most items one rank sends in a call.
    pub(crate) fn max_items(&self) -> u64 {
        u64::from(self.max_tokens) * u64::from(self.ranks.min(self.top_k))
    }

    /// Bytes of one expert-output row.
    pub fn row_bytes(&self) -> u64 {
        u64::from(self.hidden) * u64::from(self.dtype.size())
    }

    /// Checks the shape.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidRequest(format!("MoE configuration: {m}")));
        if self.ranks == 0 || self.ranks > 256 {
            return bad("1 to 256 ranks");
        }
        if self.experts == 0 || !self.experts.is_multiple_of(self.ranks) {
            return bad("the experts must be a positive multiple of the ranks");
        }
        if self.top_k == 0 || self.top_k > u32::from(u16::MAX) {
            return bad("top-k must be at least 1");
        }
        if self.token_bytes == 0 || self.hidden == 0 {
            return bad("tokens must have bytes");
        }
        Ok(())
    }

    /// The memory of one rank.
    pub fn memory(&self) -> MoeMemory {
        let copies = u64::from(self.max_tokens) * u64::from(self.top_k);
        let token = u64::from(self.token_bytes) + record_bytes(self.top_k);
        MoeMemory {
            counts: u64::from(self.ranks) * u64::from(self.experts + self.ranks) * 4,
            pool: self.capacity() * token,
            combine: copies * self.row_bytes(),
            staging: self.max_items() * token + self.capacity() * self.row_bytes(),
        }
    }

    /// A digest of everything the ranks must agree on.
    pub fn fingerprint(&self) -> u64 {
        let mut bytes = Vec::with_capacity(48);
        for v in [self.ranks, self.experts, self.top_k, self.max_tokens, self.token_bytes, self.hidden] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.push(self.dtype.size() as u8);
        bytes.extend_from_slice(&self.capacity().to_le_bytes());
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
    }
}

/// DeepEP low-latency mode's receive buffer for the same shape, from its
/// size formula: `experts * max_tokens * (16 + max(2 * hidden, hidden +
/// hidden / 128 * 4))` bytes per buffer (a 16-byte header and the larger
/// of a bf16 or an fp8-with-scales token, one slot per expert per possible
/// token), and it keeps two (odd and even calls).
pub fn deepep_low_latency_receive_bytes(experts: u64, max_tokens: u64, hidden: u64) -> u64 {
    let message = 16 + (2 * hidden).max(hidden + hidden / 128 * 4);
    2 * experts * max_tokens * message
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepSeek-V3 decode on 64 ranks: 128 tokens, hidden 7168 bf16, 256
    /// experts, top-8.
    #[test]
    fn deepseek_v3_decode_memory_against_deepep() {
        let c = MoeConfig::new(64, 256, 8, 128, 7168, MoeDtype::Bf16);
        let ours = c.memory().receive();
        let deepep = deepep_low_latency_receive_bytes(256, 128, 7168);
        assert_eq!(deepep, 2 * 256 * 128 * 14352);
        assert!(ours * 4 <= deepep, "ours {ours} vs DeepEP {deepep}");
    }
}
