//! GPU memory and GPU-visible completion on a real GPU, over libfabric tcp
//! on loopback (staged: Debian's libfabric has no CUDA support). Every test
//! skips, printing the reason, where CUDA is unavailable; on a machine with
//! a GPU they run as they are (`scripts/device-check.sh` runs this binary
//! there). The staging logic itself is tested everywhere with the host
//! stand-in of the copy engine (src/engine/staging_tests.rs).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, skipped, TIMEOUT};
use cudarc::driver::sys;
use strait::{Access, CopyList, MrDesc, PagedLayout, Provider, StreamTrigger, Strided, TransferEngine, TriggerPoll};

/// GPU 0 when CUDA is usable, else `None` after printing why.
fn gpu(what: &str) -> Option<u32> {
    match strait::cuda::probe() {
        Ok(info) => {
            let g = &info.gpus[0];
            eprintln!("{what}: on GPU 0 ({}, driver {})", g.name, info.driver_version_string());
            Some(0)
        }
        Err(e) => {
            skipped(what, &e.to_string());
            None
        }
    }
}

fn engine() -> TransferEngine {
    TransferEngine::builder().provider(Provider::Tcp).interface("lo").build().expect("engine on tcp over lo")
}

fn check(what: &str, rc: sys::CUresult) {
    assert_eq!(rc, sys::CUresult::CUDA_SUCCESS, "{what}");
}

/// A stream of its own on GPU 0's primary context, current on this thread.
fn stream() -> u64 {
    let (mut dev, mut ctx, mut s) = (0, std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: plain driver calls writing their out-parameters.
    unsafe {
        check("cuDeviceGet", sys::cuDeviceGet(&mut dev, 0));
        check("cuDevicePrimaryCtxRetain", sys::cuDevicePrimaryCtxRetain(&mut ctx, dev));
        check("cuCtxSetCurrent", sys::cuCtxSetCurrent(ctx));
        check("cuStreamCreate", sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32));
    }
    s as u64
}

fn synchronize(stream: u64) {
    // SAFETY: a live stream.
    check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(stream as sys::CUstream) });
}

#[test]
fn gpu_to_gpu_write_lands_before_its_immediate() {
    let Some(g) = gpu("GPU-to-GPU write with immediate") else { return };
    let (a, b) = (engine(), engine());
    let len = (16u64 << 20) + 12345;
    let src = a.alloc_device(len, g, Access::LOCAL).unwrap();
    let dst = b.alloc_device(len + 4096, g, Access::REMOTE_READ_WRITE).unwrap();
    assert!(dst.descriptor().is_staged());
    let data = pattern(len as usize, 1);
    src.write_at(0, &data).unwrap();
    let arrived = b.expect_imm(42, 1).unwrap();
    let w = a.write(&src, 0, dst.descriptor(), 4096, len, Some(42)).unwrap();
    arrived.wait_timeout(TIMEOUT).unwrap();
    assert!(dst.to_vec(4096, len).unwrap() == data, "bytes in GPU memory when the immediate came");
    w.wait_timeout(TIMEOUT).unwrap();
}

#[test]
fn paged_write_between_gpu_caches() {
    let Some(g) = gpu("paged write and strided copies between GPU caches") else { return };
    let (a, b) = (engine(), engine());
    let (page, pages) = (16u64 << 10, 256u32);
    let src = a.alloc_device(page * pages as u64, g, Access::LOCAL).unwrap();
    let dst = b.alloc_device(page * 2 * pages as u64, g, Access::REMOTE_WRITE).unwrap();
    let data = pattern((page * pages as u64) as usize, 2);
    src.write_at(0, &data).unwrap();
    let src_pages: Vec<u32> = (0..pages).collect();
    let dst_pages: Vec<u32> = (0..pages).map(|p| 2 * pages - 1 - p).collect();
    let done = b.expect_imm(7, 1).unwrap();
    a.write_paged(&src, dst.descriptor(), PagedLayout::contiguous(page), src_pages.clone(), dst_pages.clone(), Some(7))
        .unwrap()
        .wait_timeout(TIMEOUT)
        .unwrap();
    done.wait_timeout(TIMEOUT).unwrap();
    for (s, d) in src_pages.iter().zip(&dst_pages) {
        let want = &data[(*s as u64 * page) as usize..((*s as u64 + 1) * page) as usize];
        assert!(dst.to_vec(*d as u64 * page, page).unwrap() == want, "page {s} -> {d}");
    }
    // An NHD head slice: a strided row per token, GPU to GPU.
    let copy = Strided { src_offset: 64, dst_offset: 0, rows: 4096, row_len: 256, src_stride: 1024, dst_stride: 512 };
    let list = CopyList::new(vec![copy]).unwrap();
    a.write_copies(&src, 0, dst.descriptor(), 0, &list, None).unwrap().wait_timeout(TIMEOUT).unwrap();
    let got = dst.to_vec(0, 4096 * 512).unwrap();
    for r in 0..4096usize {
        assert!(got[r * 512..r * 512 + 256] == data[64 + r * 1024..64 + r * 1024 + 256], "row {r}");
    }
}

#[test]
fn reads_and_host_gpu_directions_are_byte_exact() {
    let Some(g) = gpu("read, host-to-GPU, GPU-to-host") else { return };
    let (a, b) = (engine(), engine());
    let len = 5u64 << 20;
    let data = pattern(len as usize, 3);
    let a_dev = a.alloc_device(len, g, Access::LOCAL).unwrap();
    let a_host = a.alloc(len, Access::LOCAL).unwrap();
    let b_dev = b.alloc_device(len, g, Access::REMOTE_READ_WRITE).unwrap();
    let b_host = b.alloc(len, Access::REMOTE_READ_WRITE).unwrap();
    a_host.write_at(0, &data).unwrap();
    a.write(&a_host, 0, b_dev.descriptor(), 0, len, None).unwrap().wait_timeout(TIMEOUT).unwrap();
    assert!(b_dev.to_vec(0, len).unwrap() == data, "host -> GPU");
    a.read(&a_dev, 0, b_dev.descriptor(), 0, len).unwrap().wait_timeout(TIMEOUT).unwrap();
    assert!(a_dev.to_vec(0, len).unwrap() == data, "GPU <- GPU (read)");
    a.write(&a_dev, 0, b_host.descriptor(), 0, len, None).unwrap().wait_timeout(TIMEOUT).unwrap();
    assert!(b_host.to_vec(0, len).unwrap() == data, "GPU -> host");
    let back = a.alloc(len, Access::LOCAL).unwrap();
    a.read(&back, 0, b_dev.descriptor(), 0, len).unwrap().wait_timeout(TIMEOUT).unwrap();
    assert!(back.to_vec(0, len).unwrap() == data, "host <- GPU (read)");
}

/// What a trigger's callback saw: the last value.
fn watcher() -> (Arc<AtomicU32>, impl FnMut(u32) + Send + 'static) {
    let seen = Arc::new(AtomicU32::new(0));
    let s = seen.clone();
    (seen, move |v| s.store(v, Ordering::Release))
}

fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_micros(50));
    }
}

#[test]
fn a_stream_waits_on_a_counter_until_the_immediate_comes() {
    let Some(g) = gpu("stream waiting on a counter") else { return };
    let (a, b) = (engine(), engine());
    let dst = b.alloc_device(4096, g, Access::REMOTE_WRITE).unwrap();
    let s = stream();
    let counter = b.expect_imm(5, 1).unwrap();
    let (seen, on_fire) = watcher();
    let released = StreamTrigger::new(TriggerPoll::Spin, on_fire).unwrap();
    counter.wait_on_stream(s).unwrap();
    released.fire_on_stream(s, 1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(seen.load(Ordering::Acquire), 0, "the stream went on before the immediate");
    a.write_imm(dst.descriptor(), 5).unwrap().wait_timeout(TIMEOUT).unwrap();
    eventually("the stream was not released by the immediate", || seen.load(Ordering::Acquire) == 1);
    synchronize(s);
}

#[test]
fn a_captured_graph_waits_on_each_round() {
    let Some(g) = gpu("stream wait inside a captured CUDA graph") else { return };
    let (a, b) = (engine(), engine());
    let dst = b.alloc_device(4096, g, Access::REMOTE_WRITE).unwrap();
    let s = stream();
    let counter = b.expect_imm(6, 1).unwrap();
    let (seen, on_fire) = watcher();
    let released = StreamTrigger::new(TriggerPoll::Spin, on_fire).unwrap();
    let (mut graph, mut exec) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: capture on a live stream; the graph is instantiated and
    // destroyed below.
    unsafe {
        check(
            "cuStreamBeginCapture",
            sys::cuStreamBeginCapture_v2(s as sys::CUstream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED),
        );
    }
    counter.wait_on_stream_and_clear(s).unwrap();
    released.fire_on_stream(s, 1).unwrap();
    // SAFETY: as above.
    unsafe {
        check("cuStreamEndCapture", sys::cuStreamEndCapture(s as sys::CUstream, &mut graph));
        check("cuGraphInstantiate", sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0));
    }
    for round in 0..3 {
        // SAFETY: a live executable graph and stream.
        check("cuGraphLaunch", unsafe { sys::cuGraphLaunch(exec, s as sys::CUstream) });
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(seen.load(Ordering::Acquire), 0, "round {round}: the graph went on before the immediate");
        a.write_imm(dst.descriptor(), 6).unwrap().wait_timeout(TIMEOUT).unwrap();
        eventually("the graph was not released", || seen.load(Ordering::Acquire) == 1);
        synchronize(s);
        released.fire(0);
        eventually("the trigger did not see the reset", || seen.load(Ordering::Acquire) == 0);
        counter.wait_timeout(TIMEOUT).unwrap();
        counter.rearm(1).unwrap();
    }
    // SAFETY: destroyed once, after the stream finished.
    unsafe {
        sys::cuGraphExecDestroy(exec);
        sys::cuGraphDestroy(graph);
    }
}

#[test]
fn a_stream_written_trigger_starts_a_transfer() {
    let Some(g) = gpu("stream-written trigger starting a transfer") else { return };
    let (a, b) = (engine(), engine());
    let src = a.alloc_device(1 << 20, g, Access::LOCAL).unwrap();
    let data = pattern(1 << 20, 4);
    src.write_at(0, &data).unwrap();
    let dst = b.alloc_device(1 << 20, g, Access::REMOTE_WRITE).unwrap();
    let (desc, sender) = (dst.descriptor().clone(), a.clone());
    let landed = b.expect_imm(8, 1).unwrap();
    let trigger = StreamTrigger::new(TriggerPoll::Spin, move |_| {
        sender.write(&src, 0, &desc, 0, 1 << 20, Some(8)).expect("submits");
    })
    .unwrap();
    let s = stream();
    trigger.fire_on_stream(s, 1).unwrap();
    landed.wait_timeout(TIMEOUT).unwrap();
    assert!(dst.to_vec(0, 1 << 20).unwrap() == data);
    synchronize(s);
}

/// The child of `gpu_to_gpu_between_two_processes`: registers GPU memory,
/// prints its descriptor, waits for the parent's write and checks it.
#[test]
#[ignore = "child process of gpu_to_gpu_between_two_processes; run by it"]
fn gpu_peer_process() {
    let Ok(len) = std::env::var("STRAIT_GPU_PEER_LEN") else { return };
    let len: u64 = len.parse().unwrap();
    let e = engine();
    let dst = e.alloc_device(len, 0, Access::REMOTE_WRITE).unwrap();
    let arrived = e.expect_imm(9, 1).unwrap();
    println!("DESC {}", dst.descriptor());
    std::io::stdout().flush().unwrap();
    arrived.wait_timeout(TIMEOUT).unwrap();
    let ok = dst.to_vec(0, len).unwrap() == pattern(len as usize, 5);
    println!("{}", if ok { "BYTES OK" } else { "BYTES DIFFER" });
}

#[test]
fn gpu_to_gpu_between_two_processes() {
    let Some(g) = gpu("GPU-to-GPU write between two processes") else { return };
    let len = 8u64 << 20;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "gpu_peer_process", "--nocapture", "--test-threads=1"])
        .env("STRAIT_GPU_PEER_LEN", len.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let desc = loop {
        let line = lines.next().expect("the child ended before its descriptor").unwrap();
        if let Some(d) = line.strip_prefix("DESC ") {
            break d.parse::<MrDesc>().unwrap();
        }
    };
    let e = engine();
    let src = e.alloc_device(len, g, Access::LOCAL).unwrap();
    src.write_at(0, &pattern(len as usize, 5)).unwrap();
    e.write(&src, 0, &desc, 0, len, Some(9)).unwrap().wait_timeout(TIMEOUT).unwrap();
    let verdict = lines.find_map(|l| l.ok().filter(|l| l.starts_with("BYTES"))).expect("the child's verdict");
    assert_eq!(verdict, "BYTES OK");
    assert!(child.wait().unwrap().success());
}
