//! Expert-parallel dispatch and combine with `strait::moe`: four ranks, one
//! engine and one thread each, over tcp on loopback (in a real job each
//! rank is its own process on its own GPU; only the descriptors' bytes are
//! exchanged, e.g. through `torch.distributed`).
//!
//! Run with `cargo run --release --example moe_dispatch_combine`.

use strait::moe::{bf16_to_f32, f32_to_bf16, MoeConfig, MoeDtype, MoeRank, MoeRankDesc};
use strait::{Provider, TransferEngine};

const RANKS: u32 = 4;
const EXPERTS: u32 = 32;
const TOP_K: u32 = 4;
const TOKENS: u32 = 128;
const HIDDEN: u32 = 2048;

fn main() -> strait::Result<()> {
    let config = MoeConfig::new(RANKS, EXPERTS, TOP_K, TOKENS, HIDDEN, MoeDtype::Bf16);
    let m = config.memory();
    println!(
        "receive memory per rank: {:.1} MB (pool {:.1} MB, combine {:.1} MB)",
        m.receive() as f64 / 1e6,
        m.pool as f64 / 1e6,
        m.combine as f64 / 1e6
    );

    // Start-up: every rank registers its regions and publishes its descriptor.
    let ranks: Vec<MoeRank> = (0..RANKS)
        .map(|r| MoeRank::new(&TransferEngine::builder().provider(Provider::Tcp).interface("lo").build()?, config, r))
        .collect::<strait::Result<_>>()?;
    let descriptors: Vec<Vec<u8>> = ranks.iter().map(|r| r.descriptor().to_bytes()).collect();

    std::thread::scope(|s| {
        let threads: Vec<_> = ranks
            .into_iter()
            .map(|rank| {
                let descriptors = &descriptors;
                s.spawn(move || -> strait::Result<()> {
                    let me = rank.descriptor().rank;
                    let descs =
                        descriptors.iter().map(|b| MoeRankDesc::from_bytes(b)).collect::<strait::Result<Vec<_>>>()?;
                    let mut group = rank.connect(&descs)?;
                    // This rank's tokens: bf16 hidden states, top-k experts and weights.
                    let x: Vec<u8> =
                        (0..TOKENS * HIDDEN).flat_map(|i| f32_to_bf16(((i + me) % 17) as f32).to_le_bytes()).collect();
                    let topk_idx: Vec<i32> =
                        (0..TOKENS * TOP_K).map(|i| ((i * 7 + me * 3 + i / TOP_K) % EXPERTS) as i32).collect();
                    let topk_weights = vec![1.0 / TOP_K as f32; (TOKENS * TOP_K) as usize];

                    let d = group.dispatch(&x, &topk_idx, &topk_weights)?;
                    // d.expert_x: [local experts, d.capacity, hidden]; expert e's rows 0..d.counts[e].
                    // The "experts": double every row.
                    let expert_y: Vec<u8> = d
                        .expert_x
                        .chunks_exact(2)
                        .flat_map(|b| f32_to_bf16(2.0 * bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))).to_le_bytes())
                        .collect();
                    let y = group.combine(&expert_y, &d.handle)?;
                    // Weights sum to 1: y is 2x.
                    let ok = y.chunks_exact(2).zip(x.chunks_exact(2)).all(|(a, b)| {
                        bf16_to_f32(u16::from_le_bytes([a[0], a[1]]))
                            == 2.0 * bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))
                    });
                    println!(
                        "rank {me}: experts got {:?} rows; combine {}",
                        d.counts,
                        if ok { "= 2x" } else { "WRONG" }
                    );
                    Ok(())
                })
            })
            .collect();
        threads.into_iter().try_for_each(|t| t.join().expect("rank thread"))
    })
}
