//! Packed transfers (see [`super::staging`], [`EngineBuilder::packing`])
//! between real engines over libfabric tcp on loopback: strided copies,
//! paged writes and strided reads of short runs, byte-exact against a
//! plain-indexing reference, with their immediates after their bytes,
//! many at once (more chunks than leases), and the failures (a region
//! dropped at the target, a target gone).

use std::time::Duration;

use super::staging_tests::pattern;
use super::*;
use crate::plan::Strided;

const WAIT: Duration = Duration::from_secs(20);

fn engine(timeout: Duration) -> TransferEngine {
    TransferEngine::builder()
        .provider(Provider::Tcp)
        .interface("lo")
        .request_timeout(timeout)
        .build()
        .expect("engine on libfabric tcp over lo")
}

/// What `copies` do to `dst` (a copy of the destination's bytes) given
/// `src`, by plain indexing.
fn reference(src: &[u8], dst: &mut [u8], copies: &[Strided], src_base: u64, dst_base: u64) {
    for c in copies {
        for r in 0..c.rows {
            let s = (src_base + c.src_offset + r * c.src_stride) as usize;
            let d = (dst_base + c.dst_offset + r * c.dst_stride) as usize;
            dst[d..d + c.row_len as usize].copy_from_slice(&src[s..s + c.row_len as usize]);
        }
    }
}

/// An NHD head slice of `blocks` blocks: per block 32 rows of `row` bytes,
/// back to back in the source, every other row in the destination, the
/// destination blocks shuffled.
fn head_slice(blocks: u64, row: u64) -> Vec<Strided> {
    let order: Vec<u64> = (0..blocks).map(|b| (b * 7 + 3) % blocks).collect();
    (0..blocks)
        .map(|b| Strided {
            src_offset: b * 32 * row,
            dst_offset: order[b as usize] * 64 * row + row,
            rows: 32,
            row_len: row,
            src_stride: row,
            dst_stride: 2 * row,
        })
        .collect()
}

#[test]
fn strided_head_slices_are_packed_and_land_before_their_immediate() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    assert_eq!(a.shared.pack_below, 64 << 10, "tcp packs runs below 64 KiB");
    // 256 blocks of 32 KiB: 8 MiB, four chunks and more.
    let copies = head_slice(256, 1024);
    let list = CopyList::new(copies.clone()).unwrap();
    let (src_len, dst_len) = (256 * 32 * 1024 + 64, 256 * 64 * 1024 + 4096);
    let src = a.alloc(src_len, Access::LOCAL).unwrap();
    let dst = b.alloc(dst_len, Access::REMOTE_WRITE).unwrap();
    assert!(dst.descriptor().is_packed(), "a remote-write region of a packing engine is served packed");
    assert!(!src.descriptor().is_packed(), "a local region is not");
    let data = pattern(src_len as usize, 1);
    src.write_at(0, &data).unwrap();
    let before = pattern(dst_len as usize, 2);
    dst.write_at(0, &before).unwrap();
    for (round, (src_base, dst_base)) in [(0, 0), (64, 4096)].into_iter().enumerate() {
        let arrived = b.expect_imm(40 + round as u32, 1).unwrap();
        let t = a.write_copies(&src, src_base, dst.descriptor(), dst_base, &list, Some(40 + round as u32)).unwrap();
        // The immediate first: once it has come, every byte must be there.
        arrived.wait_timeout(WAIT).unwrap();
        let mut want = dst.to_vec(0, dst_len).unwrap();
        if round == 0 {
            want = before.clone();
        }
        reference(&data, &mut want, &copies, src_base, dst_base);
        t.wait_timeout(WAIT).unwrap();
        assert_eq!(dst.to_vec(0, dst_len).unwrap(), want, "round {round}: every row, and nothing else");
    }
    let (sa, sb) = (a.stats().unwrap().packed, b.stats().unwrap().packed);
    assert_eq!(sa.requests, 2, "both requests went packed");
    assert!(sa.chunks >= 8, "{sa:?}");
    assert_eq!(sb.served, sa.chunks, "every chunk served by the target: {sb:?}");
}

#[test]
fn scattered_sources_are_gathered() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    // Rows of 3000 bytes, every third row of the source, to rows 5000
    // apart: neither side contiguous; 700 rows is two chunks.
    let c = Strided { src_offset: 11, dst_offset: 7, rows: 700, row_len: 3000, src_stride: 9000, dst_stride: 5000 };
    let (src_len, dst_len) = (700 * 9000 + 100, 700 * 5000 + 100);
    let src = a.alloc(src_len, Access::LOCAL).unwrap();
    let dst = b.alloc(dst_len, Access::REMOTE_WRITE).unwrap();
    let data = pattern(src_len as usize, 3);
    src.write_at(0, &data).unwrap();
    let list = CopyList::new([c]).unwrap();
    a.write_copies(&src, 0, dst.descriptor(), 0, &list, None).unwrap().wait_timeout(WAIT).unwrap();
    let mut want = vec![0u8; dst_len as usize];
    reference(&data, &mut want, &[c], 0, 0);
    assert_eq!(dst.to_vec(0, dst_len).unwrap(), want);
    assert_eq!(a.stats().unwrap().packed.requests, 1);
}

#[test]
fn small_pages_are_packed_and_large_ones_go_direct() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    let pages = 64u32;
    for (page, packed) in [(4096u64, 1), (128 << 10, 0)] {
        let layout = PagedLayout::contiguous(page);
        let len = page * u64::from(pages);
        let src = a.alloc(len, Access::LOCAL).unwrap();
        let dst = b.alloc(len, Access::REMOTE_WRITE).unwrap();
        let data = pattern(len as usize, page as u32);
        src.write_at(0, &data).unwrap();
        // Every other page, reversed: no two runs join.
        let src_pages: Vec<u32> = (0..pages).step_by(2).collect();
        let dst_pages: Vec<u32> = src_pages.iter().map(|p| pages - 1 - p).collect();
        let before = a.stats().unwrap().packed.requests;
        let got = b.expect_imm(9, 1).unwrap();
        let t = a.write_paged(&src, dst.descriptor(), layout, src_pages.clone(), dst_pages.clone(), Some(9)).unwrap();
        t.wait_timeout(WAIT).unwrap();
        got.wait_timeout(WAIT).unwrap();
        let out = dst.to_vec(0, len).unwrap();
        for (s, d) in src_pages.iter().zip(&dst_pages) {
            let (s, d) = (u64::from(*s) * page, u64::from(*d) * page);
            assert_eq!(out[d as usize..(d + page) as usize], data[s as usize..(s + page) as usize]);
        }
        assert_eq!(a.stats().unwrap().packed.requests - before, packed, "pages of {page} bytes");
    }
}

#[test]
fn strided_reads_are_packed() {
    let (a, b) = (engine(Duration::from_secs(10)), engine(Duration::from_secs(10)));
    // a reads b's head slices into its own, the other way round.
    let copies: Vec<Strided> = head_slice(96, 512)
        .into_iter()
        .map(|c| Strided {
            src_offset: c.dst_offset,
            dst_offset: c.src_offset,
            src_stride: c.dst_stride,
            dst_stride: c.src_stride,
            ..c
        })
        .collect();
    let list = CopyList::new(copies.clone()).unwrap();
    let (remote_len, local_len) = (96 * 64 * 512 + 512, 96 * 32 * 512);
    let remote = b.alloc(remote_len, Access::REMOTE_READ).unwrap();
    let local = a.alloc(local_len, Access::LOCAL).unwrap();
    assert!(remote.descriptor().is_packed());
    let data = pattern(remote_len as usize, 4);
    remote.write_at(0, &data).unwrap();
    a.read_copies(&local, 0, remote.descriptor(), 0, &list).unwrap().wait_timeout(WAIT).unwrap();
    let mut want = vec![0u8; local_len as usize];
    reference(&data, &mut want, &copies, 0, 0);
    assert_eq!(local.to_vec(0, local_len).unwrap(), want);
    assert_eq!(a.stats().unwrap().packed.requests, 1);
}

#[test]
fn many_requests_at_once_share_the_leases() {
    // Two writers into one target: 2 x 12 requests of 4 chunks each, for
    // 4 lent slots.
    let target = engine(Duration::from_secs(10));
    let writers = [engine(Duration::from_secs(10)), engine(Duration::from_secs(10))];
    let copies = head_slice(256, 1024);
    let list = CopyList::new(copies.clone()).unwrap();
    let (src_len, dst_len) = (256 * 32 * 1024, 256 * 64 * 1024 + 1024);
    let mut jobs = Vec::new();
    for (w, writer) in writers.iter().enumerate() {
        let src = writer.alloc(src_len, Access::LOCAL).unwrap();
        let data = pattern(src_len as usize, 10 + w as u32);
        src.write_at(0, &data).unwrap();
        for i in 0..12u32 {
            let dst = target.alloc(dst_len, Access::REMOTE_WRITE).unwrap();
            let imm = 100 + 20 * w as u32 + i;
            let got = target.expect_imm(imm, 1).unwrap();
            let t = writer.write_copies(&src, 0, dst.descriptor(), 0, &list, Some(imm)).unwrap();
            jobs.push((data.clone(), dst, got, t));
        }
    }
    for (data, dst, got, t) in jobs {
        t.wait_timeout(WAIT).unwrap();
        got.wait_timeout(WAIT).unwrap();
        let mut want = vec![0u8; dst_len as usize];
        reference(&data, &mut want, &copies, 0, 0);
        assert!(dst.to_vec(0, dst_len).unwrap() == want, "a request's bytes");
    }
    let served = target.stats().unwrap().packed.served;
    assert_eq!(served, writers.iter().map(|w| w.stats().unwrap().packed.chunks).sum::<u64>());
}

#[test]
fn a_target_without_packing_takes_direct_requests() {
    let a = engine(Duration::from_secs(10));
    let b = TransferEngine::builder().provider(Provider::Tcp).interface("lo").packing(0).build().unwrap();
    let copies = head_slice(64, 1024);
    let list = CopyList::new(copies.clone()).unwrap();
    let src = a.alloc(64 * 32 * 1024, Access::LOCAL).unwrap();
    let dst = b.alloc(64 * 64 * 1024 + 1024, Access::REMOTE_WRITE).unwrap();
    assert!(!dst.descriptor().is_packed());
    let data = pattern(64 * 32 * 1024, 5);
    src.write_at(0, &data).unwrap();
    a.write_copies(&src, 0, dst.descriptor(), 0, &list, None).unwrap().wait_timeout(WAIT).unwrap();
    let mut want = vec![0u8; dst.len() as usize];
    reference(&data, &mut want, &copies, 0, 0);
    assert_eq!(dst.to_vec(0, dst.len()).unwrap(), want);
    assert_eq!(a.stats().unwrap().packed.requests, 0);
}

/// Engines `a` and `b` (request timeout `timeout`), and a packed write
/// from `a` into a region of `b` that succeeded and was then dropped: the
/// list, its source, and the dropped region's descriptor.
fn after_a_dropped_region(timeout: Duration) -> (TransferEngine, TransferEngine, CopyList, MemoryRegion, MrDesc) {
    let (a, b) = (engine(timeout), engine(timeout));
    let list = CopyList::new(head_slice(64, 1024)).unwrap();
    let src = a.alloc(64 * 32 * 1024, Access::LOCAL).unwrap();
    let dst = b.alloc(64 * 64 * 1024 + 1024, Access::REMOTE_WRITE).unwrap();
    let desc = dst.descriptor().clone();
    // Once through, so the leases exist, then the region goes.
    a.write_copies(&src, 0, &desc, 0, &list, None).unwrap().wait_timeout(WAIT).unwrap();
    drop(dst);
    (a, b, list, src, desc)
}

#[test]
fn a_dropped_target_region_fails_the_request() {
    let (a, b, list, src, desc) = after_a_dropped_region(Duration::from_secs(10));
    let e = a.write_copies(&src, 0, &desc, 0, &list, None).unwrap().wait_timeout(WAIT).unwrap_err();
    assert!(matches!(e, Error::RemoteAccess(_)), "{e}");
    // The packers still work for a live region, also while requests to the
    // dropped one fail beside them (their queued chunks hold up no one).
    let dst = b.alloc(64 * 64 * 1024 + 1024, Access::REMOTE_WRITE).unwrap();
    let big = CopyList::new(head_slice(256, 1024)).unwrap();
    let src = a.alloc(256 * 32 * 1024, Access::LOCAL).unwrap();
    let live = b.alloc(256 * 64 * 1024 + 1024, Access::REMOTE_WRITE).unwrap();
    let started = std::time::Instant::now();
    let mut dead = Vec::new();
    let mut ok = Vec::new();
    for _ in 0..3 {
        dead.push(a.write_copies(&src, 0, &desc, 0, &list, None).unwrap());
        ok.push(a.write_copies(&src, 0, live.descriptor(), 0, &big, None).unwrap());
    }
    for t in ok {
        t.wait_timeout(WAIT).unwrap();
    }
    for t in dead {
        assert!(matches!(t.wait_timeout(WAIT), Err(Error::RemoteAccess(_))));
    }
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    a.write_copies(&src, 0, dst.descriptor(), 0, &list, None).unwrap().wait_timeout(WAIT).unwrap();
}

#[test]
fn a_target_that_is_gone_fails_the_request_within_the_timeout() {
    let (a, b, list, src, desc) = after_a_dropped_region(Duration::from_millis(800));
    drop(b);
    let started = std::time::Instant::now();
    let e = a.write_copies(&src, 0, &desc, 0, &list, None).unwrap().wait_timeout(WAIT).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "failed after {:?}: {e}", started.elapsed());
}

#[test]
fn chunks_queued_for_a_lease_wait_past_the_request_timeout() {
    // 80 requests of 8 MiB to one target: most of their chunks wait for one
    // of the 4 leases far longer than the 300 ms timeout, which only bounds
    // how long a peer may leave a chunk unanswered.
    let (a, b) = (engine(Duration::from_millis(300)), engine(Duration::from_millis(300)));
    let copies = head_slice(256, 1024);
    let list = CopyList::new(copies.clone()).unwrap();
    let src = a.alloc(256 * 32 * 1024, Access::LOCAL).unwrap();
    let dst = b.alloc(256 * 64 * 1024 + 1024, Access::REMOTE_WRITE).unwrap();
    let data = pattern(256 * 32 * 1024, 6);
    src.write_at(0, &data).unwrap();
    let started = std::time::Instant::now();
    let all: Vec<Transfer> =
        (0..80).map(|_| a.write_copies(&src, 0, dst.descriptor(), 0, &list, None).unwrap()).collect();
    for t in all {
        t.wait_timeout(WAIT).unwrap();
    }
    let took = started.elapsed();
    let mut want = vec![0u8; dst.len() as usize];
    reference(&data, &mut want, &copies, 0, 0);
    assert_eq!(dst.to_vec(0, dst.len()).unwrap(), want);
    assert!(took > Duration::from_millis(300), "the queue outlived the timeout ({took:?}): the test tests something");
}
