//! The figures of the GPU work, measured on a machine with a GPU (run by
//! `scripts/device-check.sh`; without CUDA it says why and exits 0).
//!
//! * Staged throughput over libfabric tcp on loopback: a GPU-to-GPU write
//!   between two engines at 1, 16 and 256 MiB, against the same run's
//!   host-to-host write and plain `cuMemcpy` device-to-host plus
//!   host-to-device of the same bytes (pinned host memory): medians of
//!   `--repeat` runs (default 5).
//! * Counter-to-stream release: from the worker's delivery of the
//!   immediate that reaches a counter (its `on_reached` callback, which
//!   runs right after the GPU-visible word is stored) to the CPU seeing the
//!   store of a stream that waited on the counter.
//! * Trigger-to-post: from enqueuing `cuStreamWriteValue32` on an idle
//!   stream to the trigger's callback having submitted a write.
//!
//! `cargo run --release --example device_check -- [--repeat N]`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::sys;
use strait::{Access, Provider, StreamTrigger, TransferEngine, TriggerPoll};

const TIMEOUT: Duration = Duration::from_secs(60);

fn check(what: &str, rc: sys::CUresult) {
    assert_eq!(rc, sys::CUresult::CUDA_SUCCESS, "{what}");
}

fn engine() -> TransferEngine {
    TransferEngine::builder().provider(Provider::Tcp).interface("lo").build().expect("engine on tcp over lo")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// Makes GPU 0's primary context current on this thread.
fn bind_gpu0() {
    let (mut dev, mut ctx) = (0, std::ptr::null_mut());
    // SAFETY: plain driver calls writing their out-parameters.
    unsafe {
        check("cuDeviceGet", sys::cuDeviceGet(&mut dev, 0));
        check("cuDevicePrimaryCtxRetain", sys::cuDevicePrimaryCtxRetain(&mut ctx, dev));
        check("cuCtxSetCurrent", sys::cuCtxSetCurrent(ctx));
    }
}

/// A stream on GPU 0's primary context (made current on this thread).
fn stream() -> u64 {
    bind_gpu0();
    let mut s = std::ptr::null_mut();
    // SAFETY: writes the stream.
    check("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32) });
    s as u64
}

fn throughput(repeat: usize) {
    let (a, b) = (engine(), engine());
    println!("staged throughput, tcp loopback, median of {repeat} (GB/s):");
    println!("{:>9} {:>12} {:>12} {:>16} {:>10}", "size", "host->host", "GPU->GPU", "cuMemcpy D2H+H2D", "GPU/host");
    for mib in [1u64, 16, 256] {
        let len = mib << 20;
        let h_src = a.alloc(len, Access::LOCAL).unwrap();
        let h_dst = b.alloc(len, Access::REMOTE_WRITE).unwrap();
        let g_src = a.alloc_device(len, 0, Access::LOCAL).unwrap();
        let g_dst = b.alloc_device(len, 0, Access::REMOTE_WRITE).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
        h_src.write_at(0, &data).unwrap();
        g_src.write_at(0, &data).unwrap();
        let time = |src: &strait::MemoryRegion, dst: &strait::MemoryRegion| {
            let t = Instant::now();
            a.write(src, 0, dst.descriptor(), 0, len, None).unwrap().wait_timeout(TIMEOUT).unwrap();
            t.elapsed().as_secs_f64()
        };
        // Warm-up (connections, stager start), then alternate A/B.
        time(&h_src, &h_dst);
        time(&g_src, &g_dst);
        let (mut host, mut gpu) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            host.push(time(&h_src, &h_dst));
            gpu.push(time(&g_src, &g_dst));
        }
        assert!(g_dst.to_vec(0, len).unwrap() == data, "GPU->GPU bytes differ at {mib} MiB");
        let copy = memcpy_round_trip(len, repeat);
        let (h, g, c) = (gbps(len, median(host)), gbps(len, median(gpu)), gbps(len, copy));
        println!("{:>6} MiB {h:>12.2} {g:>12.2} {c:>16.2} {:>10.2}", mib, g / h);
    }
}

/// Median seconds of a synchronous device-to-host then host-to-device copy
/// of `len` bytes through pinned host memory.
fn memcpy_round_trip(len: u64, repeat: usize) -> f64 {
    bind_gpu0();
    let (mut d_src, mut d_dst, mut host) = (0, 0, std::ptr::null_mut());
    // SAFETY: allocations of len bytes, freed below.
    unsafe {
        check("cuMemAlloc", sys::cuMemAlloc_v2(&mut d_src, len as usize));
        check("cuMemAlloc", sys::cuMemAlloc_v2(&mut d_dst, len as usize));
        check("cuMemHostAlloc", sys::cuMemHostAlloc(&mut host, len as usize, 0));
    }
    let mut times = Vec::new();
    for _ in 0..repeat + 1 {
        let t = Instant::now();
        // SAFETY: the ranges are the allocations above.
        unsafe {
            check("cuMemcpyDtoH", sys::cuMemcpyDtoH_v2(host, d_src, len as usize));
            check("cuMemcpyHtoD", sys::cuMemcpyHtoD_v2(d_dst, host, len as usize));
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.remove(0);
    // SAFETY: freed once.
    unsafe {
        sys::cuMemFree_v2(d_src);
        sys::cuMemFree_v2(d_dst);
        sys::cuMemFreeHost(host);
    }
    median(times)
}

fn release_latency(rounds: usize) {
    let (a, b) = (engine(), engine());
    let dst = b.alloc(4096, Access::REMOTE_WRITE).unwrap();
    let s = stream();
    let released = StreamTrigger::new(TriggerPoll::Spin, |_| {}).unwrap();
    let counter = b.expect_imm(1, 1).unwrap();
    let reached: Arc<Mutex<Option<Instant>>> = Arc::default();
    let r = reached.clone();
    counter.on_reached(move |_| *r.lock().unwrap() = Some(Instant::now()));
    let mut us = Vec::new();
    for round in 1..=rounds as u32 {
        *reached.lock().unwrap() = None;
        counter.wait_on_stream(s).unwrap();
        released.fire_on_stream(s, round).unwrap();
        a.write_imm(dst.descriptor(), 1).unwrap().wait_timeout(TIMEOUT).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while released.value() != round {
            assert!(Instant::now() < deadline, "round {round}: the stream was not released");
            std::hint::spin_loop();
        }
        let seen = Instant::now();
        let t0 = reached.lock().unwrap().expect("reached before the release");
        us.push(seen.duration_since(t0).as_secs_f64() * 1e6);
        counter.rearm(1).unwrap();
    }
    println!(
        "counter-to-stream release ({rounds} rounds): p50 {:.1} us, p99 {:.1} us",
        percentile(&mut us, 0.5),
        percentile(&mut us, 0.99)
    );
}

fn trigger_latency(rounds: usize) {
    let (a, b) = (engine(), engine());
    let src = a.alloc(4096, Access::LOCAL).unwrap();
    let dst = b.alloc(4096, Access::REMOTE_WRITE).unwrap();
    let desc = dst.descriptor().clone();
    let posted: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let p = posted.clone();
    let sender = a.clone();
    let landed = b.expect_imm(2, rounds as u64).unwrap();
    let trigger = StreamTrigger::new(TriggerPoll::Spin, move |_| {
        sender.write(&src, 0, &desc, 0, 4096, Some(2)).expect("submits");
        p.lock().unwrap().push(Instant::now());
    })
    .unwrap();
    let s = stream();
    let mut us = Vec::new();
    for round in 1..=rounds as u32 {
        let t0 = Instant::now();
        trigger.fire_on_stream(s, round).unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while posted.lock().unwrap().len() < round as usize {
            assert!(Instant::now() < deadline, "round {round}: the trigger did not fire");
            std::hint::spin_loop();
        }
        us.push(posted.lock().unwrap()[round as usize - 1].duration_since(t0).as_secs_f64() * 1e6);
        std::thread::sleep(Duration::from_micros(200));
    }
    landed.wait_timeout(TIMEOUT).unwrap();
    println!(
        "trigger-to-post ({rounds} rounds, enqueue of the stream's store to the write submitted): p50 {:.1} us, \
         p99 {:.1} us",
        percentile(&mut us, 0.5),
        percentile(&mut us, 0.99)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let repeat = args.iter().position(|a| a == "--repeat").and_then(|i| args.get(i + 1)?.parse().ok()).unwrap_or(5);
    match strait::cuda::probe() {
        Err(e) => {
            println!("device check skipped: {e}");
            return;
        }
        Ok(info) => {
            println!("CUDA driver {}", info.driver_version_string());
            for g in &info.gpus {
                println!("  GPU {}: {} ({} GiB, PCI {})", g.ordinal, g.name, g.memory >> 30, g.pci);
            }
        }
    }
    throughput(repeat);
    release_latency(200);
    trigger_latency(200);
}
