//! Tier 2: every operation between two engines in one process, over
//! libfabric tcp and shm on loopback, with 1, 2 and 4 NICs per group and with
//! peers of different NIC counts. Tier 3: the same suite on verbs when a
//! verbs device is present (skipped, with the reason printed, when not). Destinations are checked byte for byte and
//! immediates counted exactly.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{engine, pattern, providers, TIMEOUT};
use strait::{Access, CopyList, Error, MrDesc, PagedLayout, Provider, ScatterTarget, Strided};

/// NIC counts of (writer, target) exercised for every provider.
const NIC_PAIRS: [(usize, usize); 5] = [(1, 1), (2, 2), (4, 4), (4, 2), (1, 4)];

/// The descriptor as a peer process would see it: through bytes.
fn over_the_wire(desc: &MrDesc) -> MrDesc {
    MrDesc::from_bytes(&desc.to_bytes()).expect("a descriptor we encoded decodes")
}

#[test]
fn single_writes_with_and_without_immediate() {
    for provider in providers() {
        for (wn, tn) in NIC_PAIRS {
            let writer = engine(provider, wn);
            let target = engine(provider, tn);
            // Lengths: tiny, unaligned, one piece, many pieces across NICs.
            for (round, len) in [1u64, 4095, 64 << 10, (3 << 20) + 17, 9 << 20].into_iter().enumerate() {
                let inbox = target.alloc(len + 8192, Access::REMOTE_WRITE).unwrap();
                let outbox = writer.alloc(len + 100, Access::LOCAL).unwrap();
                let data = pattern(len as usize, round as u64 + 1);
                outbox.write_at(100, &data).unwrap();
                let imm = 1000 + round as u32;
                let arrived = target.expect_imm(imm, 1).unwrap();
                let dst = over_the_wire(inbox.descriptor());
                writer.write(&outbox, 100, &dst, 4096, len, Some(imm)).unwrap().wait_timeout(TIMEOUT).unwrap();
                arrived.wait_timeout(TIMEOUT).unwrap();
                assert!(inbox.to_vec(4096, len).unwrap() == data, "{provider:?} {wn}->{tn} len {len}");
                assert_eq!(inbox.to_vec(0, 4096).unwrap(), vec![0; 4096], "bytes before the range untouched");
                assert_eq!(inbox.to_vec(4096 + len, 4096).unwrap(), vec![0; 4096], "bytes after untouched");

                // Without an immediate: the initiator's completion is the signal.
                let data2 = pattern(len as usize, 99);
                outbox.write_at(100, &data2).unwrap();
                writer.write(&outbox, 100, &dst, 4096, len, None).unwrap().wait_timeout(TIMEOUT).unwrap();
                assert!(
                    inbox.to_vec(4096, len).unwrap() == data2,
                    "{provider:?} {wn}->{tn} len {len}: data visible when the write completes"
                );
            }
            // Exactly one immediate per request whatever the sharding: none
            // left over for a later counter.
            let extra = target.expect_imm(1004, 1).unwrap();
            assert!(matches!(extra.wait_timeout(Duration::from_millis(200)), Err(Error::Timeout(_))));
        }
    }
}

#[test]
fn immediate_only_writes_and_counts_are_exact() {
    for provider in providers() {
        for (wn, tn) in [(1, 1), (2, 4)] {
            let writer = engine(provider, wn);
            let target = engine(provider, tn);
            let inbox = target.alloc(4096, Access::REMOTE_WRITE).unwrap();
            let dst = over_the_wire(inbox.descriptor());
            let counter = target.expect_imm(7, 50).unwrap();
            let handles: Vec<_> = (0..50).map(|_| writer.write_imm(&dst, 7).unwrap()).collect();
            for h in handles {
                h.wait_timeout(TIMEOUT).unwrap();
            }
            counter.wait_timeout(TIMEOUT).unwrap();
            assert_eq!(counter.seen(), 50);
            // Re-arm: the next round counts only new arrivals.
            counter.rearm(3).unwrap();
            assert_eq!(counter.seen(), 0);
            for _ in 0..3 {
                writer.write_imm(&dst, 7).unwrap().wait_timeout(TIMEOUT).unwrap();
            }
            counter.wait_timeout(TIMEOUT).unwrap();
            counter.rearm(1).unwrap();
            assert!(
                matches!(counter.wait_timeout(Duration::from_millis(200)), Err(Error::Timeout(_))),
                "no extra immediates"
            );
        }
    }
}

#[test]
fn paged_writes_land_page_by_page() {
    const PAGE: u64 = 4096;
    for provider in providers() {
        for (wn, tn) in NIC_PAIRS {
            let writer = engine(provider, wn);
            let target = engine(provider, tn);
            // Source pages are strided (page + 512 bytes of padding); the
            // destination is packed, so runs coalesce only where both are.
            let src_stride = PAGE + 512;
            let outbox = writer.alloc(64 * src_stride, Access::LOCAL).unwrap();
            let inbox = target.alloc(128 * PAGE, Access::REMOTE_WRITE).unwrap();
            let source = pattern((64 * src_stride) as usize, 5);
            outbox.write_at(0, &source).unwrap();
            let src_pages: Vec<u32> = (0..40).collect();
            let dst_pages: Vec<u32> = (0..40).map(|i| if i < 20 { 100 + i } else { 3 * (i - 20) }).collect();
            let layout = PagedLayout { page_len: PAGE, src_stride, dst_stride: PAGE, src_offset: 0, dst_offset: 0 };
            let arrived = target.expect_imm(77, 1).unwrap();
            let dst = over_the_wire(inbox.descriptor());
            writer
                .write_paged(&outbox, &dst, layout, src_pages.clone(), dst_pages.clone(), Some(77))
                .unwrap()
                .wait_timeout(TIMEOUT)
                .unwrap();
            arrived.wait_timeout(TIMEOUT).unwrap();
            let mut expected = vec![0u8; (128 * PAGE) as usize];
            for (s, d) in src_pages.iter().zip(&dst_pages) {
                let from = (*s as u64 * src_stride) as usize;
                let to = (*d as u64 * PAGE) as usize;
                expected[to..to + PAGE as usize].copy_from_slice(&source[from..from + PAGE as usize]);
            }
            assert!(inbox.to_vec(0, 128 * PAGE).unwrap() == expected, "{provider:?} {wn}->{tn}");

            // Contiguous pages on both sides coalesce into larger pieces.
            let packed = writer.alloc(256 * PAGE, Access::LOCAL).unwrap();
            let data = pattern((256 * PAGE) as usize, 6);
            packed.write_at(0, &data).unwrap();
            let inbox2 = target.alloc(256 * PAGE, Access::REMOTE_WRITE).unwrap();
            let pages: Vec<u32> = (0..256).collect();
            writer
                .write_paged(
                    &packed,
                    &over_the_wire(inbox2.descriptor()),
                    PagedLayout::contiguous(PAGE),
                    pages.clone(),
                    pages,
                    None,
                )
                .unwrap()
                .wait_timeout(TIMEOUT)
                .unwrap();
            assert!(inbox2.to_vec(0, 256 * PAGE).unwrap() == data);
        }
    }
}

/// A request of many small pieces and no immediate: every byte is visible
/// at the target the moment its `Transfer` succeeds. (On shm only the last
/// piece asks for delivery completion, on an in-order path; its completion
/// must cover the pieces before it.) Repeated, to give a race room.
#[test]
fn a_request_of_small_pieces_has_landed_when_it_completes() {
    const PAGE: u64 = 1024;
    const PAGES: u32 = 200;
    for provider in providers() {
        for (wn, tn) in NIC_PAIRS {
            let writer = engine(provider, wn);
            let target = engine(provider, tn);
            let outbox = writer.alloc(u64::from(PAGES) * PAGE, Access::LOCAL).unwrap();
            let inbox = target.alloc(u64::from(PAGES) * PAGE, Access::REMOTE_WRITE).unwrap();
            let dst = over_the_wire(inbox.descriptor());
            // Reversed on the target: no two pages coalesce.
            let src_pages: Vec<u32> = (0..PAGES).collect();
            let dst_pages: Vec<u32> = (0..PAGES).rev().collect();
            for round in 0..20u64 {
                let data = pattern((u64::from(PAGES) * PAGE) as usize, round);
                outbox.write_at(0, &data).unwrap();
                writer
                    .write_paged(
                        &outbox,
                        &dst,
                        PagedLayout::contiguous(PAGE),
                        src_pages.clone(),
                        dst_pages.clone(),
                        None,
                    )
                    .unwrap()
                    .wait_timeout(TIMEOUT)
                    .unwrap();
                let got = inbox.to_vec(0, u64::from(PAGES) * PAGE).unwrap();
                for (s, d) in src_pages.iter().zip(&dst_pages) {
                    let (from, to) = ((*s as u64 * PAGE) as usize, (*d as u64 * PAGE) as usize);
                    assert!(
                        got[to..to + PAGE as usize] == data[from..from + PAGE as usize],
                        "{provider:?} {wn}->{tn} round {round}: page {s} not there when the request completed"
                    );
                }
            }
        }
    }
}

/// Strided copies (written and read) land exactly where a byte loop over
/// the copies puts them: rows packed on one side and strided on the other
/// (several rows per work item where the transport allows it), rows cut
/// at the largest piece, a contiguous copy among them.
#[test]
fn strided_copies_write_and_read_byte_exact() {
    let copies = [
        // A head slice: packed 1 KiB rows here, every other KiB there.
        Strided { src_offset: 0, dst_offset: 512, rows: 37, row_len: 1024, src_stride: 1024, dst_stride: 2048 },
        // Strided on both sides, odd lengths.
        Strided { src_offset: 40_000, dst_offset: 80_000, rows: 9, row_len: 300, src_stride: 777, dst_stride: 301 },
        Strided::contiguous(60_000, 120_000, 5000),
    ];
    let list = CopyList::new(copies).unwrap();
    const LEN: u64 = 1 << 17;
    for provider in providers() {
        for (wn, tn) in NIC_PAIRS {
            let a = engine(provider, wn);
            let b = engine(provider, tn);
            let src = a.alloc(LEN, Access::LOCAL).unwrap();
            let data = pattern(LEN as usize, 9);
            src.write_at(0, &data).unwrap();
            let dst = b.alloc(LEN, Access::REMOTE_READ_WRITE).unwrap();
            let (src_base, dst_base) = (64, 128);
            let mut want = vec![0u8; LEN as usize];
            for c in &copies {
                for r in 0..c.rows {
                    let (s, d) =
                        (src_base + c.src_offset + r * c.src_stride, dst_base + c.dst_offset + r * c.dst_stride);
                    want[d as usize..(d + c.row_len) as usize]
                        .copy_from_slice(&data[s as usize..(s + c.row_len) as usize]);
                }
            }
            let arrived = b.expect_imm(5, 1).unwrap();
            let desc = over_the_wire(dst.descriptor());
            a.write_copies(&src, src_base, &desc, dst_base, &list, Some(5)).unwrap().wait_timeout(TIMEOUT).unwrap();
            arrived.wait_timeout(TIMEOUT).unwrap();
            assert!(dst.to_vec(0, LEN).unwrap() == want, "{provider:?} {wn}->{tn}: write_copies");

            // Reading back with the same list: the list's source side is
            // the remote region now (`want` laid out at its destination
            // offsets is read from the source offsets of a region holding
            // `data`).
            let remote = b.alloc(LEN, Access::REMOTE_READ).unwrap();
            remote.write_at(0, &data).unwrap();
            let local = a.alloc(LEN, Access::LOCAL).unwrap();
            let remote_desc = over_the_wire(remote.descriptor());
            a.read_copies(&local, dst_base, &remote_desc, src_base, &list).unwrap().wait_timeout(TIMEOUT).unwrap();
            assert!(local.to_vec(0, LEN).unwrap() == want, "{provider:?} {wn}->{tn}: read_copies");
        }
    }
}

#[test]
fn scatter_and_barrier_reach_every_peer() {
    for provider in providers() {
        let writer = engine(provider, 2);
        let peers: Vec<_> = [1, 2, 4].iter().map(|&n| engine(provider, n)).collect();
        let inboxes: Vec<_> = peers.iter().map(|p| p.alloc(1 << 20, Access::REMOTE_WRITE).unwrap()).collect();
        let outbox = writer.alloc(3 << 20, Access::LOCAL).unwrap();
        let data = pattern(3 << 20, 8);
        outbox.write_at(0, &data).unwrap();
        let counters: Vec<_> = peers.iter().map(|p| p.expect_imm(500, 1).unwrap()).collect();
        let targets: Vec<_> = inboxes
            .iter()
            .enumerate()
            .map(|(i, inbox)| ScatterTarget {
                dst: over_the_wire(inbox.descriptor()),
                src_offset: i as u64 * (1 << 20),
                dst_offset: 1000,
                len: (1 << 20) - 1000 - i as u64,
                imm: Some(500),
            })
            .collect();
        writer.scatter(&outbox, &targets).unwrap().wait_timeout(TIMEOUT).unwrap();
        for (i, (c, inbox)) in counters.iter().zip(&inboxes).enumerate() {
            c.wait_timeout(TIMEOUT).unwrap();
            let t = &targets[i];
            let from = t.src_offset as usize;
            assert!(inbox.to_vec(1000, t.len).unwrap() == data[from..from + t.len as usize]);
        }

        let barriers: Vec<_> = peers.iter().map(|p| p.expect_imm(0xBA, 1).unwrap()).collect();
        let descs: Vec<_> = inboxes.iter().map(|i| over_the_wire(i.descriptor())).collect();
        writer.barrier(&descs, 0xBA).unwrap().wait_timeout(TIMEOUT).unwrap();
        for b in barriers {
            b.wait_timeout(TIMEOUT).unwrap();
        }
    }
}

#[test]
fn reads_fetch_remote_bytes() {
    for provider in providers() {
        for (rn, on) in NIC_PAIRS {
            let reader = engine(provider, rn);
            let owner = engine(provider, on);
            let len = (5 << 20) + 3;
            let source = owner.alloc(len, Access::REMOTE_READ).unwrap();
            let data = pattern(len as usize, 9);
            source.write_at(0, &data).unwrap();
            let local = reader.alloc(len + 10, Access::LOCAL).unwrap();
            let src = over_the_wire(source.descriptor());
            reader.read(&local, 10, &src, 0, len).unwrap().wait_timeout(TIMEOUT).unwrap();
            assert!(local.to_vec(10, len).unwrap() == data, "{provider:?} {rn}<-{on}");
            reader.read(&local, 0, &src, 4, 16).unwrap().wait_timeout(TIMEOUT).unwrap();
            assert_eq!(local.to_vec(0, 16).unwrap(), &data[4..20]);
        }
    }
}

#[test]
fn send_and_receive_messages() {
    for provider in providers() {
        for (sn, rn) in [(1, 1), (2, 4), (4, 1)] {
            let sender = engine(provider, sn);
            let receiver = engine(provider, rn);
            let buf = sender.alloc(64 << 10, Access::LOCAL).unwrap();
            let mut sent = Vec::new();
            for i in 0..20u64 {
                let len = 1 + (i * 3001) % (60 << 10);
                let msg = pattern(len as usize, i);
                buf.write_at(0, &msg).unwrap();
                sender.send(receiver.address(), &buf, 0, len).unwrap().wait_timeout(TIMEOUT).unwrap();
                sent.push(msg);
            }
            // More messages than receive buffers per NIC would need reposting.
            let mut got: Vec<Vec<u8>> = (0..20).map(|_| receiver.recv_timeout(TIMEOUT).unwrap()).collect();
            got.sort();
            sent.sort();
            assert_eq!(got, sent, "{provider:?} {sn}->{rn}");
        }
    }
}

#[test]
fn receive_pool_is_reposted() {
    let provider = Provider::Tcp;
    let sender = engine(provider, 1);
    let receiver =
        strait::TransferEngine::builder().provider(provider).interface("lo").receive_buffers(4, 256).build().unwrap();
    let buf = sender.alloc(256, Access::LOCAL).unwrap();
    for i in 0..40u8 {
        buf.write_at(0, &[i; 8]).unwrap();
        sender.send(receiver.address(), &buf, 0, 8).unwrap().wait_timeout(TIMEOUT).unwrap();
        assert_eq!(receiver.recv_timeout(TIMEOUT).unwrap(), vec![i; 8]);
    }
}

/// Many concurrent requests of mixed kinds: each ends in exactly one outcome
/// (callbacks counted), and the immediates add up exactly.
#[test]
fn every_request_gets_exactly_one_outcome() {
    for provider in providers() {
        let writer = engine(provider, 4);
        let target = engine(provider, 2);
        let inbox = target.alloc(8 << 20, Access::REMOTE_WRITE).unwrap();
        let outbox = writer.alloc(8 << 20, Access::LOCAL).unwrap();
        outbox.write_at(0, &pattern(8 << 20, 3)).unwrap();
        let dst = over_the_wire(inbox.descriptor());
        const N: u64 = 600;
        let outcomes = Arc::new(AtomicU64::new(0));
        let counter = target.expect_imm(1, N).unwrap();
        let mut handles = Vec::new();
        for i in 0..N {
            let len = match i % 3 {
                0 => 64,
                1 => 64 << 10,
                _ => 1 << 20,
            };
            let off = (i * 4096) % (7 << 20);
            let h = writer.write(&outbox, off, &dst, off, len, Some(1)).unwrap();
            let seen = outcomes.clone();
            h.on_complete(move |r| {
                assert!(r.is_ok(), "{r:?}");
                seen.fetch_add(1, Ordering::SeqCst);
            });
            handles.push(h);
        }
        for h in &handles {
            h.wait_timeout(TIMEOUT).unwrap();
        }
        counter.wait_timeout(TIMEOUT).unwrap();
        // Callbacks run on the worker just after waiters are released.
        let deadline = std::time::Instant::now() + TIMEOUT;
        while outcomes.load(Ordering::SeqCst) < N && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(outcomes.load(Ordering::SeqCst), N, "{provider:?}: one callback per request");
        counter.rearm(1).unwrap();
        assert!(matches!(counter.wait_timeout(Duration::from_millis(200)), Err(Error::Timeout(_))));
    }
}

#[test]
fn transfer_is_a_future() {
    let writer = engine(Provider::Tcp, 1);
    let target = engine(Provider::Tcp, 1);
    let inbox = target.alloc(4096, Access::REMOTE_WRITE).unwrap();
    let outbox = writer.alloc(4096, Access::LOCAL).unwrap();
    outbox.write_at(0, b"future").unwrap();
    let transfer = writer.write(&outbox, 0, inbox.descriptor(), 0, 6, None).unwrap();
    // A minimal executor: poll with a thread-unparking waker.
    let result = block_on(transfer);
    assert!(result.is_ok());
    assert_eq!(inbox.to_vec(0, 6).unwrap(), b"future");
}

fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "future never completed");
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

#[test]
fn invalid_requests_are_refused_before_posting() {
    let writer = engine(Provider::Tcp, 1);
    let target = engine(Provider::Tcp, 1);
    let inbox = target.alloc(4096, Access::REMOTE_WRITE).unwrap();
    let local_only = target.alloc(4096, Access::LOCAL).unwrap();
    let outbox = writer.alloc(4096, Access::LOCAL).unwrap();
    let dst = inbox.descriptor();
    assert!(matches!(
        writer.write(&outbox, 0, dst, 1, 4096, None),
        Err(Error::OutOfBounds { side: "destination", .. })
    ));
    assert!(matches!(writer.write(&outbox, 1, dst, 0, 4096, None), Err(Error::OutOfBounds { side: "source", .. })));
    assert!(matches!(writer.write(&outbox, u64::MAX, dst, 0, 2, None), Err(Error::OutOfBounds { .. })));
    assert!(matches!(writer.write(&outbox, 0, dst, 0, 0, None), Err(Error::InvalidRequest(_))));
    assert!(matches!(writer.write(&outbox, 0, local_only.descriptor(), 0, 8, None), Err(Error::RemoteAccess(_))));
    assert!(matches!(writer.read(&outbox, 0, dst, 0, 8), Err(Error::RemoteAccess(_))));
    // A region of another engine cannot be used as a local buffer.
    assert!(matches!(writer.write(&inbox, 0, dst, 0, 8, None), Err(Error::InvalidRequest(_))));
    let shm = engine(Provider::Shm, 1);
    let shm_inbox = shm.alloc(4096, Access::REMOTE_WRITE).unwrap();
    assert!(matches!(writer.write(&outbox, 0, shm_inbox.descriptor(), 0, 8, None), Err(Error::InvalidRequest(_))));
    // SAFETY: a null pointer is refused before anything is registered.
    let null = unsafe { writer.register_raw(std::ptr::null_mut(), 10, Access::LOCAL) };
    assert!(matches!(null, Err(Error::RegisterMemory { .. })));
    assert!(writer.alloc(0, Access::LOCAL).is_err());
}

#[test]
fn shutdown_fails_requests_and_later_calls() {
    let writer = engine(Provider::Tcp, 1);
    let target = engine(Provider::Tcp, 1);
    let inbox = target.alloc(4096, Access::REMOTE_WRITE).unwrap();
    let outbox = writer.alloc(4096, Access::LOCAL).unwrap();
    let clone = writer.clone();
    writer.shutdown();
    assert!(matches!(clone.write(&outbox, 0, inbox.descriptor(), 0, 8, None), Err(Error::Shutdown)));
    assert!(matches!(clone.alloc(4096, Access::LOCAL), Err(Error::Shutdown)));
    drop(outbox);
}

/// A single write above 4 GiB, end to end over shm (the fastest provider
/// here): markers at the start, across the 4 GiB boundary and at the end
/// arrive where they belong. Uses about 9 GiB of memory for a few seconds.
#[test]
fn write_above_four_gib() {
    const LEN: u64 = (4 << 30) + (64 << 10);
    let writer = engine(Provider::Shm, 2);
    let target = engine(Provider::Shm, 2);
    let src = writer.alloc(LEN, Access::LOCAL).unwrap();
    let dst = target.alloc(LEN, Access::REMOTE_WRITE).unwrap();
    let marks = [0, (4 << 30) - 3, LEN - 16];
    for (i, &at) in marks.iter().enumerate() {
        src.write_at(at, &pattern(16, 100 + i as u64)).unwrap();
    }
    let arrived = target.expect_imm(44, 1).unwrap();
    writer.write(&src, 0, dst.descriptor(), 0, LEN, Some(44)).unwrap().wait_timeout(Duration::from_secs(120)).unwrap();
    arrived.wait_timeout(TIMEOUT).unwrap();
    for (i, &at) in marks.iter().enumerate() {
        assert_eq!(dst.to_vec(at, 16).unwrap(), pattern(16, 100 + i as u64), "marker at {at}");
    }
}
