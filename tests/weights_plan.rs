//! The weights planner, without an engine: property tests over random
//! models and shardings (every destination byte written exactly once with
//! the right value, no source read outside its share, balanced load over
//! replicas, the same plan every time), the typed refusals, and the
//! descriptor's decoder.

mod common;

use common::weights::{rng, share_bytes};
use proptest::prelude::*;
use strait::weights::{
    plan, plan_broadcast, PlanConfig, PlanError, Role, Share, TensorSpec, WeightsPlan, WeightsRankDesc,
};

/// How one side holds a tensor.
#[derive(Clone, Copy, Debug)]
enum Scheme {
    /// Every rank has it whole.
    Replicated,
    /// `torch.chunk` over all ranks along `dim` (uneven, maybe empty parts).
    Chunk(u8),
    /// Two replica groups, each chunked along `dim`.
    Replicas(u8),
    /// Random cut points along `dim` (uneven, maybe empty).
    Cuts(u8, u64),
}

fn specs_for(name: &str, elem: u32, shape: &[u64], scheme: Scheme, ranks: u32) -> Vec<TensorSpec> {
    (0..ranks)
        .map(|r| match scheme {
            Scheme::Replicated => TensorSpec::replicated(name, elem, shape),
            Scheme::Chunk(d) => TensorSpec::chunk(name, elem, shape, d, r, ranks),
            Scheme::Replicas(d) => {
                let half = ranks.div_ceil(2);
                TensorSpec::chunk(name, elem, shape, d, r % half, half)
            }
            Scheme::Cuts(d, seed) => {
                let n = shape[d as usize];
                let mut next = rng(seed);
                let mut cuts: Vec<u64> = (1..ranks).map(|_| next() % (n + 1)).collect();
                cuts.sort_unstable();
                cuts.insert(0, 0);
                cuts.push(n);
                TensorSpec::split(name, elem, shape, d, cuts[r as usize], cuts[r as usize + 1])
            }
        })
        .collect()
}

/// A random model: sources' and destinations' descriptions.
fn model(seed: u64, replicated_sources: bool) -> (Vec<Vec<TensorSpec>>, Vec<Vec<TensorSpec>>) {
    let mut r = rng(seed);
    let s = 1 + (r() % 5) as u32;
    let d = 1 + (r() % 5) as u32;
    let mut sources = vec![Vec::new(); s as usize];
    let mut dests = vec![Vec::new(); d as usize];
    for t in 0..1 + r() % 4 {
        let ndim = 1 + (r() % 3) as usize;
        let shape: Vec<u64> = (0..ndim).map(|_| 1 + r() % 7).collect();
        let elem = [1, 2, 4][(r() % 3) as usize];
        let dim = |r: &mut dyn FnMut() -> u64| (r() % ndim as u64) as u8;
        let pick = |r: &mut dyn FnMut() -> u64, allow_cuts: bool| match r() % if allow_cuts { 4 } else { 3 } {
            0 => Scheme::Replicated,
            1 => Scheme::Chunk(dim(r)),
            2 => Scheme::Replicas(dim(r)),
            _ => Scheme::Cuts(dim(r), r()),
        };
        let src_scheme = if replicated_sources { Scheme::Replicated } else { pick(&mut r, true) };
        let dst_scheme = pick(&mut r, true);
        let name = format!("layer.{t}.weight");
        for (i, spec) in specs_for(&name, elem, &shape, src_scheme, s).into_iter().enumerate() {
            sources[i].push(spec);
        }
        for (i, spec) in specs_for(&name, elem, &shape, dst_scheme, d).into_iter().enumerate() {
            dests[i].push(spec);
        }
    }
    (sources, dests)
}

/// A full tensor's byte `i` of tensor `name`.
fn value(name: &str, i: u64) -> u8 {
    let h = name.bytes().fold(0u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    (h.wrapping_add(i.wrapping_mul(0x9E37_79B9)) >> 7) as u8
}

/// Runs the plan on bytes: every destination share must come out as the
/// source bytes say, each byte written once, no source byte read outside
/// its share.
fn check(sources: &[Vec<TensorSpec>], dests: &[Vec<TensorSpec>], p: &WeightsPlan) {
    let src: Vec<Vec<Vec<u8>>> =
        sources.iter().map(|r| r.iter().map(|s| share_bytes(s, |i| value(&s.name, i))).collect()).collect();
    let mut dst: Vec<Vec<Vec<u8>>> =
        dests.iter().map(|r| r.iter().map(|s| vec![0u8; s.share_bytes() as usize]).collect()).collect();
    let mut hits: Vec<Vec<Vec<u8>>> =
        dests.iter().map(|r| r.iter().map(|s| vec![0u8; s.share_bytes() as usize]).collect()).collect();
    for w in p.writes() {
        let from = &src[w.source as usize][w.src_tensor as usize];
        let (s, d) =
            (&sources[w.source as usize][w.src_tensor as usize], &dests[w.dest as usize][w.dst_tensor as usize]);
        assert_eq!(s.name, d.name);
        let c = w.copy;
        for r in 0..c.rows {
            let (a, b) = (c.src_offset + r * c.src_stride, c.dst_offset + r * c.dst_stride);
            assert!(a + c.row_len <= from.len() as u64, "source {} reads outside its share of {}", w.source, s.name);
            for i in 0..c.row_len {
                let to = &mut dst[w.dest as usize][w.dst_tensor as usize];
                to[(b + i) as usize] = from[(a + i) as usize];
                hits[w.dest as usize][w.dst_tensor as usize][(b + i) as usize] += 1;
            }
        }
    }
    for (d, ranks) in dests.iter().enumerate() {
        for (t, spec) in ranks.iter().enumerate() {
            assert!(
                hits[d][t].iter().all(|&h| h == 1),
                "dest {d} tensor {}: bytes written {:?}",
                spec.name,
                hits[d][t]
            );
            assert_eq!(dst[d][t], share_bytes(spec, |i| value(&spec.name, i)), "dest {d} tensor {}", spec.name);
        }
    }
    // Each destination's senders are exactly the sources writing to it.
    for d in 0..dests.len() as u32 {
        let mut from: Vec<u32> = p.writes().filter(|w| w.dest == d).map(|w| w.source).collect();
        from.sort_unstable();
        from.dedup();
        assert_eq!(p.senders(d), &from[..]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_destination_byte_is_written_once_from_its_share(seed in any::<u64>()) {
        let (sources, dests) = model(seed, false);
        let config = PlanConfig { chunk: 1 + seed % 64 };
        match plan(&sources, &dests, &config) {
            Ok(p) => {
                check(&sources, &dests, &p);
                prop_assert_eq!(&p, &plan(&sources, &dests, &config).unwrap(), "the plan is deterministic");
            }
            // Random cuts may leave bytes no source holds.
            Err(PlanError::Uncovered { .. }) => {}
            Err(e) => prop_assert!(false, "{}", e),
        }
    }

    #[test]
    fn replicated_bytes_are_balanced_over_the_replicas(seed in any::<u64>()) {
        let (sources, dests) = model(seed, true);
        let config = PlanConfig { chunk: 1 + seed % 16 };
        let p = plan(&sources, &dests, &config).unwrap();
        check(&sources, &dests, &p);
        let ideal = p.bytes() as f64 / sources.len() as f64;
        let largest = p.writes().map(|w| w.copy.len()).max().unwrap_or(0) as f64;
        for (s, &load) in p.load().iter().enumerate() {
            prop_assert!(load as f64 <= ideal * (1.0 + 1.0 / 64.0) + largest, "source {} carries {} of ideal {}", s, load, ideal);
        }
    }

    #[test]
    fn a_broadcast_covers_every_part_from_a_whole_tensor(seed in any::<u64>()) {
        let (sources, mut dests) = model(seed, true);
        let first = dests[0].clone();
        for d in &mut dests {
            *d = first.clone();
        }
        let config = PlanConfig { chunk: 1 + seed % 64 };
        let b = plan_broadcast(&sources, &dests, &config).unwrap();
        let mut dst: Vec<Vec<u8>> = first.iter().map(|s| vec![0u8; s.share_bytes() as usize]).collect();
        let mut parts_bytes = vec![0u64; first.len()];
        for (part, (s, st, copies)) in b.parts.iter().zip(&b.first_hop) {
            let spec = &sources[*s as usize][*st as usize];
            let from = share_bytes(spec, |i| value(&spec.name, i));
            parts_bytes[part.tensor as usize] += part.len;
            for c in copies {
                for r in 0..c.rows {
                    let (a, d) = (c.src_offset + r * c.src_stride, c.dst_offset + r * c.dst_stride);
                    prop_assert!(d >= part.offset && d + c.row_len <= part.offset + part.len, "a copy outside its part");
                    let to = &mut dst[part.tensor as usize];
                    to[d as usize..(d + c.row_len) as usize].copy_from_slice(&from[a as usize..(a + c.row_len) as usize]);
                }
            }
        }
        for (t, spec) in first.iter().enumerate() {
            prop_assert_eq!(parts_bytes[t], spec.share_bytes());
            prop_assert_eq!(&dst[t], &share_bytes(spec, |i| value(&spec.name, i)));
        }
    }

    #[test]
    fn corrupt_descriptors_are_refused_without_panicking(seed in any::<u64>(), cut in 0usize..4000, flip in 0usize..4000) {
        let bytes = common::weights::sample_descriptor_bytes(seed);
        let _ = WeightsRankDesc::from_bytes(&bytes[..cut.min(bytes.len())]);
        let mut b = bytes.clone();
        if !b.is_empty() {
            let i = flip % b.len();
            b[i] ^= 1 + (seed as u8 % 255);
            let _ = WeightsRankDesc::from_bytes(&b);
        }
        if cut < bytes.len() {
            prop_assert!(WeightsRankDesc::from_bytes(&bytes[..cut]).is_err());
        }
    }
}

#[test]
fn fsdp_shards_to_tp_column_and_row_splits() {
    // 4 sources with dim-0 (FSDP) shards, 4 destinations with a column
    // split (dim 0), a row split (dim 1, strided) and a replicated norm.
    let shapes = [("q_proj", vec![64u64, 48]), ("o_proj", vec![48, 64]), ("norm", vec![48])];
    let sources: Vec<Vec<TensorSpec>> =
        (0..4).map(|r| shapes.iter().map(|(n, s)| TensorSpec::chunk(*n, 2, s, 0, r, 4)).collect()).collect();
    let dests: Vec<Vec<TensorSpec>> = (0..4)
        .map(|r| {
            vec![
                TensorSpec::chunk("q_proj", 2, &shapes[0].1, 0, r, 4),
                TensorSpec::chunk("o_proj", 2, &shapes[1].1, 1, r, 4),
                TensorSpec::replicated("norm", 2, &shapes[2].1),
            ]
        })
        .collect();
    let p = plan(&sources, &dests, &PlanConfig::default()).unwrap();
    check(&sources, &dests, &p);
    // The row split reads every source's shard as rows.
    assert!(p.writes().any(|w| w.copy.rows > 1));
}

#[test]
fn descriptions_that_cannot_be_planned_are_refused_with_the_reason() {
    let a = |s: Share| TensorSpec { name: "w".into(), elem_bytes: 2, shape: vec![8, 4], share: s };
    let whole = vec![vec![a(Share::Replicated)]];
    let err = |s: &[Vec<TensorSpec>], d: &[Vec<TensorSpec>]| plan(s, d, &PlanConfig::default()).unwrap_err();
    // One side only.
    let extra = vec![vec![a(Share::Replicated), TensorSpec::replicated("bias", 2, &[4])]];
    assert!(
        matches!(err(&extra, &whole), PlanError::OneSided { ref name, side: Role::Source, rank: 0 } if name == "bias")
    );
    assert!(matches!(err(&whole, &extra), PlanError::OneSided { side: Role::Destination, .. }));
    // Shape and element size.
    let other_shape = vec![vec![TensorSpec::replicated("w", 2, &[4, 8])]];
    assert!(matches!(err(&whole, &other_shape), PlanError::Mismatch { what: "shape", .. }));
    let other_dtype = vec![vec![TensorSpec::replicated("w", 4, &[8, 4])]];
    assert!(matches!(err(&whole, &other_dtype), PlanError::Mismatch { what: "element size", .. }));
    // Overlapping (not identical) shares on one side.
    let overlap =
        vec![vec![a(Share::Split { dim: 0, start: 0, end: 5 })], vec![a(Share::Split { dim: 0, start: 4, end: 8 })]];
    assert!(matches!(err(&overlap, &whole), PlanError::Overlap { side: Role::Source, a: 0, b: 1, .. }));
    let crossed =
        vec![vec![a(Share::Split { dim: 0, start: 0, end: 4 })], vec![a(Share::Split { dim: 1, start: 0, end: 2 })]];
    assert!(matches!(err(&whole, &crossed), PlanError::Overlap { side: Role::Destination, .. }));
    // Bytes nobody holds.
    let half = vec![vec![a(Share::Split { dim: 0, start: 0, end: 4 })]];
    assert!(matches!(err(&half, &whole), PlanError::Uncovered { dest: 0, missing: 32, .. }));
    // Listed twice; malformed.
    let twice = vec![vec![a(Share::Replicated), a(Share::Replicated)]];
    assert!(matches!(err(&twice, &whole), PlanError::Duplicate { .. }));
    let bad = vec![vec![a(Share::Split { dim: 2, start: 0, end: 1 })]];
    assert!(matches!(err(&bad, &whole), PlanError::InvalidSpec { .. }));
    // Replicas are fine, and so is an empty share.
    let replicas = vec![
        vec![a(Share::Replicated)],
        vec![a(Share::Replicated)],
        vec![a(Share::Split { dim: 0, start: 3, end: 3 })],
    ];
    assert!(plan(&replicas, &whole, &PlanConfig::default()).is_ok());
    // Broadcast needs identical destinations and whole tensors.
    let halves = vec![half[0].clone(), vec![a(Share::Split { dim: 0, start: 4, end: 8 })]];
    assert!(
        matches!(plan_broadcast(&whole, &halves, &PlanConfig::default()), Err(PlanError::Group(m)) if m.contains("same tensors"))
    );
    assert!(
        matches!(plan_broadcast(&halves, &whole, &PlanConfig::default()), Err(PlanError::Group(m)) if m.contains("all of"))
    );
}

#[test]
fn descriptors_round_trip() {
    let bytes = common::weights::sample_descriptor_bytes(7);
    let d = WeightsRankDesc::from_bytes(&bytes).unwrap();
    assert_eq!(d.to_bytes(), bytes);
    assert_eq!(d.to_string().parse::<WeightsRankDesc>().unwrap(), d);
}
