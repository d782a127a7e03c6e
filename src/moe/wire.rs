//! A rank's MoE descriptor: what every other rank of the group needs to
//! write to it. Versioned, validated on decode.

use super::config::MoeConfig;
use crate::error::{Error, Result};
use crate::wire::{from_hex, put_bytes, to_hex, Reader};
use crate::{EngineAddress, MrDesc};

const MAGIC: &[u8; 3] = b"SME";
const VERSION: u8 = 1;
const MAX_MR_DESC: usize = 4096;

/// One rank of a MoE group, as the others see it: its rank, the group's
/// configuration digest, its three regions and its immediate slots. Send
/// its [`to_bytes`](Self::to_bytes) to every rank (in Python: through the
/// job's `torch.distributed` group).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoeRankDesc {
    /// The rank.
    pub rank: u32,
    /// [`MoeConfig::fingerprint`] of the configuration it was made with.
    pub config: u64,
    /// Takes every rank's per-expert counts.
    pub counts: MrDesc,
    /// The receive pool of dispatched copies (and their source records).
    pub pool: MrDesc,
    /// Takes the expert outputs of this rank's tokens (combine).
    pub combine: MrDesc,
    /// The rank's immediate slots: counts, data, freed, combine.
    pub slots: [u16; 4],
}

impl MoeRankDesc {
    /// The rank's engine.
    pub fn owner(&self) -> &EngineAddress {
        self.pool.owner()
    }

    /// Encodes it ([`from_bytes`](Self::from_bytes)).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.extend_from_slice(&self.config.to_le_bytes());
        for d in [&self.counts, &self.pool, &self.combine] {
            put_bytes(&mut out, &d.to_bytes());
        }
        for s in self.slots {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out
    }

    /// Decodes and checks a descriptor from another process: every region
    /// takes remote writes and belongs to one engine.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "MoE rank descriptor");
        r.header(MAGIC, VERSION)?;
        let rank = r.u32("rank")?;
        let config = r.u64("config")?;
        let mut regions = Vec::with_capacity(3);
        for what in ["counts region", "pool region", "combine region"] {
            let d = MrDesc::from_bytes(r.bytes(MAX_MR_DESC, what)?)?;
            if !d.access().remote_write {
                return Err(r.error(format!("the {what} does not take remote writes")));
            }
            regions.push(d);
        }
        if regions.iter().any(|d| d.owner() != regions[0].owner()) {
            return Err(r.error("the regions belong to different engines"));
        }
        let mut slots = [0u16; 4];
        for (i, s) in slots.iter_mut().enumerate() {
            *s = r.u16(["counts slot", "data slot", "freed slot", "combine slot"][i])?;
        }
        r.finish()?;
        let combine = regions.pop().expect("three regions");
        let pool = regions.pop().expect("three regions");
        let counts = regions.pop().expect("three regions");
        Ok(MoeRankDesc { rank, config, counts, pool, combine, slots })
    }

    /// Checks it against the group's configuration: its rank is in the
    /// group and its regions are large enough.
    pub(crate) fn check(&self, config: &MoeConfig, rank: u32) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(format!("MoE rank {rank}'s descriptor: {m}")));
        if self.rank != rank {
            return bad(format!("it says rank {}", self.rank));
        }
        if self.config != config.fingerprint() {
            return bad("it was made for another configuration (ranks, experts, top-k, sizes)".into());
        }
        let m = config.memory();
        if self.counts.len() < m.counts || self.pool.len() < m.pool || self.combine.len() < m.combine {
            return bad("a region is smaller than the configuration needs".into());
        }
        Ok(())
    }
}

impl std::fmt::Display for MoeRankDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&to_hex(&self.to_bytes()))
    }
}

impl std::str::FromStr for MoeRankDesc {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bytes = from_hex(s.trim())
            .ok_or_else(|| Error::InvalidDescriptor { what: "MoE rank descriptor", reason: "not hex".into() })?;
        Self::from_bytes(&bytes)
    }
}
