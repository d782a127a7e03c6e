//! What staging device memory costs on the CPU side, over libfabric tcp on
//! loopback: a write between two engines' host regions (the baseline)
//! against the same write between two "device" regions of the host
//! stand-in (`EngineBuilder::host_device_stand_in`: host memory that only
//! the stager's copies touch, copied with memcpy), which runs the whole
//! staging protocol (slots, `Put`, the peer's read into its slot and copy
//! out, `Done`) without a GPU. On a GPU the copies run on the copy
//! engines instead (`examples/device_check.rs` measures that).
//!
//! `cargo bench --features test-backend --bench staging`

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use strait::{Access, Provider, TransferEngine};

fn engine() -> TransferEngine {
    TransferEngine::builder()
        .provider(Provider::Tcp)
        .interface("lo")
        .host_device_stand_in()
        .build()
        .expect("engine on libfabric tcp over lo")
}

fn staging(c: &mut Criterion) {
    let (a, b) = (engine(), engine());
    let mut g = c.benchmark_group("write over tcp");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for mib in [1u64, 16] {
        let len = mib << 20;
        g.throughput(Throughput::Bytes(len));
        let (h_src, h_dst) = (a.alloc(len, Access::LOCAL).unwrap(), b.alloc(len, Access::REMOTE_WRITE).unwrap());
        let d_src = a.alloc_device(len, 0, Access::LOCAL).unwrap();
        let d_dst = b.alloc_device(len, 0, Access::REMOTE_WRITE).unwrap();
        g.bench_with_input(BenchmarkId::new("host to host", format!("{mib} MiB")), &len, |bench, &len| {
            bench.iter(|| a.write(&h_src, 0, h_dst.descriptor(), 0, len, None).unwrap().wait().unwrap())
        });
        g.bench_with_input(BenchmarkId::new("staged device to device", format!("{mib} MiB")), &len, |bench, &len| {
            bench.iter(|| a.write(&d_src, 0, d_dst.descriptor(), 0, len, None).unwrap().wait().unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, staging);
criterion_main!(benches);
