//! Where every (token, expert) copy goes: pure functions of the routing and
//! the exchanged counts (no FFI, no threads, no clock).
//!
//! A token goes to a rank once, however many of its top-k experts the rank
//! holds (an *item*: the token's bytes and the (k, local expert) pairs it
//! has there); the receiver expands items into its experts' rows. A rank's
//! receive pool holds the items it receives, packed by source rank, each
//! source's in token order. Every rank knows every rank's per-destination
//! item counts and per-expert counts (all-gathered before any data moves),
//! so each sender computes where its items land without asking, every
//! rank computes the same layout, and expanding the pool in order puts
//! each expert's rows in (source rank, token, k) order: the outputs are
//! deterministic. A pool holds `capacity` items; a rank that receives more
//! takes them in rounds of `capacity`.

use crate::error::{Error, Result};

/// The group's shape, as the plan needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Ranks in the group.
    pub ranks: u32,
    /// Experts in all (a multiple of `ranks`).
    pub experts: u32,
    /// Experts chosen per token.
    pub top_k: u32,
}

impl Shape {
    /// Experts each rank holds.
    pub fn local_experts(&self) -> u32 {
        self.experts / self.ranks
    }

    /// The rank holding global expert `e`.
    pub fn owner(&self, e: u32) -> u32 {
        e / self.local_experts()
    }
}

/// Per-expert counts of this rank's copies (`topk_idx` is `[tokens, top_k]`
/// row-major; -1 means no expert). Refuses indices outside `-1..experts`.
pub fn expert_counts(shape: Shape, topk_idx: &[i32]) -> Result<Vec<u32>> {
    let mut counts = vec![0u32; shape.experts as usize];
    for (i, &e) in topk_idx.iter().enumerate() {
        match e {
            -1 => {}
            e if e >= 0 && (e as u32) < shape.experts => counts[e as usize] += 1,
            e => {
                return Err(Error::InvalidRequest(format!(
                    "topk_idx[{}][{}] = {e}: not an expert (0..{}) or -1",
                    i / shape.top_k as usize,
                    i % shape.top_k as usize,
                    shape.experts
                )))
            }
        }
    }
    Ok(counts)
}

/// One token's trip to one rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item {
    /// The token (row of `x`).
    pub token: u32,
    /// The rank it goes to.
    pub dest: u32,
    /// Its (k, local expert) pairs at `dest`: `pairs[first..first + n]`.
    pub first: u32,
    /// How many.
    pub n: u32,
}

/// This rank's items, grouped by destination rank, each group in token
/// order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendPlan {
    /// The items.
    pub items: Vec<Item>,
    /// `(k, local expert)` pairs of the items.
    pub pairs: Vec<(u16, u16)>,
    /// Items for rank `d` are `items[dest_start[d]..dest_start[d + 1]]`.
    pub dest_start: Vec<u64>,
}

impl SendPlan {
    /// Items for each rank.
    pub fn dest_counts(&self) -> Vec<u32> {
        self.dest_start.windows(2).map(|w| (w[1] - w[0]) as u32).collect()
    }
}

/// Groups this rank's (token, expert) pairs into items (checks the
/// indices as [`expert_counts`] does).
pub fn send_plan(shape: Shape, topk_idx: &[i32]) -> Result<SendPlan> {
    expert_counts(shape, topk_idx)?;
    let k = shape.top_k as usize;
    let le = shape.local_experts();
    // Per destination: (token, its (k, local expert) pairs there).
    type Trips = Vec<(u32, Vec<(u16, u16)>)>;
    let mut per_dest: Vec<Trips> = vec![Vec::new(); shape.ranks as usize];
    for (t, row) in topk_idx.chunks(k).enumerate() {
        for d in 0..shape.ranks {
            let here: Vec<(u16, u16)> = row
                .iter()
                .enumerate()
                .filter(|(_, &e)| e >= 0 && e as u32 / le == d)
                .map(|(kk, &e)| (kk as u16, (e as u32 % le) as u16))
                .collect();
            if !here.is_empty() {
                per_dest[d as usize].push((t as u32, here));
            }
        }
    }
    let mut plan = SendPlan { items: Vec::new(), pairs: Vec::new(), dest_start: vec![0] };
    for (d, list) in per_dest.into_iter().enumerate() {
        for (token, here) in list {
            plan.items.push(Item { token, dest: d as u32, first: plan.pairs.len() as u32, n: here.len() as u32 });
            plan.pairs.extend(here);
        }
        plan.dest_start.push(plan.items.len() as u64);
    }
    Ok(plan)
}

/// The layout of every rank's pool and experts, from all ranks' counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    shape: Shape,
    /// `experts[s * experts + e]`: rank `s`'s pairs for global expert `e`.
    experts: Vec<u32>,
    /// `items[s * ranks + d]`: rank `s`'s items for rank `d`.
    items: Vec<u32>,
}

impl Placement {
    /// Checks the counts (`experts[s]`: rank `s`'s [`expert_counts`];
    /// `items[s]`: its [`SendPlan::dest_counts`]) and lays out the pools.
    pub fn new(shape: Shape, experts: &[Vec<u32>], items: &[Vec<u32>]) -> Result<Self> {
        let r = shape.ranks as usize;
        if experts.len() != r || experts.iter().any(|c| c.len() != shape.experts as usize) {
            return Err(Error::InvalidRequest("MoE counts: one vector of `experts` counts per rank".into()));
        }
        if items.len() != r || items.iter().any(|c| c.len() != r) {
            return Err(Error::InvalidRequest("MoE counts: one vector of `ranks` item counts per rank".into()));
        }
        Ok(Placement {
            shape,
            experts: experts.iter().flatten().copied().collect(),
            items: items.iter().flatten().copied().collect(),
        })
    }

    /// Rank `s`'s pairs for global expert `e`.
    pub fn count(&self, s: u32, e: u32) -> u32 {
        self.experts[(s * self.shape.experts + e) as usize]
    }

    /// Rows local expert `local` of rank `d` receives.
    pub fn expert_total(&self, d: u32, local: u32) -> u64 {
        let e = d * self.shape.local_experts() + local;
        (0..self.shape.ranks).map(|s| u64::from(self.count(s, e))).sum()
    }

    /// Rank `s`'s items for rank `d`.
    pub fn items(&self, s: u32, d: u32) -> u64 {
        u64::from(self.items[(s * self.shape.ranks + d) as usize])
    }

    /// Items rank `d` receives.
    pub fn total(&self, d: u32) -> u64 {
        (0..self.shape.ranks).map(|s| self.items(s, d)).sum()
    }

    /// First slot of rank `s`'s items in rank `d`'s pool.
    pub fn item_start(&self, s: u32, d: u32) -> u64 {
        (0..s).map(|s2| self.items(s2, d)).sum()
    }

    /// Rounds rank `d` takes its items in, with a pool of `capacity` items
    /// (at least one, even with nothing to receive).
    pub fn rounds(&self, d: u32, capacity: u64) -> u64 {
        self.total(d).div_ceil(capacity.max(1)).max(1)
    }
}

/// The part of the slot range `[start, start + len)` that falls in round
/// `round` of `capacity` slots: `(offset in the range, pool index, len)`.
pub fn in_round(start: u64, len: u64, round: u64, capacity: u64) -> Option<(u64, u64, u64)> {
    let (lo, hi) = (round * capacity, (round + 1) * capacity);
    let (a, b) = (start.max(lo), (start + len).min(hi));
    (a < b).then(|| (a - start, a - lo, b - a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shape() -> Shape {
        Shape { ranks: 3, experts: 6, top_k: 2 }
    }

    #[test]
    fn counts_refuse_bad_experts() {
        assert_eq!(expert_counts(shape(), &[0, 5, -1, 0]).unwrap(), [2, 0, 0, 0, 0, 1]);
        assert!(expert_counts(shape(), &[6]).is_err());
        assert!(expert_counts(shape(), &[-2]).is_err());
    }

    #[test]
    fn rounds_cut_ranges() {
        assert_eq!(in_round(5, 10, 0, 8), Some((0, 5, 3)));
        assert_eq!(in_round(5, 10, 1, 8), Some((3, 0, 7)));
        assert_eq!(in_round(5, 10, 2, 8), None);
        assert_eq!(in_round(0, 0, 0, 8), None);
    }

    proptest! {
        /// Every item gets its own slot; expanding each pool in slot order
        /// gives every (source, token, k) pair routed to the rank exactly
        /// once, and each expert's rows in (source, token, k) order.
        #[test]
        fn placement_is_a_bijection(routes in proptest::collection::vec(
            proptest::collection::vec(-1i32..6, 0..12), 3)) {
            let sh = shape();
            let routes: Vec<Vec<i32>> = routes.into_iter().map(|mut r| { r.truncate(r.len() / 2 * 2); r }).collect();
            let plans: Vec<SendPlan> = routes.iter().map(|r| send_plan(sh, r).unwrap()).collect();
            let experts: Vec<Vec<u32>> = routes.iter().map(|r| expert_counts(sh, r).unwrap()).collect();
            let items: Vec<Vec<u32>> = plans.iter().map(|p| p.dest_counts()).collect();
            let p = Placement::new(sh, &experts, &items).unwrap();
            for d in 0..3u32 {
                // Fill the pool.
                type Slot = Option<(u32, Item, Vec<(u16, u16)>)>;
                let mut pool: Vec<Slot> = vec![None; p.total(d) as usize];
                for (s, plan) in plans.iter().enumerate() {
                    let group = &plan.items[plan.dest_start[d as usize] as usize..plan.dest_start[d as usize + 1] as usize];
                    prop_assert_eq!(group.len() as u64, p.items(s as u32, d));
                    for (j, it) in group.iter().enumerate() {
                        let slot = (p.item_start(s as u32, d) + j as u64) as usize;
                        prop_assert!(pool[slot].is_none());
                        let pairs = plan.pairs[it.first as usize..(it.first + it.n) as usize].to_vec();
                        pool[slot] = Some((s as u32, *it, pairs));
                    }
                }
                // Expand.
                let mut rows: Vec<Vec<(u32, u32, u16)>> = vec![Vec::new(); 2];
                for entry in pool {
                    let (s, it, pairs) = entry.unwrap();
                    for (k, le) in pairs {
                        prop_assert_eq!(routes[s as usize][(it.token * 2 + u32::from(k)) as usize], (d * 2 + u32::from(le)) as i32);
                        rows[le as usize].push((s, it.token, k));
                    }
                }
                for le in 0..2u32 {
                    let e = (d * 2 + le) as i32;
                    let mut want = Vec::new();
                    for (s, r) in routes.iter().enumerate() {
                        for (i, &x) in r.iter().enumerate() {
                            if x == e { want.push((s as u32, (i / 2) as u32, (i % 2) as u16)); }
                        }
                    }
                    prop_assert_eq!(rows[le as usize].len() as u64, p.expert_total(d, le));
                    prop_assert_eq!(&rows[le as usize], &want);
                }
            }
        }
    }
}
