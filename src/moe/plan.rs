//! Where every (token, expert) copy goes: pure functions of the routing and
//! the exchanged counts (no FFI, no threads, no clock).
//!
//! A rank's receive pool holds the copies it receives, packed: expert by
//! expert (its local experts in order), within an expert source rank by
//! source rank, within a source in the source's (token, k) order. Every
//! rank knows every rank's per-expert counts (they are all-gathered before
//! any data moves), so each sender computes where its copies land without
//! asking, and every rank computes the same layout: the placement, and so
//! the expert outputs, are deterministic. A pool holds `capacity` copies;
//! a rank that receives more takes them in rounds of `capacity`.

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

/// The layout of every rank's pool, from all ranks' counts (`counts[s]` is
/// rank `s`'s [`expert_counts`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    shape: Shape,
    /// `counts[s * experts + e]`.
    counts: Vec<u32>,
    /// First slot of global expert `e` in its owner's pool (prefix over the
    /// owner's lower experts).
    expert_base: Vec<u64>,
    /// Copies each rank receives.
    totals: Vec<u64>,
}

impl Placement {
    /// Checks the counts (one vector of `experts` per rank) and lays out
    /// the pools.
    pub fn new(shape: Shape, counts: &[Vec<u32>]) -> Result<Self> {
        if counts.len() != shape.ranks as usize || counts.iter().any(|c| c.len() != shape.experts as usize) {
            return Err(Error::InvalidRequest("MoE counts: one vector of `experts` counts per rank".into()));
        }
        let flat: Vec<u32> = counts.iter().flatten().copied().collect();
        let le = shape.local_experts();
        let mut expert_base = vec![0u64; shape.experts as usize];
        let mut totals = vec![0u64; shape.ranks as usize];
        for d in 0..shape.ranks {
            let mut base = 0u64;
            for e in d * le..(d + 1) * le {
                expert_base[e as usize] = base;
                base += (0..shape.ranks).map(|s| u64::from(flat[(s * shape.experts + e) as usize])).sum::<u64>();
            }
            totals[d as usize] = base;
        }
        Ok(Placement { shape, counts: flat, expert_base, totals })
    }

    /// Rank `s`'s copies for global expert `e`.
    pub fn count(&self, s: u32, e: u32) -> u32 {
        self.counts[(s * self.shape.experts + e) as usize]
    }

    /// Copies rank `d` receives.
    pub fn total(&self, d: u32) -> u64 {
        self.totals[d as usize]
    }

    /// Copies local expert `local` of rank `d` receives.
    pub fn expert_total(&self, d: u32, local: u32) -> u64 {
        let e = d * self.shape.local_experts() + local;
        (0..self.shape.ranks).map(|s| u64::from(self.count(s, e))).sum()
    }

    /// First slot, in its owner's pool, of rank `s`'s copies for global
    /// expert `e`.
    pub fn block_start(&self, s: u32, e: u32) -> u64 {
        self.expert_base[e as usize] + (0..s).map(|s2| u64::from(self.count(s2, e))).sum::<u64>()
    }

    /// First slot of global expert `e` in its owner's pool.
    pub fn expert_start(&self, e: u32) -> u64 {
        self.expert_base[e as usize]
    }

    /// Rounds rank `d` takes its copies in, with a pool of `capacity`
    /// copies (at least one, even with nothing to receive).
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

/// This rank's copies in send order: grouped by destination rank, then by
/// global expert, then in (token, k) order. Each entry is `(token, k,
/// expert)`. `order[e]` lists where expert `e`'s copies start in it.
pub fn send_order(shape: Shape, topk_idx: &[i32]) -> (Vec<(u32, u32, u32)>, Vec<u64>) {
    let counts = expert_counts(shape, topk_idx).unwrap_or_default();
    // Experts of one destination are consecutive numbers, so expert order is
    // destination order.
    let mut start = vec![0u64; shape.experts as usize + 1];
    for e in 0..shape.experts as usize {
        start[e + 1] = start[e] + u64::from(counts.get(e).copied().unwrap_or(0));
    }
    let mut next = start.clone();
    let mut out = vec![(0u32, 0u32, 0u32); start[shape.experts as usize] as usize];
    for (i, &e) in topk_idx.iter().enumerate() {
        if e < 0 || e as u32 >= shape.experts {
            continue;
        }
        let at = &mut next[e as usize];
        out[*at as usize] = ((i / shape.top_k as usize) as u32, (i % shape.top_k as usize) as u32, e as u32);
        *at += 1;
    }
    start.truncate(shape.experts as usize);
    (out, start)
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
        /// Every copy of every rank gets its own slot; the slots of a
        /// rank's pool are exactly 0..total, expert-major, sources in rank
        /// order; the send order lists each copy once, grouped by expert.
        #[test]
        fn placement_is_a_bijection(routes in proptest::collection::vec(
            proptest::collection::vec(-1i32..6, 0..12), 3)) {
            let s = shape();
            let routes: Vec<Vec<i32>> = routes.into_iter().map(|mut r| { r.truncate(r.len() / 2 * 2); r }).collect();
            let counts: Vec<Vec<u32>> = routes.iter().map(|r| expert_counts(s, r).unwrap()).collect();
            let p = Placement::new(s, &counts).unwrap();
            let mut seen: Vec<Vec<Option<(u32, u32, u32)>>> =
                (0..3).map(|d| vec![None; p.total(d) as usize]).collect();
            for (src, r) in routes.iter().enumerate() {
                let (order, starts) = send_order(s, r);
                prop_assert_eq!(order.len(), r.iter().filter(|&&e| e >= 0).count());
                for (j, &(t, k, e)) in order.iter().enumerate() {
                    prop_assert_eq!(r[(t * 2 + k) as usize], e as i32);
                    let within = j as u64 - starts[e as usize];
                    let slot = p.block_start(src as u32, e) + within;
                    let d = s.owner(e);
                    prop_assert!(seen[d as usize][slot as usize].is_none());
                    seen[d as usize][slot as usize] = Some((src as u32, t, e));
                }
            }
            for d in 0..3u32 {
                let got: Vec<(u32, u32, u32)> = seen[d as usize].iter().map(|x| x.unwrap()).collect();
                let mut sorted = got.clone();
                sorted.sort_by_key(|&(src, t, e)| (e, src, t));
                prop_assert_eq!(got, sorted);
            }
        }
    }
}
