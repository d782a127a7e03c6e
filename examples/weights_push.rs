//! RL weight transfer with `strait::weights`: two trainer ranks holding
//! FSDP dim-0 shards push three steps into two inference ranks holding
//! tensor-parallel splits (one column-parallel, one row-parallel weight and
//! a replicated norm), over tcp on loopback, one engine and thread per
//! rank. In a real job each rank is its own process; only the
//! descriptors' bytes are exchanged (e.g. through `torch.distributed`).
//!
//! Run with `cargo run --release --example weights_push`.

use strait::weights::{Role, TensorSpec, WeightsConfig, WeightsGroup, WeightsRank, WeightsRankDesc};
use strait::{Provider, TransferEngine};

const SOURCES: u32 = 2;
const DESTS: u32 = 2;

/// (name, shape, how inference splits it: Some(dim) or whole).
const MODEL: [(&str, [u64; 2], Option<u8>); 3] =
    [("mlp.up", [4096, 1024], Some(0)), ("mlp.down", [1024, 4096], Some(1)), ("norm", [1, 1024], None)];

/// The value every byte of tensor `t` has at `step` (a stand-in for new
/// weights).
fn value(t: usize, step: u64) -> u8 {
    (step as u8).wrapping_mul(31) ^ t as u8
}

fn main() -> strait::Result<()> {
    let engine = || TransferEngine::builder().provider(Provider::Tcp).interface("lo").build();
    let config = WeightsConfig::default();
    let mut ranks = Vec::new();
    for r in 0..SOURCES {
        let specs = MODEL.iter().map(|(n, s, _)| TensorSpec::chunk(*n, 2, s, 0, r, SOURCES)).collect();
        ranks.push(WeightsRank::alloc(&engine()?, config, Role::Source, r, specs)?);
    }
    for r in 0..DESTS {
        let specs = MODEL
            .iter()
            .map(|(n, s, tp)| match tp {
                Some(d) => TensorSpec::chunk(*n, 2, s, *d, r, DESTS),
                None => TensorSpec::replicated(*n, 2, s),
            })
            .collect();
        ranks.push(WeightsRank::alloc(&engine()?, config, Role::Destination, r, specs)?);
    }
    // Every rank gets every descriptor (bytes), and plans the same plan.
    let bytes: Vec<Vec<u8>> = ranks.iter().map(|r| r.descriptor().to_bytes()).collect();
    let descs = bytes.iter().map(|b| WeightsRankDesc::from_bytes(b)).collect::<strait::Result<Vec<_>>>()?;
    let mut groups: Vec<WeightsGroup> = ranks.into_iter().map(|r| r.connect(&descs)).collect::<strait::Result<_>>()?;
    for g in &groups {
        println!(
            "{:?} rank {}: {} bytes, {} requests per step",
            g.role(),
            g.rank(),
            g.bytes_per_step(),
            g.requests_per_step()
        );
    }
    for step in 1..=3u64 {
        let started = std::time::Instant::now();
        std::thread::scope(|s| {
            let hs: Vec<_> = groups
                .iter_mut()
                .map(|g| {
                    s.spawn(move || match g.role() {
                        // The prepare hook leaves each shard's bytes in place just before
                        // it is sent (a trainer would gather, cast or quantize here).
                        Role::Source => g.push_with(step, |t| t.write(&vec![value(t.index, step); t.len() as usize])),
                        Role::Destination => g.wait(step),
                    })
                })
                .collect();
            hs.into_iter().try_for_each(|h| h.join().expect("a rank thread"))
        })?;
        // Every destination byte is the step's value.
        for g in groups.iter().filter(|g| g.role() == Role::Destination) {
            for t in 0..MODEL.len() {
                let (region, offset, len) = g.local().tensor(t)?;
                assert!(region.to_vec(offset, len)?.iter().all(|&b| b == value(t, step)));
            }
        }
        println!("step {step}: pushed and checked in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(())
}
