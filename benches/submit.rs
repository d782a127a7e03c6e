//! The engine's cost per request and per work item, with no network: the
//! null test backend completes every operation at the next poll. Each
//! iteration submits a batch of requests and waits for all of them, so the
//! figure covers the whole path: argument checks, planning, the hand-off to
//! the worker, posting, completion and the caller's wake-up.
//!
//! Run with `cargo bench --features test-backend --bench submit`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use strait::{Access, PagedLayout, PollMode, TransferEngine};

const BATCH: u64 = 256;

fn engine(nics: usize) -> TransferEngine {
    TransferEngine::builder().nics(nics).poll_mode(PollMode::Busy).build_null_backend().expect("null backend")
}

/// Runs `iters` batches of `submit` and returns the time they took.
fn batches(iters: u64, mut submit: impl FnMut() -> strait::Transfer) -> Duration {
    let mut pending = Vec::with_capacity(BATCH as usize);
    let start = Instant::now();
    for _ in 0..iters {
        pending.extend((0..BATCH).map(|_| submit()));
        for t in pending.drain(..) {
            t.wait().expect("null backend completes");
        }
    }
    start.elapsed()
}

fn single(c: &mut Criterion) {
    let mut group = c.benchmark_group("submit");
    group.throughput(Throughput::Elements(BATCH));
    for nics in [1usize, 4] {
        let engine = engine(nics);
        let region = engine.alloc(64 << 20, Access::REMOTE_WRITE).unwrap();
        let dst = region.descriptor().clone();
        group.bench_function(BenchmarkId::new("write_4KiB", format!("{nics}nic")), |b| {
            b.iter_custom(|iters| batches(iters, || engine.write(&region, 0, &dst, 4096, 4096, None).unwrap()))
        });
        group.bench_function(BenchmarkId::new("write_4KiB_imm", format!("{nics}nic")), |b| {
            b.iter_custom(|iters| batches(iters, || engine.write(&region, 0, &dst, 4096, 4096, Some(7)).unwrap()))
        });
    }
    group.finish();
}

/// Per work item: requests that the planner turns into many pieces.
fn items(c: &mut Criterion) {
    let mut group = c.benchmark_group("submit_items");
    for nics in [1usize, 4] {
        let engine = engine(nics);
        let region = engine.alloc(64 << 20, Access::REMOTE_WRITE).unwrap();
        let dst = region.descriptor().clone();
        // 64 scattered 16 KiB pages: 64 work items per request.
        let pages: Vec<u32> = (0..64u32).map(|i| i * 7 % 64 * 2).collect();
        group.throughput(Throughput::Elements(BATCH * 64));
        group.bench_function(BenchmarkId::new("paged_64x16KiB", format!("{nics}nic")), |b| {
            b.iter_custom(|iters| {
                batches(iters, || {
                    let layout = PagedLayout::contiguous(16 << 10);
                    engine.write_paged(&region, &dst, layout, pages.clone(), pages.clone(), Some(1)).unwrap()
                })
            })
        });
        // 64 MiB sharded into 16 pieces of 4 MiB.
        group.throughput(Throughput::Elements(BATCH * 16));
        group.bench_function(BenchmarkId::new("write_64MiB_sharded", format!("{nics}nic")), |b| {
            b.iter_custom(|iters| batches(iters, || engine.write(&region, 0, &dst, 0, 64 << 20, Some(2)).unwrap()))
        });
    }
    group.finish();
}

/// The same 256 requests as `single`, submitted as one batch: with a
/// handle per request, and with one handle for the batch.
fn batched(c: &mut Criterion) {
    let mut group = c.benchmark_group("submit_batch");
    group.throughput(Throughput::Elements(BATCH));
    for nics in [1usize, 4] {
        let engine = engine(nics);
        let region = engine.alloc(64 << 20, Access::REMOTE_WRITE).unwrap();
        let dst = region.descriptor().clone();
        group.bench_function(BenchmarkId::new("write_4KiB_handles", format!("{nics}nic")), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut batch = engine.batch();
                    for _ in 0..BATCH {
                        batch.write(&region, 0, &dst, 4096, 4096, None).unwrap();
                    }
                    for t in batch.submit().unwrap() {
                        t.wait().expect("null backend completes");
                    }
                }
                start.elapsed()
            })
        });
        group.bench_function(BenchmarkId::new("write_4KiB_joined", format!("{nics}nic")), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut batch = engine.batch();
                    for _ in 0..BATCH {
                        batch.write(&region, 0, &dst, 4096, 4096, None).unwrap();
                    }
                    batch.submit_joined().unwrap().wait().expect("null backend completes");
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

/// The caller's cost of submitting one layer of a KV request: llama3-8b
/// shapes (8 KV heads, head dim 128, bf16, 16-token blocks), 4096 tokens =
/// 256 blocks, scattered destination blocks (512 K/V runs per layer), vLLM
/// layout. Only the `send_layers` call is timed; the request's set-up
/// (planned once) and the completions are not.
fn kv_layer(c: &mut Criterion) {
    use strait::kv::{KvCache, KvConfig, KvExpect, KvLayout, KvShape, Tp};
    let mut group = c.benchmark_group("kv");
    group.throughput(Throughput::Elements(1));
    let engine = engine(1);
    let layers = 4;
    let shape =
        KvShape { layers, blocks: 256, block_tokens: 16, heads: 8, total_heads: 8, head_dim: 128, elem_bytes: 2 };
    let layout = KvLayout::vllm_flash(shape);
    let decoder = KvCache::alloc(&engine, layout, Tp::SINGLE, KvConfig::default()).unwrap();
    let sender = KvCache::alloc(&engine, layout, Tp::SINGLE, KvConfig::default()).unwrap();
    let src: Vec<u32> = (0..256).collect();
    let dst: Vec<u32> = (0..256u32).map(|i| i * 37 % 256).collect();
    let senders = [sender.descriptor().clone()];
    group.bench_function("send_layer_256_blocks", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let recv = decoder.expect(&KvExpect::push(&senders, &dst)).unwrap();
                let send = sender.push(recv.request(), decoder.descriptor(), &src).unwrap();
                let n = left.min(layers as u64) as u32;
                let start = Instant::now();
                for l in 0..n {
                    send.send_layers(l..l + 1).unwrap();
                }
                timed += start.elapsed();
                send.send_layers(n..layers).unwrap();
                recv.wait().unwrap();
                left -= n as u64;
            }
            timed
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = single, items, batched, kv_layer
}
criterion_main!(benches);
