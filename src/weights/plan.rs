//! The schedule: which source writes which bytes into which destination.
//!
//! Pure and deterministic (no I/O, no clock, no hash-order iteration):
//! every rank computes the same plan from the same descriptions. A write
//! is one [`Strided`] copy between a source's share of a tensor and a
//! destination's share of the same tensor, in the shares' own row-major
//! coordinates (byte offsets from each share's start).
//!
//! # How bytes are assigned
//! For every destination share, the planner intersects it with every
//! distinct source share of the tensor (identical source shares are
//! replicas of the same bytes). An intersection is a box of the full
//! tensor; in the two shares' row-major layouts a box restricted along at
//! most two dimensions is a few strided copies (one for 2-D tensors). A
//! box held by one source goes to it. A box held by several replicas is
//! cut into parts of at most [`PlanConfig::chunk`] bytes (by rows, or by
//! bytes for one long row), each given to the replica with the fewest
//! bytes so far (lowest rank on ties): list scheduling, so each source's
//! load is within one part of the ideal. The NICs of a source share its
//! load through the engine, which walks every NIC pair piece by piece.

use std::collections::HashMap;

use super::spec::{PlanError, Role, TensorSpec, MAX_DIMS};
use crate::Strided;

/// FNV-1a: the index's names are hashed once per rank and tensor, and
/// come from the ranks themselves (no adversary to defend against here).
type Fnv = std::hash::BuildHasherDefault<FnvHasher>;

#[derive(Default)]
struct FnvHasher(u64);

impl std::hash::Hasher for FnvHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        self.0 = h;
    }
}

/// The most sources a group may have (the immediate's sub byte names the
/// source).
pub const MAX_SOURCES: usize = 256;

/// How the planner cuts replicated bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanConfig {
    /// Bytes held by several sources are cut into parts of at most this
    /// many bytes to balance them; broadcast parts are at most this long.
    pub chunk: u64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig { chunk: 4 << 20 }
    }
}

/// One write of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedWrite {
    /// The source rank.
    pub source: u32,
    /// The destination rank.
    pub dest: u32,
    /// Index of the tensor in the source's description.
    pub src_tensor: u32,
    /// Index of the tensor in the destination's description.
    pub dst_tensor: u32,
    /// Offsets from the start of each side's share.
    pub copy: Strided,
}

/// The schedule of a step: computed once, replayed every step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightsPlan {
    /// Each source's writes, grouped by tensor.
    by_source: Vec<Vec<PlannedWrite>>,
    senders: Vec<Vec<u32>>,
    load: Vec<u64>,
}

impl WeightsPlan {
    /// Every write, source by source.
    pub fn writes(&self) -> impl Iterator<Item = &PlannedWrite> {
        self.by_source.iter().flatten()
    }

    /// Source `s`'s writes, grouped by tensor (a tensor's writes are
    /// consecutive, destination by destination).
    pub fn source_writes(&self, s: u32) -> &[PlannedWrite] {
        &self.by_source[s as usize]
    }

    /// The sources that write to destination `d` (each sends it one
    /// completion record, so this is the number of immediates a complete
    /// step delivers to `d`).
    pub fn senders(&self, d: u32) -> &[u32] {
        &self.senders[d as usize]
    }

    /// Bytes each source writes per step.
    pub fn load(&self) -> &[u64] {
        &self.load
    }

    /// Bytes written per step, in all.
    pub fn bytes(&self) -> u64 {
        self.load.iter().sum()
    }

    /// Number of sources.
    pub fn sources(&self) -> u32 {
        self.by_source.len() as u32
    }

    /// Number of destinations.
    pub fn dests(&self) -> u32 {
        self.senders.len() as u32
    }
}

/// A share as a box of the full tensor: `lo` and extent per dimension.
#[derive(Clone, Copy, Debug)]
struct Shard {
    n: usize,
    dims: [u64; MAX_DIMS],
    lo: [u64; MAX_DIMS],
    ext: [u64; MAX_DIMS],
    elem: u64,
}

impl Shard {
    fn of(spec: &TensorSpec) -> Self {
        let d = spec.dims();
        let mut s = Shard { n: d.len(), dims: [1; MAX_DIMS], lo: [0; MAX_DIMS], ext: [1; MAX_DIMS], elem: 0 };
        s.dims[..d.len()].copy_from_slice(d);
        s.ext[..d.len()].copy_from_slice(d);
        s.elem = u64::from(spec.elem_bytes);
        let (dim, start, end) = spec.range();
        s.lo[dim] = start;
        s.ext[dim] = end - start;
        s
    }

    /// The whole tensor.
    fn full(&self) -> Self {
        Shard { lo: [0; MAX_DIMS], ext: self.dims, ..*self }
    }

    /// Byte strides of the share's row-major layout.
    fn strides(&self) -> [u64; MAX_DIMS] {
        let mut s = [0; MAX_DIMS];
        let mut acc = self.elem;
        for d in (0..self.n).rev() {
            s[d] = acc;
            acc *= self.ext[d];
        }
        s
    }
}

/// Appends the copies of the box `lo..hi` (full-tensor indices) from share
/// `src` to share `dst`, and returns its bytes. The box must lie in both
/// shares and differ from the full tensor along at most two dimensions.
fn box_copies(src: &Shard, dst: &Shard, lo: &[u64; MAX_DIMS], hi: &[u64; MAX_DIMS], out: &mut Vec<Strided>) -> u64 {
    let n = src.n;
    if (0..n).any(|d| lo[d] >= hi[d]) {
        return 0;
    }
    let full = |d: usize| lo[d] == 0 && hi[d] == src.dims[d];
    let (ss, ds) = (src.strides(), dst.strides());
    // The innermost restricted dimension: everything inside it is whole,
    // so each of its index ranges is one contiguous run on both sides.
    let k = (0..n).rev().find(|&d| !full(d)).unwrap_or(0);
    let row_len = (hi[k] - lo[k]) * ss[k];
    let offset = |sh: &Shard, st: &[u64; MAX_DIMS]| (0..n).map(|d| (lo[d] - sh.lo[d]) * st[d]).sum::<u64>();
    let (src_base, dst_base) = (offset(src, &ss), offset(dst, &ds));
    if k == 0 {
        out.push(Strided::contiguous(src_base, dst_base, row_len));
        return row_len;
    }
    let (src_stride, dst_stride) = (ss[k - 1], ds[k - 1]);
    let outer = |a: usize, b: usize| (a..b).map(|d| src.dims[d]).product::<u64>();
    match (0..k).rev().find(|&d| !full(d)) {
        None => {
            let rows = outer(0, k);
            out.push(Strided { src_offset: src_base, dst_offset: dst_base, rows, row_len, src_stride, dst_stride });
            rows * row_len
        }
        Some(j) => {
            // One copy per index of the (whole) dimensions outside j.
            let rows = (hi[j] - lo[j]) * outer(j + 1, k);
            let copies = outer(0, j);
            let (cs, cd) = if j == 0 { (0, 0) } else { (ss[j - 1], ds[j - 1]) };
            for c in 0..copies {
                out.push(Strided {
                    src_offset: src_base + c * cs,
                    dst_offset: dst_base + c * cd,
                    rows,
                    row_len,
                    src_stride,
                    dst_stride,
                });
            }
            copies * rows * row_len
        }
    }
}

/// Cuts `c` into parts of at most `chunk` bytes (whole rows where a row
/// fits).
fn cut(c: Strided, chunk: u64, out: &mut Vec<Strided>) {
    let chunk = chunk.max(1);
    if c.len() <= chunk {
        out.push(c);
    } else if c.rows > 1 && c.row_len <= chunk {
        let per = chunk / c.row_len;
        let mut r = 0;
        while r < c.rows {
            let rows = per.min(c.rows - r);
            out.push(Strided {
                src_offset: c.src_offset + r * c.src_stride,
                dst_offset: c.dst_offset + r * c.dst_stride,
                rows,
                ..c
            });
            r += rows;
        }
    } else {
        for r in 0..c.rows {
            let mut at = 0;
            while at < c.row_len {
                let len = chunk.min(c.row_len - at);
                out.push(Strided::contiguous(
                    c.src_offset + r * c.src_stride + at,
                    c.dst_offset + r * c.dst_stride + at,
                    len,
                ));
                at += len;
            }
        }
    }
}

/// A share of one rank, normalised: a split that covers its whole
/// dimension is the whole tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    dim: usize,
    start: u64,
    end: u64,
}

fn range_of(spec: &TensorSpec) -> Range {
    let (dim, start, end) = spec.range();
    if start == 0 && end == spec.dims()[dim] {
        Range { dim: 0, start: 0, end: spec.dims()[0] }
    } else {
        Range { dim, start, end }
    }
}

/// Replicas of one source share of a tensor.
#[derive(Debug)]
struct Group {
    range: Range,
    /// The share's geometry (the same for every replica).
    shard: Shard,
    /// `(source rank, tensor index)` of the replicas, in rank order.
    holders: std::ops::Range<usize>,
}

/// One tensor as both sides describe it.
#[derive(Debug)]
struct Tensor<'a> {
    spec: &'a TensorSpec,
    side: Role,
    rank: u32,
    /// `(range, source rank, tensor index)` of every source share; sorted
    /// by range then rank once indexed, so replicas are consecutive.
    sources: Vec<(Range, u32, u32)>,
    /// Distinct non-empty source shares, sorted, replicas grouped.
    groups: Vec<Group>,
    /// `(destination rank, tensor index)` of the destinations that need it.
    dests: Vec<(u32, u32)>,
}

impl Tensor<'_> {
    fn holders(&self, g: &Group) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.sources[g.holders.clone()].iter().map(|&(_, s, t)| (s, t))
    }
}

/// Tensor index by name.
type NameIndex<'a> = HashMap<&'a str, usize, Fnv>;

fn side_index(side: Role) -> usize {
    match side {
        Role::Source => 0,
        Role::Destination => 1,
    }
}

/// Indexes every rank's tensors by name, checking specs, element sizes
/// and shapes, duplicates, overlapping shares and one-sided names.
fn index<'a, S: AsRef<[TensorSpec]>, D: AsRef<[TensorSpec]>>(
    sources: &'a [S],
    dests: &'a [D],
) -> Result<(Vec<Tensor<'a>>, NameIndex<'a>), PlanError> {
    let total: usize =
        sources.iter().map(|s| s.as_ref().len()).sum::<usize>() + dests.iter().map(|d| d.as_ref().len()).sum::<usize>();
    let mut tensors: Vec<Tensor<'a>> = Vec::new();
    let mut by_name: NameIndex<'a> = HashMap::with_capacity_and_hasher(total.min(1 << 20), Fnv::default());
    let mut last: Vec<(u32, u32)> = Vec::new();
    let sides: [(Role, Vec<&'a [TensorSpec]>); 2] = [
        (Role::Source, sources.iter().map(|s| s.as_ref()).collect()),
        (Role::Destination, dests.iter().map(|d| d.as_ref()).collect()),
    ];
    for (side, ranks) in &sides {
        // Ranks often list the same tensors in the same order: try the
        // previous rank's tensor at this position before hashing.
        let mut prev: Vec<usize> = Vec::new();
        for (r, specs) in ranks.iter().enumerate() {
            let r = r as u32;
            let mut here = Vec::with_capacity(specs.len());
            for (t, spec) in specs.iter().enumerate() {
                spec.validate()?;
                let i = match prev.get(t) {
                    Some(&i) if tensors[i].spec.name == spec.name => i,
                    _ => *by_name.entry(spec.name.as_str()).or_insert_with(|| {
                        tensors.push(Tensor {
                            spec,
                            side: *side,
                            rank: r,
                            sources: Vec::new(),
                            groups: Vec::new(),
                            dests: Vec::new(),
                        });
                        last.push((u32::MAX, u32::MAX));
                        tensors.len() - 1
                    }),
                };
                here.push(i);
                let tensor = &mut tensors[i];
                let s = side_index(*side) as u32;
                if last[i] == (s, r) {
                    return Err(PlanError::Duplicate { name: spec.name.clone(), side: *side, rank: r });
                }
                last[i] = (s, r);
                let first = tensor.spec;
                let mismatch = |what, a: String, b: String| PlanError::Mismatch {
                    name: spec.name.clone(),
                    what,
                    a,
                    a_side: tensor.side,
                    a_rank: tensor.rank,
                    b,
                    b_side: *side,
                    b_rank: r,
                };
                if first.elem_bytes != spec.elem_bytes {
                    return Err(mismatch("element size", first.elem_bytes.to_string(), spec.elem_bytes.to_string()));
                }
                if first.shape != spec.shape {
                    return Err(mismatch("shape", format!("{:?}", first.shape), format!("{:?}", spec.shape)));
                }
                match side {
                    Role::Source => tensor.sources.push((range_of(spec), r, t as u32)),
                    Role::Destination => tensor.dests.push((r, t as u32)),
                }
            }
            prev = here;
        }
    }
    let mut ranges = Vec::new();
    for tensor in &mut tensors {
        if tensor.sources.is_empty() || tensor.dests.is_empty() {
            let (side, rank) = match tensor.dests.first() {
                Some(&(d, _)) => (Role::Destination, d),
                None => (Role::Source, tensor.sources[0].1),
            };
            return Err(PlanError::OneSided { name: tensor.spec.name.clone(), side, rank });
        }
        tensor.sources.sort_unstable();
        let src: Vec<(Range, u32)> = tensor.sources.iter().map(|&(g, r, _)| (g, r)).collect();
        check_overlap(tensor.spec, Role::Source, &src)?;
        ranges.clear();
        ranges.extend(tensor.dests.iter().map(|&(d, t)| (range_of(&dests[d as usize].as_ref()[t as usize]), d)));
        ranges.sort_unstable();
        check_overlap(tensor.spec, Role::Destination, &ranges)?;
        // Group replicas: identical non-empty ranges.
        let mut i = 0;
        while i < tensor.sources.len() {
            let (range, s, t) = tensor.sources[i];
            let mut j = i + 1;
            while j < tensor.sources.len() && tensor.sources[j].0 == range {
                j += 1;
            }
            if range.start < range.end {
                let shard = Shard::of(&sources[s as usize].as_ref()[t as usize]);
                tensor.groups.push(Group { range, shard, holders: i..j });
            }
            i = j;
        }
    }
    Ok((tensors, by_name))
}

/// Distinct non-empty shares of one side must be disjoint: along one
/// dimension, not overlapping.
fn check_overlap(spec: &TensorSpec, side: Role, entries: &[(Range, u32)]) -> Result<(), PlanError> {
    let mut prev: Option<(Range, u32)> = None;
    for &(range, rank) in entries.iter().filter(|(r, _)| r.start < r.end) {
        if let Some((p, p_rank)) = prev {
            if p != range && (p.dim != range.dim || range.start < p.end) {
                return Err(PlanError::Overlap { name: spec.name.clone(), side, a: p_rank, b: rank });
            }
        }
        prev = Some((range, rank));
    }
    Ok(())
}

/// The box where a source share and a destination share meet.
fn meet(src: &Shard, a: Range, b: Range) -> ([u64; MAX_DIMS], [u64; MAX_DIMS]) {
    let mut lo = [0u64; MAX_DIMS];
    let mut hi = src.dims;
    for r in [a, b] {
        lo[r.dim] = lo[r.dim].max(r.start);
        hi[r.dim] = hi[r.dim].min(r.end);
    }
    (lo, hi)
}

fn check_counts(sources: usize, dests: usize) -> Result<(), PlanError> {
    if sources == 0 || sources > MAX_SOURCES {
        return Err(PlanError::Group(format!("{sources} sources (1 to {MAX_SOURCES})")));
    }
    if dests == 0 || dests > u32::MAX as usize {
        return Err(PlanError::Group(format!("{dests} destinations")));
    }
    Ok(())
}

/// Plans a step from every source's and every destination's description
/// (`sources[s]` is source rank `s`'s tensors, in its order).
pub fn plan<S: AsRef<[TensorSpec]>, D: AsRef<[TensorSpec]>>(
    sources: &[S],
    dests: &[D],
    config: &PlanConfig,
) -> Result<WeightsPlan, PlanError> {
    check_counts(sources.len(), dests.len())?;
    let (tensors, _) = index(sources, dests)?;
    let (ns, nd) = (sources.len(), dests.len());
    let mut by_source: Vec<Vec<PlannedWrite>> = vec![Vec::new(); ns];
    let mut load = vec![0u64; ns];
    let mut from = vec![false; ns * nd];
    let (mut copies, mut parts) = (Vec::new(), Vec::new());
    // Tensor by tensor, so that each source's writes come out grouped by
    // tensor (its prepare hook runs once per tensor) without sorting.
    for tensor in &tensors {
        let groups = &tensor.groups;
        for &(d, dt) in &tensor.dests {
            let spec = &dests[d as usize].as_ref()[dt as usize];
            let need = spec.share_bytes();
            if need == 0 {
                continue;
            }
            let want = range_of(spec);
            let dst = Shard::of(spec);
            let mut covered = 0u64;
            // Source shares along the destination's dimension are sorted
            // and disjoint: visit only those that meet it.
            let aligned = groups.iter().all(|g| g.range.dim == want.dim);
            let start = if aligned { groups.partition_point(|g| g.range.end <= want.start) } else { 0 };
            for g in &groups[start..] {
                if aligned && g.range.start >= want.end {
                    break;
                }
                let (lo, hi) = meet(&g.shard, g.range, want);
                copies.clear();
                let bytes = box_copies(&g.shard, &dst, &lo, &hi, &mut copies);
                if bytes == 0 {
                    continue;
                }
                covered += bytes;
                parts.clear();
                if g.holders.len() == 1 {
                    parts.extend_from_slice(&copies);
                } else {
                    for &c in &copies {
                        cut(c, config.chunk, &mut parts);
                    }
                }
                for &c in &parts {
                    let (s, st) = if g.holders.len() == 1 {
                        tensor.holders(g).next().expect("a group has a holder")
                    } else {
                        tensor.holders(g).min_by_key(|(s, _)| (load[*s as usize], *s)).expect("a group has a holder")
                    };
                    load[s as usize] += c.len();
                    from[s as usize * nd + d as usize] = true;
                    by_source[s as usize].push(PlannedWrite {
                        source: s,
                        dest: d,
                        src_tensor: st,
                        dst_tensor: dt,
                        copy: c,
                    });
                }
            }
            if covered != need {
                return Err(PlanError::Uncovered { name: spec.name.clone(), dest: d, missing: need - covered });
            }
        }
    }
    let senders = (0..nd).map(|d| (0..ns as u32).filter(|&s| from[s as usize * nd + d]).collect()).collect();
    Ok(WeightsPlan { by_source, senders, load })
}

/// One part of a broadcast: rows `rows.0..rows.1` of dimension 0 of a
/// destination share (`tensor` in the destinations' common description),
/// `bytes` of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BroadcastPart {
    /// The tensor's index in the destinations' description.
    pub tensor: u32,
    /// Rows of the share's dimension 0.
    pub rows: (u64, u64),
    /// Byte offset in the share and length.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The parts a destination's description is forwarded in: each tensor
/// share cut along its dimension 0 into parts of at most `chunk` bytes
/// (one row at the least). Computed by each destination from its own
/// description, so its size is known before any exchange.
pub fn broadcast_parts(specs: &[TensorSpec], chunk: u64) -> Vec<BroadcastPart> {
    let mut out = Vec::new();
    for (t, spec) in specs.iter().enumerate() {
        let Some((rows, row, per)) = part_rows(spec, chunk) else { continue };
        let mut r = 0;
        while r < rows {
            let end = (r + per).min(rows);
            out.push(BroadcastPart { tensor: t as u32, rows: (r, end), offset: r * row, len: (end - r) * row });
            r = end;
        }
    }
    out
}

/// A share's dimension-0 rows, bytes per row, and rows per part; `None`
/// for an empty share.
fn part_rows(spec: &TensorSpec, chunk: u64) -> Option<(u64, u64, u64)> {
    let bytes = spec.share_bytes();
    if bytes == 0 {
        return None;
    }
    let rows = spec.share_shape()[0];
    let row = bytes / rows;
    Some((rows, row, (chunk / row).max(1)))
}

/// How many parts [`broadcast_parts`] gives, without building them.
pub(crate) fn part_count<'a>(specs: impl Iterator<Item = &'a TensorSpec>, chunk: u64) -> u64 {
    specs.filter_map(|s| part_rows(s, chunk)).map(|(rows, _, per)| rows.div_ceil(per)).sum()
}

/// A pipelined chain broadcast: the sources write each part into
/// destination 0, and destination `i` forwards each part it has received
/// to destination `i + 1`, so every node sends and receives each byte
/// once and no source's links carry more than one copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BroadcastPlan {
    /// The parts, in the destinations' tensor order.
    pub parts: Vec<BroadcastPart>,
    /// `(source rank, source tensor index, copies)` writing part `p` into
    /// destination 0: offsets from the source's share and from the part's
    /// tensor share at destination 0.
    pub first_hop: Vec<(u32, u32, Vec<Strided>)>,
    /// Bytes each source writes per step.
    pub load: Vec<u64>,
}

/// Plans a chain broadcast. Every destination must describe the same
/// tensors with the same shares in the same order (replicas), and every
/// tensor must be held whole by at least one source.
pub fn plan_broadcast<S: AsRef<[TensorSpec]>, D: AsRef<[TensorSpec]>>(
    sources: &[S],
    dests: &[D],
    config: &PlanConfig,
) -> Result<BroadcastPlan, PlanError> {
    check_counts(sources.len(), dests.len())?;
    let (tensors, by_name) = index(sources, dests)?;
    let first = dests[0].as_ref();
    for (d, specs) in dests.iter().enumerate().skip(1) {
        if specs.as_ref() != first {
            return Err(PlanError::Group(format!(
                "broadcast: destination {d} does not describe the same tensors and shares, in the same order, as destination 0"
            )));
        }
    }
    let parts = broadcast_parts(first, config.chunk);
    let mut load = vec![0u64; sources.len()];
    let mut first_hop = Vec::with_capacity(parts.len());
    for part in &parts {
        let spec = &first[part.tensor as usize];
        let tensor = &tensors[by_name[spec.name.as_str()]];
        let whole = Range { dim: 0, start: 0, end: spec.dims()[0] };
        let Some(group) = tensor.groups.iter().find(|g| g.range == whole) else {
            return Err(PlanError::Group(format!("broadcast: no source holds all of tensor {:?}", spec.name)));
        };
        let (s, st) = tensor.holders(group).min_by_key(|(s, _)| (load[*s as usize], *s)).expect("a holder");
        let dst = Shard::of(spec);
        let src = dst.full();
        let (mut lo, mut hi) = meet(&src, whole, range_of(spec));
        lo[0] = dst.lo[0] + part.rows.0;
        hi[0] = dst.lo[0] + part.rows.1;
        let mut copies = Vec::new();
        let bytes = box_copies(&src, &dst, &lo, &hi, &mut copies);
        debug_assert_eq!(bytes, part.len);
        load[s as usize] += bytes;
        first_hop.push((s, st, copies));
    }
    Ok(BroadcastPlan { parts, first_hop, load })
}
