//! A rank's weights descriptor: its tensors, where a destination keeps
//! them, and how to signal it. Versioned, validated on decode.

use super::plan::{part_count, MAX_SOURCES};
use super::spec::{Role, Share, TensorSpec, MAX_DIMS, MAX_NAME};
use crate::error::{Error, Result};
use crate::wire::{from_hex, put_bytes, to_hex, Reader};
use crate::{EngineAddress, MrDesc};

const MAGIC: &[u8; 3] = b"SWT";
const VERSION: u8 = 1;
const MAX_MR_DESC: usize = 4096;
/// Most tensors one rank may describe.
pub const MAX_TENSORS: usize = 1 << 20;
/// Most regions one destination may keep its tensors in.
pub const MAX_REGIONS: usize = 1 << 20;

/// Where a rank keeps one tensor share: a region of its own (an index in
/// its region list) and the offset of the share's first byte in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorPlace {
    /// The tensor and this rank's share.
    pub spec: TensorSpec,
    /// Index of the region.
    pub region: u32,
    /// Offset of the share in the region.
    pub offset: u64,
}

/// One rank of a weights group as every other rank sees it. Send its
/// [`to_bytes`](Self::to_bytes) to every rank of the group (in Python:
/// through the job's `torch.distributed` group); every rank plans from
/// the same list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightsRankDesc {
    /// Source or destination.
    pub role: Role,
    /// The rank among its side's ranks.
    pub rank: u32,
    /// [`PlanConfig::chunk`](super::PlanConfig::chunk): every rank must
    /// plan with the same.
    pub chunk: u64,
    /// Its tensors, in its order.
    pub tensors: Vec<TensorPlace>,
    /// A destination's tensor regions (take remote writes); empty for a
    /// source.
    pub regions: Vec<MrDesc>,
    /// Takes completion records and broadcast flags (a destination), or
    /// liveness pings (a source).
    pub control: MrDesc,
    /// A destination's immediate slots: records, broadcast parts.
    pub slots: [u16; 2],
}

/// Bytes of a destination's control region: a completion record per
/// possible source, then a flag per broadcast part.
pub(crate) fn control_len<'a>(specs: impl Iterator<Item = &'a TensorSpec>, chunk: u64) -> u64 {
    (MAX_SOURCES as u64 + part_count(specs, chunk)) * 8
}

impl WeightsRankDesc {
    /// The rank's engine.
    pub fn owner(&self) -> &EngineAddress {
        self.control.owner()
    }

    /// The tensor specs, in order.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.tensors.iter().map(|t| t.spec.clone()).collect()
    }

    /// Encodes it ([`from_bytes`](Self::from_bytes)).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.tensors.len() * 64);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(match self.role {
            Role::Source => 0,
            Role::Destination => 1,
        });
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.extend_from_slice(&self.chunk.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u32).to_le_bytes());
        for t in &self.tensors {
            put_bytes(&mut out, t.spec.name.as_bytes());
            out.extend_from_slice(&t.spec.elem_bytes.to_le_bytes());
            out.push(t.spec.shape.len() as u8);
            for d in &t.spec.shape {
                out.extend_from_slice(&d.to_le_bytes());
            }
            match t.spec.share {
                Share::Replicated => out.push(0),
                Share::Split { dim, start, end } => {
                    out.push(1);
                    out.push(dim);
                    out.extend_from_slice(&start.to_le_bytes());
                    out.extend_from_slice(&end.to_le_bytes());
                }
            }
            out.extend_from_slice(&t.region.to_le_bytes());
            out.extend_from_slice(&t.offset.to_le_bytes());
        }
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for r in &self.regions {
            put_bytes(&mut out, &r.to_bytes());
        }
        put_bytes(&mut out, &self.control.to_bytes());
        for s in self.slots {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out
    }

    /// Decodes and checks a descriptor from another process: every spec is
    /// well formed, a destination's shares lie inside its regions, and
    /// every region belongs to one engine and takes remote writes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "weights rank descriptor");
        r.header(MAGIC, VERSION)?;
        let role = match r.u8("role")? {
            0 => Role::Source,
            1 => Role::Destination,
            x => return Err(r.error(format!("role {x}"))),
        };
        let rank = r.u32("rank")?;
        let chunk = r.u64("chunk")?;
        if chunk == 0 {
            return Err(r.error("a zero chunk"));
        }
        let n = r.u32("tensor count")? as usize;
        if n > MAX_TENSORS {
            return Err(r.error(format!("{n} tensors, more than {MAX_TENSORS}")));
        }
        let mut tensors = Vec::with_capacity(n.min(bytes.len() / 16));
        for _ in 0..n {
            let name = std::str::from_utf8(r.bytes(MAX_NAME, "tensor name")?)
                .map_err(|_| r.error("a tensor name is not UTF-8"))?
                .to_string();
            let elem_bytes = r.u32("element size")?;
            let dims = r.u8("dimensions")? as usize;
            if dims > MAX_DIMS {
                return Err(r.error(format!("{dims} dimensions")));
            }
            let mut shape = Vec::with_capacity(dims);
            for _ in 0..dims {
                shape.push(r.u64("shape")?);
            }
            let share = match r.u8("share")? {
                0 => Share::Replicated,
                1 => Share::Split {
                    dim: r.u8("split dimension")?,
                    start: r.u64("split start")?,
                    end: r.u64("split end")?,
                },
                x => return Err(r.error(format!("share kind {x}"))),
            };
            let spec = TensorSpec { name, elem_bytes, shape, share };
            spec.validate().map_err(|e| r.error(e.to_string()))?;
            let region = r.u32("region")?;
            let offset = r.u64("offset")?;
            tensors.push(TensorPlace { spec, region, offset });
        }
        let regions_n = r.u32("region count")? as usize;
        if regions_n > MAX_REGIONS {
            return Err(r.error(format!("{regions_n} regions")));
        }
        let mut regions = Vec::with_capacity(regions_n.min(bytes.len() / 32));
        for _ in 0..regions_n {
            regions.push(MrDesc::from_bytes(r.bytes(MAX_MR_DESC, "region")?)?);
        }
        let control = MrDesc::from_bytes(r.bytes(MAX_MR_DESC, "control region")?)?;
        let slots = [r.u16("records slot")?, r.u16("parts slot")?];
        r.finish()?;
        let bad = |m: String| Err(Error::InvalidDescriptor { what: "weights rank descriptor", reason: m });
        if !control.access().remote_write {
            return bad("the control region does not take remote writes".into());
        }
        if regions.iter().any(|d| d.owner() != control.owner()) {
            return bad("the regions belong to different engines".into());
        }
        match role {
            Role::Source if !regions.is_empty() => return bad("a source lists regions".into()),
            Role::Destination => {
                if regions.iter().any(|d| !d.access().remote_write) {
                    return bad("a tensor region does not take remote writes".into());
                }
                for t in &tensors {
                    let Some(region) = regions.get(t.region as usize) else {
                        return bad(format!("tensor {:?} is in region {} of {}", t.spec.name, t.region, regions.len()));
                    };
                    if t.offset.checked_add(t.spec.share_bytes()).is_none_or(|end| end > region.len()) {
                        return bad(format!("tensor {:?} does not fit in its region", t.spec.name));
                    }
                }
                if control.len() < control_len(tensors.iter().map(|t| &t.spec), chunk) {
                    return bad("the control region is too small for the tensors".into());
                }
            }
            Role::Source => {}
        }
        Ok(WeightsRankDesc { role, rank, chunk, tensors, regions, control, slots })
    }
}

impl std::fmt::Display for WeightsRankDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&to_hex(&self.to_bytes()))
    }
}

impl std::str::FromStr for WeightsRankDesc {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bytes = from_hex(s.trim())
            .ok_or_else(|| Error::InvalidDescriptor { what: "weights rank descriptor", reason: "not hex".into() })?;
        Self::from_bytes(&bytes)
    }
}
