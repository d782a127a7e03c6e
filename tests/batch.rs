//! Tier 2: `TransferEngine::batch`, over libfabric tcp and shm on loopback:
//! every kind of request in one batch, per-request and joined handles,
//! exact immediates, and refusal at the add with nothing posted.

mod common;

use std::time::Duration;

use common::{engine, pattern, PROVIDERS, TIMEOUT};
use strait::{Access, Error, PagedLayout, ScatterTarget};

#[test]
fn a_batch_of_every_kind_lands_with_one_outcome_per_request() {
    for provider in PROVIDERS {
        for (wn, tn) in [(1, 1), (2, 4)] {
            let writer = engine(provider, wn);
            let target = engine(provider, tn);
            let other = engine(provider, 1);
            let inbox = target.alloc(8 << 20, Access::REMOTE_WRITE).unwrap();
            let other_inbox = other.alloc(1 << 20, Access::REMOTE_WRITE).unwrap();
            let src = writer.alloc(8 << 20, Access::LOCAL).unwrap();
            let data = pattern(8 << 20, 5);
            src.write_at(0, &data).unwrap();
            let (dst, odst) = (inbox.descriptor().clone(), other_inbox.descriptor().clone());

            let writes = target.expect_imm(10, 64).unwrap();
            let big = target.expect_imm(11, 1).unwrap();
            let paged = target.expect_imm(12, 1).unwrap();
            let only = target.expect_imm(13, 1).unwrap();
            let scattered = other.expect_imm(14, 1).unwrap();
            let fenced = [target.expect_imm(15, 1).unwrap(), other.expect_imm(15, 1).unwrap()];

            let mut batch = writer.batch();
            for i in 0..64u64 {
                batch.write(&src, i * 4096, &dst, i * 4096, 4096, Some(10)).unwrap();
            }
            // Several pieces across NICs, its immediate after all of them.
            batch.write(&src, 1 << 20, &dst, 1 << 20, 3 << 20, Some(11)).unwrap();
            let pages: Vec<u32> = (0..16).map(|i| i * 2).collect();
            batch
                .write_paged(&src, &dst, PagedLayout::contiguous(4096), pages.clone(), pages.clone(), Some(12))
                .unwrap()
                .write_imm(&dst, 13)
                .unwrap();
            let targets =
                [ScatterTarget { dst: odst.clone(), src_offset: 0, dst_offset: 0, len: 65536, imm: Some(14) }];
            batch.scatter(&src, &targets).unwrap();
            batch.barrier(&[dst.clone(), odst.clone()], 15).unwrap();
            assert_eq!(batch.len(), 64 + 5);
            let transfers = batch.submit().unwrap();
            assert_eq!(transfers.len(), 69);
            for t in &transfers {
                t.wait_timeout(TIMEOUT).unwrap();
            }
            for c in [&writes, &big, &paged, &only, &scattered, &fenced[0], &fenced[1]] {
                c.wait_timeout(TIMEOUT).unwrap();
            }
            assert!(inbox.to_vec(0, 256 << 10).unwrap() == data[..256 << 10], "{provider:?} {wn}->{tn}: small writes");
            assert!(
                inbox.to_vec(1 << 20, 3 << 20).unwrap() == data[1 << 20..4 << 20],
                "{provider:?} {wn}->{tn}: large"
            );
            assert_eq!(inbox.to_vec(256 << 10, 4096).unwrap(), vec![0; 4096], "nothing else written");
            assert!(other_inbox.to_vec(0, 65536).unwrap() == data[..65536]);
            // Exactly one immediate per request: nothing left over.
            let extra = target.expect_imm(10, 1).unwrap();
            assert!(matches!(extra.wait_timeout(Duration::from_millis(100)), Err(Error::Timeout(_))));
        }
    }
}

#[test]
fn a_joined_batch_has_one_handle_and_a_refused_add_posts_nothing() {
    for provider in PROVIDERS {
        let writer = engine(provider, 2);
        let target = engine(provider, 1);
        let inbox = target.alloc(1 << 20, Access::REMOTE_WRITE).unwrap();
        let src = writer.alloc(1 << 20, Access::LOCAL).unwrap();
        let dst = inbox.descriptor().clone();
        let arrived = target.expect_imm(20, 256).unwrap();
        let mut batch = writer.batch();
        for i in 0..256u64 {
            batch.write(&src, 0, &dst, i * 4096, 4096, Some(20)).unwrap();
        }
        // Out of range: refused at the add; the batch keeps the rest.
        assert!(batch.write(&src, 0, &dst, 1 << 20, 1, None).is_err());
        assert_eq!(batch.len(), 256);
        batch.submit_joined().unwrap().wait_timeout(TIMEOUT).unwrap();
        arrived.wait_timeout(TIMEOUT).unwrap();

        // A batch dropped without submitting posts nothing.
        let none = target.expect_imm(21, 1).unwrap();
        let mut dropped = writer.batch();
        dropped.write_imm(&dst, 21).unwrap();
        drop(dropped);
        assert!(matches!(none.wait_timeout(Duration::from_millis(200)), Err(Error::Timeout(_))));
        assert!(writer.batch().submit().unwrap().is_empty());
        assert!(matches!(writer.batch().submit_joined(), Err(Error::InvalidRequest(_))));
    }
}

#[test]
fn many_writes_in_one_call_check_each_range_and_add_all_or_nothing() {
    for provider in PROVIDERS {
        let writer = engine(provider, 1);
        let target = engine(provider, 1);
        let inbox = target.alloc(64 << 10, Access::REMOTE_WRITE).unwrap();
        let src = writer.alloc(64 << 10, Access::LOCAL).unwrap();
        let data = pattern(64 << 10, 3);
        src.write_at(0, &data).unwrap();
        let dst = inbox.descriptor().clone();
        let mut batch = writer.batch();
        // Page i of src to page 15 - i of dst.
        batch.writes(&src, &dst, (0..16u64).map(|i| (i * 4096, (15 - i) * 4096, 4096)), Some(40)).unwrap();
        assert_eq!(batch.len(), 16);
        // The third range runs past the destination: nothing of it is added.
        let bad = [(0, 0, 16), (0, 4096, 16), (0, 64 << 10, 1)];
        assert!(batch.writes(&src, &dst, bad, None).is_err());
        assert_eq!(batch.len(), 16, "a refused call adds nothing");
        let arrived = target.expect_imm(40, 16).unwrap();
        batch.submit_joined().unwrap().wait_timeout(TIMEOUT).unwrap();
        arrived.wait_timeout(TIMEOUT).unwrap();
        for i in 0..16usize {
            let got = inbox.to_vec(((15 - i) * 4096) as u64, 4096).unwrap();
            assert!(got == data[i * 4096..(i + 1) * 4096], "{provider:?}: page {i}");
        }
    }
}
