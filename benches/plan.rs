//! Planning cost: how long the pure planner takes to turn requests into
//! per-NIC pieces. Paged writes use scattered page indices (no two pages
//! adjacent on both sides), so every page is its own piece: the worst case.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use strait::plan::{PagedPlan, ShardPlan};
use strait::{PagedLayout, ShardConfig};

/// A fixed permutation of `0..n` that leaves no two consecutive indices
/// next to each other (multiplication by an odd constant modulo a power of
/// two, `n` being one).
fn scattered_pages(n: u32) -> Vec<u32> {
    (0..n).map(|i| i.wrapping_mul(2_654_435_761) % n).collect()
}

fn paged(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan/paged");
    let page_len = 4096u64;
    for pages in [1024u32, 65536] {
        let src = scattered_pages(pages);
        let dst: Vec<u32> = src.iter().rev().copied().collect();
        let region = pages as u64 * page_len;
        for nics in [1usize, 2, 4] {
            group.throughput(Throughput::Elements(pages as u64));
            group.bench_with_input(BenchmarkId::new(format!("{pages}p"), format!("{nics}nic")), &nics, |b, &nics| {
                b.iter_batched(
                    || (src.clone(), dst.clone()),
                    |(s, d)| {
                        let mut plan = PagedPlan::new(
                            PagedLayout::contiguous(page_len),
                            s,
                            d,
                            region,
                            region,
                            0,
                            nics,
                            nics,
                            4 << 20,
                        )
                        .expect("valid plan");
                        let mut bytes = 0;
                        while let Some(piece) = plan.next_piece() {
                            bytes += black_box(piece).len;
                        }
                        bytes
                    },
                    BatchSize::LargeInput,
                )
            });
        }
    }
    group.finish();
}

fn shard(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan/shard");
    let config = ShardConfig::default();
    for (len, name) in [(64u64 << 10, "64KiB"), (16 << 20, "16MiB"), (1 << 30, "1GiB")] {
        for nics in [1usize, 2, 4] {
            group.bench_with_input(BenchmarkId::new(name, format!("{nics}nic")), &nics, |b, &nics| {
                b.iter(|| {
                    let plan = ShardPlan::new(0, 0, black_box(len), 0, nics, nics, &config);
                    (0..plan.count()).map(|i| black_box(plan.piece(i)).len).sum::<u64>()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, paged, shard);
criterion_main!(benches);
