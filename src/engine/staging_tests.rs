//! The staging of device memory (see [`super::staging`]) between real
//! engines over libfabric tcp on loopback, with the host stand-in of the
//! copy engine: "device" regions here are host memory that only the
//! stager's copies touch. The protocol, the chunking, the slot pools, the
//! order of bytes and immediates and the failures are the ones a GPU gets;
//! the copies themselves are memcpy. `scripts/device-check.sh` runs the
//! same transfers on a GPU.

use std::time::Duration;

use super::*;
use crate::plan::Strided;

const WAIT: Duration = Duration::from_secs(20);

/// Two slots of 64 KiB per side: a 1 MiB request is 16 chunks queued for
/// two slots.
fn engine(timeout: Duration) -> TransferEngine {
    TransferEngine::builder()
        .provider(Provider::Tcp)
        .interface("lo")
        .request_timeout(timeout)
        .staging(2, 64 << 10)
        .host_device_stand_in()
        .build()
        .expect("engine on libfabric tcp over lo")
}

/// `len` bytes that differ with `seed` (shared with `packing_tests`).
pub(super) fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8).collect()
}

#[test]
fn device_to_device_writes_land_before_their_immediate() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    let len = (1 << 20) + 4321;
    let src = a.alloc_device(len as u64, 0, Access::LOCAL).unwrap();
    let dst = b.alloc_device(len as u64 + 100, 0, Access::REMOTE_READ_WRITE).unwrap();
    assert!(dst.descriptor().is_staged() && src.descriptor().is_staged());
    assert_eq!(src.gpu(), Some(0));
    let data = pattern(len, 1);
    src.write_at(0, &data).unwrap();
    let arrived = b.expect_imm(77, 1).unwrap();
    let write = a.write(&src, 0, dst.descriptor(), 100, len as u64, Some(77)).unwrap();
    // The immediate first: when it has come, every byte must be there.
    arrived.wait_timeout(WAIT).unwrap();
    assert_eq!(dst.to_vec(100, len as u64).unwrap(), data);
    write.wait_timeout(WAIT).unwrap();
    assert_eq!(dst.to_vec(0, 100).unwrap(), vec![0; 100], "bytes before the offset untouched");
}

#[test]
fn every_direction_between_host_and_device_is_byte_exact() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    let len = 300_000u64;
    let data = pattern(len as usize, 2);
    let a_dev = a.alloc_device(len, 0, Access::LOCAL).unwrap();
    let a_host = a.alloc(len, Access::LOCAL).unwrap();
    let b_dev = b.alloc_device(len, 0, Access::REMOTE_READ_WRITE).unwrap();
    let b_host = b.alloc(len, Access::REMOTE_READ_WRITE).unwrap();

    // host -> remote device
    a_host.write_at(0, &data).unwrap();
    a.write(&a_host, 0, b_dev.descriptor(), 0, len, None).unwrap().wait_timeout(WAIT).unwrap();
    assert_eq!(b_dev.to_vec(0, len).unwrap(), data);

    // remote device -> local device (read), at odd offsets
    a.read(&a_dev, 5, b_dev.descriptor(), 7, len - 7).unwrap().wait_timeout(WAIT).unwrap();
    assert_eq!(a_dev.to_vec(5, len - 7).unwrap(), data[7..]);

    // local device -> remote host, with an immediate (the engine's write
    // from the slot carries it)
    let data2 = pattern(len as usize, 3);
    a_dev.write_at(0, &data2).unwrap();
    let got = b.expect_imm(5, 1).unwrap();
    a.write(&a_dev, 0, b_host.descriptor(), 0, len, Some(5)).unwrap().wait_timeout(WAIT).unwrap();
    got.wait_timeout(WAIT).unwrap();
    assert_eq!(b_host.to_vec(0, len).unwrap(), data2);

    // remote host -> local device (read)
    let out = a.alloc_device(len, 0, Access::LOCAL).unwrap();
    a.read(&out, 0, b_host.descriptor(), 0, len).unwrap().wait_timeout(WAIT).unwrap();
    assert_eq!(out.to_vec(0, len).unwrap(), data2);

    // remote device -> local host (read)
    let back = a.alloc(len, Access::LOCAL).unwrap();
    a.read(&back, 0, b_dev.descriptor(), 0, len).unwrap().wait_timeout(WAIT).unwrap();
    assert_eq!(back.to_vec(0, len).unwrap(), data);

    // an immediate alone into a staged region's owner
    let only = b.expect_imm(9, 1).unwrap();
    a.write_imm(b_dev.descriptor(), 9).unwrap().wait_timeout(WAIT).unwrap();
    only.wait_timeout(WAIT).unwrap();
}

#[test]
fn sends_from_device_memory_arrive_as_messages() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    let src = a.alloc_device(8192, 0, Access::LOCAL).unwrap();
    let data = pattern(3000, 4);
    src.write_at(100, &data).unwrap();
    a.send(b.address(), &src, 100, 3000).unwrap().wait_timeout(WAIT).unwrap();
    assert_eq!(b.recv_timeout(WAIT).unwrap(), data);
    let big = a.alloc_device(1 << 20, 0, Access::LOCAL).unwrap();
    let err = a.send(b.address(), &big, 0, 1 << 20).unwrap().wait_timeout(WAIT).unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(ref m) if m.contains("staging slot")), "{err}");
}

#[test]
fn two_engines_staging_into_each_other_at_once_do_not_deadlock() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    let len = 1u64 << 20;
    let (a_src, b_src) =
        (a.alloc_device(len, 0, Access::LOCAL).unwrap(), b.alloc_device(len, 0, Access::LOCAL).unwrap());
    let (a_dst, b_dst) =
        (a.alloc_device(len, 0, Access::REMOTE_WRITE).unwrap(), b.alloc_device(len, 0, Access::REMOTE_WRITE).unwrap());
    let (da, db) = (pattern(len as usize, 5), pattern(len as usize, 6));
    a_src.write_at(0, &da).unwrap();
    b_src.write_at(0, &db).unwrap();
    let mut transfers = Vec::new();
    for i in 0..4u64 {
        let part = len / 4;
        transfers.push(a.write(&a_src, i * part, b_dst.descriptor(), i * part, part, None).unwrap());
        transfers.push(b.write(&b_src, i * part, a_dst.descriptor(), i * part, part, None).unwrap());
    }
    for t in &transfers {
        t.wait_timeout(WAIT).unwrap();
    }
    assert_eq!(b_dst.to_vec(0, len).unwrap(), da);
    assert_eq!(a_dst.to_vec(0, len).unwrap(), db);
}

#[test]
fn scatters_barriers_and_pings_take_staged_memory_and_checks_still_hold() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    let dev = b.alloc_device(1 << 16, 0, Access::REMOTE_READ_WRITE).unwrap();
    let host_dst = b.alloc(1 << 16, Access::REMOTE_WRITE).unwrap();
    let host = a.alloc(1 << 16, Access::LOCAL).unwrap();
    let data = pattern(1 << 16, 9);
    host.write_at(0, &data).unwrap();
    // A scatter to a staged and a host region: one outcome, both landed,
    // each immediate once.
    let got = b.expect_imm(51, 2).unwrap();
    let targets = [
        ScatterTarget { dst: dev.descriptor().clone(), src_offset: 0, dst_offset: 100, len: 5000, imm: Some(51) },
        ScatterTarget { dst: host_dst.descriptor().clone(), src_offset: 5000, dst_offset: 0, len: 3000, imm: Some(51) },
    ];
    a.scatter(&host, &targets).unwrap().wait_timeout(WAIT).unwrap();
    got.wait_timeout(WAIT).unwrap();
    assert_eq!(dev.to_vec(100, 5000).unwrap(), data[..5000]);
    assert_eq!(host_dst.to_vec(0, 3000).unwrap(), data[5000..8000]);
    // A barrier over both kinds, and a ping of a staged region's owner.
    let barrier = b.expect_imm(52, 2).unwrap();
    a.barrier(&[dev.descriptor().clone(), host_dst.descriptor().clone()], 52).unwrap().wait_timeout(WAIT).unwrap();
    barrier.wait_timeout(WAIT).unwrap();
    a.ping(dev.descriptor()).unwrap().wait_timeout(WAIT).unwrap();
    // Overlapping scatter targets are refused as for host memory, and a
    // batch's own scatter refuses staged memory.
    let overlap = [
        ScatterTarget { dst: dev.descriptor().clone(), src_offset: 0, dst_offset: 0, len: 16, imm: None },
        ScatterTarget { dst: dev.descriptor().clone(), src_offset: 0, dst_offset: 8, len: 16, imm: None },
    ];
    assert!(matches!(a.scatter(&host, &overlap), Err(Error::InvalidRequest(_))));
    assert!(matches!(a.batch().scatter(&host, &overlap[..1]), Err(Error::InvalidRequest(_))));
    // Access and ranges are checked as for host memory.
    let read_only = b.alloc_device(4096, 0, Access::REMOTE_READ).unwrap();
    assert!(matches!(a.write(&host, 0, read_only.descriptor(), 0, 16, None), Err(Error::RemoteAccess(_))));
    assert!(a.write(&host, 0, dev.descriptor(), 1 << 16, 1, None).is_err());
}

#[test]
fn a_dropped_staged_region_refuses_later_writes() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    let dev = b.alloc_device(1 << 16, 0, Access::REMOTE_WRITE).unwrap();
    let desc = dev.descriptor().clone();
    drop(dev);
    let host = a.alloc(1 << 16, Access::LOCAL).unwrap();
    let err = a.write(&host, 0, &desc, 0, 1 << 16, None).unwrap().wait_timeout(WAIT).unwrap_err();
    assert!(matches!(err, Error::RemoteAccess(ref m) if m.contains("no longer holds")), "{err}");
}

#[test]
fn a_peer_that_has_gone_fails_staged_writes_within_the_timeout() {
    let timeout = Duration::from_millis(800);
    let (a, b) = (engine(timeout), engine(timeout));
    let dev = b.alloc_device(1 << 20, 0, Access::REMOTE_WRITE).unwrap();
    let desc = dev.descriptor().clone();
    let host = a.alloc(1 << 16, Access::LOCAL).unwrap();
    a.write(&host, 0, &desc, 0, 1 << 16, None).unwrap().wait_timeout(WAIT).unwrap();
    drop(dev);
    b.shutdown();
    drop(b);
    let start = Instant::now();
    let err = a.write(&host, 0, &desc, 0, 1 << 16, Some(3)).unwrap().wait_timeout(WAIT).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert!(matches!(err, Error::Timeout(_) | Error::PeerUnreachable(_) | Error::Transport { .. }), "{err}");
    // A request of many chunks queued for the two slots fails as soon as
    // its first chunk does: the queued ones are not left waiting for the
    // slots the failed ones keep out of use.
    let big = a.alloc(1 << 20, Access::LOCAL).unwrap();
    let start = Instant::now();
    let many = a.write(&big, 0, &desc, 0, 1 << 20, None).unwrap();
    let more = a.write(&big, 0, &desc, 0, 1 << 20, Some(4)).unwrap();
    many.wait_timeout(WAIT).unwrap_err();
    more.wait_timeout(WAIT).unwrap_err();
    // `many` within a timeout; `more` waits for the slots `many`'s failed
    // chunks keep out of use for two timeouts, then fails within one.
    assert!(start.elapsed() < Duration::from_secs(8), "took {:?}", start.elapsed());
}

#[test]
fn an_immediate_alone_from_device_memory_reaches_a_host_region() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    let src = a.alloc_device(4096, 0, Access::LOCAL).unwrap();
    let dst = b.alloc(4096, Access::REMOTE_WRITE).unwrap();
    let got = b.expect_imm(31, 1).unwrap();
    a.write(&src, 0, dst.descriptor(), 0, 0, Some(31)).unwrap().wait_timeout(WAIT).unwrap();
    got.wait_timeout(WAIT).unwrap();
}

#[test]
fn without_cuda_device_memory_is_refused_with_the_reason() {
    if crate::cuda::available() {
        println!("skipped: CUDA is present here (the device check covers it)");
        return;
    }
    let e = TransferEngine::builder().provider(Provider::Tcp).interface("lo").build().unwrap();
    let err = e.alloc_device(4096, 0, Access::LOCAL).unwrap_err();
    assert!(matches!(err, Error::Cuda(ref m) if m.contains("no CUDA")), "{err}");
    // SAFETY: refused before anything touches the address.
    let err = unsafe { e.register_device(0x1000_0000, 4096, 0, Access::LOCAL) }.unwrap_err();
    assert!(matches!(err, Error::Cuda(_)), "{err}");
}

#[test]
fn a_counter_mirrors_its_rounds_into_the_words_streams_wait_on() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    let dst = b.alloc(4096, Access::REMOTE_WRITE).unwrap();
    let counter = b.expect_imm(11, 2).unwrap();
    let words = counter.mirror(true).unwrap();
    let read = |i| words.word(i).load(std::sync::atomic::Ordering::Acquire);
    assert_eq!((read(0), read(1)), (0, 0));
    a.write_imm(dst.descriptor(), 11).unwrap().wait_timeout(WAIT).unwrap();
    assert_eq!((read(0), read(1)), (0, 0), "one of two: not reached");
    a.write_imm(dst.descriptor(), 11).unwrap().wait_timeout(WAIT).unwrap();
    counter.wait_timeout(WAIT).unwrap();
    assert_eq!((read(0), read(1)), (1, 1));
    words.word(1).store(0, std::sync::atomic::Ordering::Release); // as a stream's clear would
    counter.rearm(1).unwrap();
    a.write_imm(dst.descriptor(), 11).unwrap().wait_timeout(WAIT).unwrap();
    counter.wait_timeout(WAIT).unwrap();
    assert_eq!((read(0), read(1)), (2, 1));
    // A cancel releases what waits on the round that will not come, and a
    // new round starts from clean words.
    words.word(1).store(0, std::sync::atomic::Ordering::Release);
    counter.rearm(1).unwrap();
    counter.cancel();
    assert_eq!(read(0), 2u32.wrapping_add(1 << 30));
    assert_eq!(read(1), 1);
    counter.rearm(1).unwrap();
    assert_eq!((read(0), read(1)), (2, 0));
    if !crate::cuda::available() {
        // The stand-in's words are host memory: no stream can wait on them.
        assert!(matches!(counter.wait_on_stream(0), Err(Error::Cuda(_))));
    }
}

#[test]
fn paged_writes_between_device_caches_pack_pages_into_slots() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    // 64 pages of 3 KiB (so pages straddle the 64 KiB slots), scattered.
    let (page, pages) = (3072u64, 64u32);
    let src = a.alloc_device(page * pages as u64, 0, Access::LOCAL).unwrap();
    let dst = b.alloc_device(page * 2 * pages as u64, 0, Access::REMOTE_READ_WRITE).unwrap();
    let data = pattern((page * pages as u64) as usize, 7);
    src.write_at(0, &data).unwrap();
    let src_pages: Vec<u32> = (0..pages).collect();
    // Runs of four consecutive pages, then a gap: coalesced into runs.
    let dst_pages: Vec<u32> = (0..pages).map(|p| p + (p / 4) * 4).collect();
    let landed = b.expect_imm(21, 1).unwrap();
    let layout = PagedLayout::contiguous(page);
    a.write_paged(&src, dst.descriptor(), layout, src_pages.clone(), dst_pages.clone(), Some(21))
        .unwrap()
        .wait_timeout(WAIT)
        .unwrap();
    landed.wait_timeout(WAIT).unwrap();
    for (s, d) in src_pages.iter().zip(&dst_pages) {
        let want = &data[(*s as u64 * page) as usize..((*s as u64 + 1) * page) as usize];
        assert_eq!(dst.to_vec(*d as u64 * page, page).unwrap(), want, "page {s} -> {d}");
    }
    // The gaps stay untouched.
    assert_eq!(dst.to_vec(4 * page, 4 * page).unwrap(), vec![0; 4 * page as usize]);
    // And from device memory into a peer's host cache.
    let host = b.alloc(page * 2 * pages as u64, Access::REMOTE_WRITE).unwrap();
    a.write_paged(&src, host.descriptor(), layout, src_pages.clone(), dst_pages.clone(), None)
        .unwrap()
        .wait_timeout(WAIT)
        .unwrap();
    for (s, d) in src_pages.iter().zip(&dst_pages) {
        let want = &data[(*s as u64 * page) as usize..((*s as u64 + 1) * page) as usize];
        assert_eq!(host.to_vec(*d as u64 * page, page).unwrap(), want, "host page {s} -> {d}");
    }
}

#[test]
fn strided_copy_lists_and_batches_move_staged_memory() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    // An NHD-like head slice: 300 rows of 96 bytes out of rows of 256, into
    // rows of 128 (two row strides, so nothing coalesces).
    let copy = Strided { src_offset: 32, dst_offset: 16, rows: 300, row_len: 96, src_stride: 256, dst_stride: 128 };
    let list = CopyList::new(vec![copy]).unwrap();
    let src = a.alloc_device(300 * 256 + 64, 0, Access::LOCAL).unwrap();
    let data = pattern(300 * 256 + 64, 8);
    src.write_at(0, &data).unwrap();
    let dst = b.alloc_device(300 * 128 + 64, 0, Access::REMOTE_READ_WRITE).unwrap();
    let landed = b.expect_imm(41, 1).unwrap();
    a.write_copies(&src, 0, dst.descriptor(), 0, &list, Some(41)).unwrap().wait_timeout(WAIT).unwrap();
    landed.wait_timeout(WAIT).unwrap();
    let got = dst.to_vec(0, 300 * 128 + 64).unwrap();
    for r in 0..300usize {
        let (s, d) = (32 + r * 256, 16 + r * 128);
        assert_eq!(got[d..d + 96], data[s..s + 96], "row {r}");
    }
    // Read back with a list (the peer's rows are the source now).
    let back_copy = Strided { src_offset: 16, dst_offset: 0, rows: 300, row_len: 96, src_stride: 128, dst_stride: 96 };
    let back_list = CopyList::new(vec![back_copy]).unwrap();
    let back = a.alloc(300 * 96, Access::LOCAL).unwrap();
    a.read_copies(&back, 0, dst.descriptor(), 0, &back_list).unwrap().wait_timeout(WAIT).unwrap();
    let back = back.to_vec(0, 300 * 96).unwrap();
    for r in 0..300usize {
        assert_eq!(back[r * 96..(r + 1) * 96], data[32 + r * 256..32 + r * 256 + 96], "read row {r}");
    }
    // A batch mixing staged and host requests: each its own outcome.
    let host_dst = b.alloc(4096, Access::REMOTE_WRITE).unwrap();
    let host_src = a.alloc(4096, Access::LOCAL).unwrap();
    host_src.write_at(0, &[5u8; 4096]).unwrap();
    let mut batch = a.batch();
    batch.write(&src, 0, dst.descriptor(), 0, 64, None).unwrap();
    batch.write(&host_src, 0, host_dst.descriptor(), 0, 4096, None).unwrap();
    batch.write_copies(&src, 0, dst.descriptor(), 0, &list, None).unwrap();
    batch.writes(&src, host_dst.descriptor(), [(0, 0, 100), (200, 200, 100)], None).unwrap();
    let transfers = batch.submit().unwrap();
    assert_eq!(transfers.len(), 5);
    for t in &transfers {
        t.wait_timeout(WAIT).unwrap();
    }
    let host_got = host_dst.to_vec(0, 4096).unwrap();
    assert_eq!(host_got[..100], data[..100]);
    assert_eq!(host_got[200..300], data[200..300]);
    assert_eq!(host_got[100..200], [5u8; 100]);
    let mut joined = a.batch();
    joined.write(&src, 0, dst.descriptor(), 0, 64, None).unwrap();
    joined.write(&host_src, 0, host_dst.descriptor(), 0, 64, None).unwrap();
    joined.submit_joined().unwrap().wait_timeout(WAIT).unwrap();
}
