//! Planning an RL weight push at the scale of a 1T-parameter MoE model
//! (the target: under 1 s), and at 1/8 of it.
//!
//! The model (close to Kimi-K2's shapes): `layers` MoE layers of 384
//! experts, each expert three matrices (`w1`, `w3`: [2048, 7168]; `w2`:
//! [7168, 2048]), plus five dense tensors per layer and the embedding and
//! head: 52 layers give 60,166 tensors, 1.0e12 parameters. Sources: 256
//! trainer ranks, 32 expert-parallel groups of 8; each tensor lives on
//! one group (experts by index, dense tensors by layer), cut along dim 0
//! over its 8 ranks (FSDP). Destinations: 128 inference ranks, 4 replicas
//! of 32; each replica holds expert `e` whole on its rank `e mod 32`, and
//! each dense tensor cut along dim 0 over groups of 8 ranks (TP 8). That
//! is about 2 million planned writes.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use strait::weights::{plan, PlanConfig, TensorSpec};

const EXPERTS: u32 = 384;
const HIDDEN: u64 = 7168;
const MOE_INTER: u64 = 2048;

/// (name, shape, owning source group, destination placement).
enum Place {
    /// Whole on rank `e mod 32` of each replica.
    Expert(u32),
    /// Cut along dim 0 over 8 ranks.
    Dense,
}

fn model(layers: u32) -> Vec<(String, Vec<u64>, u32, Place)> {
    let mut out = vec![
        ("embed".to_string(), vec![163_840, HIDDEN], 0, Place::Dense),
        ("lm_head".to_string(), vec![163_840, HIDDEN], 1, Place::Dense),
    ];
    for l in 0..layers {
        for (n, shape) in [
            ("q_proj", vec![8192, HIDDEN]),
            ("kv_proj", vec![1024, HIDDEN]),
            ("o_proj", vec![HIDDEN, 8192]),
            ("attn_norm", vec![HIDDEN]),
            ("mlp_norm", vec![HIDDEN]),
        ] {
            out.push((format!("layers.{l}.{n}"), shape, l % 32, Place::Dense));
        }
        for e in 0..EXPERTS {
            for (n, shape) in
                [("w1", vec![MOE_INTER, HIDDEN]), ("w3", vec![MOE_INTER, HIDDEN]), ("w2", vec![HIDDEN, MOE_INTER])]
            {
                out.push((format!("layers.{l}.experts.{e}.{n}"), shape, e % 32, Place::Expert(e)));
            }
        }
    }
    out
}

fn describe(layers: u32) -> (Vec<Vec<TensorSpec>>, Vec<Vec<TensorSpec>>) {
    let m = model(layers);
    let mut sources = vec![Vec::new(); 256];
    let mut dests = vec![Vec::new(); 128];
    for (name, shape, group, place) in &m {
        for r in 0..8 {
            sources[(group * 8 + r) as usize].push(TensorSpec::chunk(name.as_str(), 2, shape, 0, r, 8));
        }
        for d in 0..128u32 {
            match place {
                Place::Expert(e) if d % 32 == e % 32 => {
                    dests[d as usize].push(TensorSpec::replicated(name.as_str(), 2, shape))
                }
                Place::Expert(_) => {}
                Place::Dense => dests[d as usize].push(TensorSpec::chunk(name.as_str(), 2, shape, 0, d % 8, 8)),
            }
        }
    }
    (sources, dests)
}

fn planner(c: &mut Criterion) {
    let mut group = c.benchmark_group("weights/plan");
    group.sample_size(10);
    for layers in [6u32, 52] {
        let (sources, dests) = describe(layers);
        let tensors = model(layers).len();
        let writes = plan(&sources, &dests, &PlanConfig::default()).unwrap().writes().count();
        eprintln!("{layers} layers: {tensors} tensors, 256 sources, 128 destinations, {writes} writes");
        group.bench_function(format!("{tensors}_tensors_256x128"), |b| {
            b.iter(|| black_box(plan(&sources, &dests, &PlanConfig::default()).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, planner);
criterion_main!(benches);
