//! Strided copies: many ranges between one pair of regions, in one request.
//!
//! A [`Strided`] copy is `rows` runs of `row_len` bytes; run `r` starts at
//! `src_offset + r * src_stride` in the source and `dst_offset + r *
//! dst_stride` in the destination. One contiguous range is a copy of one
//! row. A [`CopyList`] holds many copies, checked and coalesced once, and is
//! shared (cheap to clone) by every request that replays it at some base
//! offsets: the KV cache sends the same list for every layer, with only
//! the layer's base changing, so a layer's submit costs no work per block.
//!
//! Each row is one work item where an operation has one remote range
//! (RDMA verbs, EFA); where it may have several (libfabric tcp and shm:
//! four), consecutive rows of a copy share a work item (see
//! [`Rows`](super::Rows)). Rows longer than the engine's largest piece are
//! cut, and successive work items walk the NIC pairs round robin.

use std::sync::Arc;

use super::{nic_pair, Piece, Rows};
use crate::descriptor::check_range;
use crate::error::{Error, Result};

/// `rows` runs of `row_len` bytes, `src_stride` apart in the source and
/// `dst_stride` apart in the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Strided {
    /// Offset of the first row in the source.
    pub src_offset: u64,
    /// Offset of the first row in the destination.
    pub dst_offset: u64,
    /// Number of rows (at least 1).
    pub rows: u64,
    /// Bytes per row (at least 1).
    pub row_len: u64,
    /// Distance between rows in the source (at least `row_len` when there
    /// are several rows).
    pub src_stride: u64,
    /// Distance between rows in the destination (at least `row_len` when
    /// there are several rows).
    pub dst_stride: u64,
}

impl Strided {
    /// One contiguous range.
    pub fn contiguous(src_offset: u64, dst_offset: u64, len: u64) -> Self {
        Strided { src_offset, dst_offset, rows: 1, row_len: len, src_stride: len, dst_stride: len }
    }

    /// Bytes copied.
    pub fn len(&self) -> u64 {
        self.rows * self.row_len
    }

    /// True when nothing is copied (never for a copy in a [`CopyList`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One past the last source byte and one past the last destination
    /// byte, or `None` if either overflows.
    fn ends(&self) -> Option<(u64, u64)> {
        let span = |offset: u64, stride: u64| {
            (self.rows - 1).checked_mul(stride)?.checked_add(offset)?.checked_add(self.row_len)
        };
        Some((span(self.src_offset, self.src_stride)?, span(self.dst_offset, self.dst_stride)?))
    }

    /// Rows laid back to back on both sides become one row.
    fn normalized(mut self) -> Self {
        if self.rows > 1 && self.src_stride == self.row_len && self.dst_stride == self.row_len {
            self.row_len *= self.rows;
            self.rows = 1;
        }
        if self.rows == 1 {
            self.src_stride = self.row_len;
            self.dst_stride = self.row_len;
        }
        self
    }

    /// `next` continues `self` on both sides: the two become one copy.
    fn merge(&self, next: &Strided) -> Option<Strided> {
        let (src_end, dst_end) = self.ends()?;
        if self.rows == 1 && next.rows == 1 && next.src_offset == src_end && next.dst_offset == dst_end {
            let len = self.row_len + next.row_len;
            return Some(Strided::contiguous(self.src_offset, self.dst_offset, len));
        }
        // More rows of the same shape, continuing the strides.
        if self.rows > 1
            && next.row_len == self.row_len
            && next.src_stride == self.src_stride
            && next.dst_stride == self.dst_stride
            && next.src_offset == self.src_offset + self.rows * self.src_stride
            && next.dst_offset == self.dst_offset + self.rows * self.dst_stride
        {
            return Some(Strided { rows: self.rows + next.rows, ..*self });
        }
        None
    }
}

/// Checked, coalesced strided copies, shared by every request that uses
/// them (cloning is an `Arc` clone).
///
/// Copies that continue each other on both sides are merged as the list is
/// built (consecutive blocks of a KV request become one range). The
/// destination ranges must not overlap one another: a request's bytes have
/// one place each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyList {
    copies: Arc<[Strided]>,
    src_extent: u64,
    dst_extent: u64,
    bytes: u64,
    rows: u64,
}

impl CopyList {
    /// Checks and coalesces `copies` (at least one, each non-empty, strides
    /// at least the row length, destination rows disjoint).
    pub fn new(copies: impl IntoIterator<Item = Strided>) -> Result<Self> {
        let mut out: Vec<Strided> = Vec::new();
        for (i, c) in copies.into_iter().enumerate() {
            if c.rows == 0 || c.row_len == 0 {
                return Err(Error::InvalidRequest(format!("copy {i} is empty")));
            }
            if c.rows > 1 && (c.src_stride < c.row_len || c.dst_stride < c.row_len) {
                return Err(Error::InvalidRequest(format!("copy {i}: row stride shorter than the row")));
            }
            if c.ends().is_none() {
                return Err(Error::InvalidRequest(format!("copy {i} extends past 2^64")));
            }
            let c = c.normalized();
            match out.last().and_then(|last| last.merge(&c)) {
                Some(merged) => *out.last_mut().expect("merged with the last") = merged,
                None => out.push(c),
            }
        }
        if out.is_empty() {
            return Err(Error::InvalidRequest("no copies".into()));
        }
        check_disjoint_rows(&out)?;
        let (mut src_extent, mut dst_extent, mut bytes, mut rows) = (0u64, 0u64, 0u64, 0u64);
        for c in &out {
            let (s, d) = c.ends().expect("checked above");
            src_extent = src_extent.max(s);
            dst_extent = dst_extent.max(d);
            bytes = bytes.saturating_add(c.len());
            rows += c.rows;
        }
        Ok(CopyList { copies: out.into(), src_extent, dst_extent, bytes, rows })
    }

    /// The copies after coalescing.
    pub fn copies(&self) -> &[Strided] {
        &self.copies
    }

    /// Bytes copied in all.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Rows in all (work items, before cutting rows longer than a piece).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Source bytes the list reaches from its base: `src_base + src_extent`
    /// must fit in the source region.
    pub fn src_extent(&self) -> u64 {
        self.src_extent
    }

    /// Destination bytes the list reaches from its base.
    pub fn dst_extent(&self) -> u64 {
        self.dst_extent
    }
}

/// Destination rows of different copies must not overlap (rows of one copy
/// cannot, their stride being at least their length). Sorted sweep over the
/// rows; lists are built once, so O(rows log rows) is paid once.
fn check_disjoint_rows(copies: &[Strided]) -> Result<()> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for c in copies {
        for r in 0..c.rows {
            let start = c.dst_offset + r * c.dst_stride;
            ranges.push((start, start + c.row_len));
        }
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(Error::InvalidRequest(format!(
                "destination ranges overlap at byte {} (a request's bytes have one place each)",
                pair[1].0
            )));
        }
    }
    Ok(())
}

/// Rows longer than this go one per work item even where several could
/// share one: sharing pays where the cost is per operation (small rows),
/// and measured on libfabric tcp it costs throughput from 16 KiB rows on
/// (MLA's 18 KiB blocks: 2.4 GB/s one per item, 1.8 four per item).
const MAX_SHARED_ROW: u64 = 4096;

/// Rows of copy `c` one work item carries: up to `max_rows` rows of at
/// most [`MAX_SHARED_ROW`] bytes, as long as they fit `max_piece`
/// together; else 1.
fn rows_per_item(c: &Strided, max_piece: u64, max_rows: u32) -> u64 {
    if c.rows == 1 || c.row_len > max_piece || c.row_len > MAX_SHARED_ROW {
        return 1;
    }
    (max_piece / c.row_len).clamp(1, u64::from(max_rows))
}

/// The work items of one replay of a [`CopyList`], produced one at a time.
#[derive(Clone, Debug)]
pub struct StridedPlan {
    list: CopyList,
    src_base: u64,
    dst_base: u64,
    max_piece: u64,
    max_rows: u32,
    count: u64,
    rotation: usize,
    local_nics: usize,
    remote_nics: usize,
    // cursor
    copy: usize,
    row: u64,
    within: u64,
    next_piece: u64,
}

impl StridedPlan {
    /// Replays `list` from `src_base` in a source region of `src_len` bytes
    /// to `dst_base` in a destination of `dst_len`: two range checks, and a
    /// count over the copies (no work per row). A work item carries up to
    /// `max_rows` rows of a copy (rows no longer than `max_piece` bytes
    /// together).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        list: &CopyList,
        src_base: u64,
        dst_base: u64,
        src_len: u64,
        dst_len: u64,
        rotation: usize,
        local_nics: usize,
        remote_nics: usize,
        max_piece: u64,
        max_rows: u32,
    ) -> Result<Self> {
        assert!(local_nics > 0 && remote_nics > 0, "a group has at least one NIC");
        check_range("source", src_base, list.src_extent, src_len)?;
        check_range("destination", dst_base, list.dst_extent, dst_len)?;
        let max_piece = max_piece.max(1);
        let max_rows = max_rows.max(1);
        let count = list
            .copies
            .iter()
            .map(|c| match rows_per_item(c, max_piece, max_rows) {
                1 => c.rows * c.row_len.div_ceil(max_piece),
                k => c.rows.div_ceil(k),
            })
            .sum();
        Ok(StridedPlan {
            list: list.clone(),
            src_base,
            dst_base,
            max_piece,
            max_rows,
            count,
            rotation,
            local_nics,
            remote_nics,
            copy: 0,
            row: 0,
            within: 0,
            next_piece: 0,
        })
    }

    /// Work items in all.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The next work item, or `None` when all have been handed out.
    pub fn next_piece(&mut self) -> Option<Piece> {
        let c = *self.list.copies.get(self.copy)?;
        let len = (c.row_len - self.within).min(self.max_piece);
        let (local_nic, remote_nic) = nic_pair(self.next_piece, self.rotation, self.local_nics, self.remote_nics);
        let count = match rows_per_item(&c, self.max_piece, self.max_rows) {
            1 => 1,
            k => k.min(c.rows - self.row),
        };
        let rows = if count > 1 {
            Rows { count: count as u32, src_stride: c.src_stride, dst_stride: c.dst_stride }
        } else {
            Rows::ONE
        };
        let piece = Piece {
            local_nic,
            remote_nic,
            src_offset: self.src_base + c.src_offset + self.row * c.src_stride + self.within,
            dst_offset: self.dst_base + c.dst_offset + self.row * c.dst_stride + self.within,
            len,
            rows,
        };
        self.within += len;
        if self.within == c.row_len {
            self.within = 0;
            self.row += count;
            if self.row == c.rows {
                self.row = 0;
                self.copy += 1;
            }
        }
        self.next_piece += 1;
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(mut plan: StridedPlan) -> Vec<Piece> {
        let count = plan.count();
        let v: Vec<_> = std::iter::from_fn(|| plan.next_piece()).collect();
        assert_eq!(v.len() as u64, count, "count() matches the pieces produced");
        v
    }

    fn plan(list: &CopyList, max_piece: u64) -> StridedPlan {
        StridedPlan::new(list, 0, 0, u64::MAX, u64::MAX, 0, 2, 3, max_piece, 1).unwrap()
    }

    #[test]
    fn rows_share_work_items_up_to_max_rows() {
        // NHD, one of two senders: 1 KiB head slices, packed at the source,
        // every other KiB at the destination.
        let c = Strided { src_offset: 0, dst_offset: 0, rows: 10, row_len: 1024, src_stride: 1024, dst_stride: 2048 };
        let list = CopyList::new([c]).unwrap();
        let p = StridedPlan::new(&list, 0, 0, 1 << 20, 1 << 20, 0, 1, 1, 1 << 20, 4).unwrap();
        assert_eq!(p.count(), 3);
        let rows: Vec<_> = all(p).iter().map(|p| (p.src_offset, p.dst_offset, p.rows.count)).collect();
        assert_eq!(rows, [(0, 0, 4), (4096, 8192, 4), (8192, 16384, 2)]);
        // Rows are cut, not shared, when two do not fit a piece.
        let p = StridedPlan::new(&list, 0, 0, 1 << 20, 1 << 20, 0, 1, 1, 1500, 4).unwrap();
        assert_eq!(p.count(), 10);
    }

    #[test]
    fn consecutive_copies_merge() {
        let list = CopyList::new([
            Strided::contiguous(0, 100, 10),
            Strided::contiguous(10, 110, 10),
            Strided::contiguous(30, 120, 10),
        ])
        .unwrap();
        assert_eq!(list.copies(), [Strided::contiguous(0, 100, 20), Strided::contiguous(30, 120, 10)]);
        assert_eq!(list.bytes(), 30);
    }

    #[test]
    fn packed_rows_become_one_and_strided_rows_continue() {
        let packed = Strided { src_offset: 0, dst_offset: 0, rows: 4, row_len: 8, src_stride: 8, dst_stride: 8 };
        assert_eq!(CopyList::new([packed]).unwrap().copies(), [Strided::contiguous(0, 0, 32)]);
        let a = Strided { src_offset: 0, dst_offset: 0, rows: 2, row_len: 8, src_stride: 32, dst_stride: 16 };
        let b = Strided { src_offset: 64, dst_offset: 32, ..a };
        let list = CopyList::new([a, b]).unwrap();
        assert_eq!(list.copies(), [Strided { rows: 4, ..a }]);
        let ps = all(plan(&list, 1 << 20));
        assert_eq!(
            ps.iter().map(|p| (p.src_offset, p.dst_offset)).collect::<Vec<_>>(),
            [(0, 0), (32, 16), (64, 32), (96, 48)]
        );
    }

    #[test]
    fn long_rows_are_cut_and_nics_rotate() {
        let list = CopyList::new([Strided::contiguous(0, 0, 25)]).unwrap();
        let ps = all(plan(&list, 10));
        assert_eq!(ps.iter().map(|p| p.len).collect::<Vec<_>>(), [10, 10, 5]);
        assert_eq!(ps.iter().map(|p| (p.local_nic, p.remote_nic)).collect::<Vec<_>>(), [(0, 0), (1, 1), (0, 2)]);
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(CopyList::new([]).is_err());
        assert!(CopyList::new([Strided::contiguous(0, 0, 0)]).is_err());
        let short = Strided { src_offset: 0, dst_offset: 0, rows: 2, row_len: 8, src_stride: 4, dst_stride: 8 };
        assert!(CopyList::new([short]).is_err());
        let huge =
            Strided { src_offset: 0, dst_offset: 0, rows: 3, row_len: 8, src_stride: u64::MAX / 2, dst_stride: 8 };
        assert!(CopyList::new([huge]).is_err());
        let overlap = CopyList::new([Strided::contiguous(0, 0, 10), Strided::contiguous(20, 5, 10)]);
        assert!(matches!(overlap, Err(Error::InvalidRequest(m)) if m.contains("overlap")));
    }

    #[test]
    fn bases_are_checked_against_the_regions() {
        let list = CopyList::new([Strided::contiguous(0, 8, 8)]).unwrap();
        assert!(StridedPlan::new(&list, 8, 0, 16, 16, 0, 1, 1, 64, 1).is_ok());
        assert!(matches!(
            StridedPlan::new(&list, 9, 0, 16, 16, 0, 1, 1, 64, 1),
            Err(Error::OutOfBounds { side: "source", .. })
        ));
        assert!(matches!(
            StridedPlan::new(&list, 0, 1, 16, 16, 0, 1, 1, 64, 1),
            Err(Error::OutOfBounds { side: "destination", .. })
        ));
    }

    fn copy() -> impl Strategy<Value = Strided> {
        (0u64..200, 0u64..200, 1u64..5, 1u64..20, 0u64..30, 0u64..30).prop_map(|(s, d, rows, row_len, ss, ds)| {
            Strided { src_offset: s, dst_offset: d, rows, row_len, src_stride: row_len + ss, dst_stride: row_len + ds }
        })
    }

    proptest! {
        /// Replaying the list copies exactly the bytes a plain loop over the
        /// original copies does, whatever merging and cutting happened.
        #[test]
        fn replay_matches_a_byte_loop(copies in proptest::collection::vec(copy(), 1..6), max_piece in 1u64..40,
                                      src_base in 0u64..50, dst_base in 0u64..50, max_rows in 1u32..5) {
            let Ok(list) = CopyList::new(copies.clone()) else { return Ok(()) };
            let src: Vec<u8> = (0..2000u32).map(|i| (i * 7 + 3) as u8).collect();
            let mut want = vec![0u8; 2000];
            for c in &copies {
                for r in 0..c.rows {
                    for b in 0..c.row_len {
                        want[(dst_base + c.dst_offset + r * c.dst_stride + b) as usize] =
                            src[(src_base + c.src_offset + r * c.src_stride + b) as usize];
                    }
                }
            }
            let mut got = vec![0u8; 2000];
            let p = StridedPlan::new(&list, src_base, dst_base, 2000, 2000, 1, 2, 2, max_piece, max_rows).unwrap();
            let mut total = 0;
            for piece in all(p) {
                let rows = piece.rows.count as u64;
                prop_assert!(rows >= 1 && rows <= u64::from(max_rows));
                prop_assert!(piece.len * rows <= max_piece && piece.len > 0);
                for r in 0..rows {
                    let s = (piece.src_offset + r * piece.rows.src_stride) as usize;
                    let d = (piece.dst_offset + r * piece.rows.dst_stride) as usize;
                    let n = piece.len as usize;
                    got[d..d + n].copy_from_slice(&src[s..s + n]);
                }
                total += piece.len * rows;
            }
            prop_assert_eq!(total, list.bytes());
            prop_assert_eq!(got, want);
        }
    }
}
