//! Paged writes: the KV-cache shape. Page `i` of the request copies
//! `page_len` bytes from source page `src_pages[i]` to destination page
//! `dst_pages[i]`; page `p` of a side starts at `offset + p * stride`.

use super::{nic_pair, Piece};
use crate::descriptor::check_range;
use crate::error::{Error, Result};

/// Where pages lie in the source and destination regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedLayout {
    /// Bytes copied per page.
    pub page_len: u64,
    /// Distance between consecutive source pages (at least `page_len`).
    pub src_stride: u64,
    /// Distance between consecutive destination pages (at least `page_len`).
    pub dst_stride: u64,
    /// Offset of source page 0 in the source region.
    pub src_offset: u64,
    /// Offset of destination page 0 in the destination region.
    pub dst_offset: u64,
}

impl PagedLayout {
    /// Pages packed back to back in both regions, from offset 0.
    pub fn contiguous(page_len: u64) -> Self {
        PagedLayout { page_len, src_stride: page_len, dst_stride: page_len, src_offset: 0, dst_offset: 0 }
    }
}

/// The pieces of a paged write, produced one at a time.
///
/// Runs of pages that are consecutive on both sides, with strides equal to
/// the page length, are coalesced into one piece (up to `max_piece` bytes).
/// Successive pieces walk the NIC pairs round robin.
#[derive(Clone, Debug)]
pub struct PagedPlan {
    layout: PagedLayout,
    src_pages: Vec<u32>,
    dst_pages: Vec<u32>,
    pages_per_piece: usize,
    count: u64,
    rotation: usize,
    local_nics: usize,
    remote_nics: usize,
    // cursor
    next_page: usize,
    next_piece: u64,
}

impl PagedPlan {
    /// Validates the request against the region lengths and counts its
    /// pieces. Every page index is checked before anything is posted.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        layout: PagedLayout,
        src_pages: Vec<u32>,
        dst_pages: Vec<u32>,
        src_region_len: u64,
        dst_region_len: u64,
        rotation: usize,
        local_nics: usize,
        remote_nics: usize,
        max_piece: u64,
    ) -> Result<Self> {
        assert!(local_nics > 0 && remote_nics > 0, "a group has at least one NIC");
        let l = layout;
        if l.page_len == 0 {
            return Err(Error::InvalidRequest("page length is 0".into()));
        }
        if src_pages.len() != dst_pages.len() {
            return Err(Error::InvalidRequest(format!(
                "{} source pages but {} destination pages",
                src_pages.len(),
                dst_pages.len()
            )));
        }
        if src_pages.is_empty() {
            return Err(Error::InvalidRequest("no pages".into()));
        }
        if l.src_stride < l.page_len || l.dst_stride < l.page_len {
            return Err(Error::InvalidRequest("page stride shorter than the page length".into()));
        }
        let max_src = *src_pages.iter().max().expect("non-empty");
        let max_dst = *dst_pages.iter().max().expect("non-empty");
        check_page("source", l.src_offset, l.src_stride, l.page_len, max_src, src_region_len)?;
        check_page("destination", l.dst_offset, l.dst_stride, l.page_len, max_dst, dst_region_len)?;
        let pages_per_piece = if l.src_stride == l.page_len && l.dst_stride == l.page_len {
            (max_piece / l.page_len).max(1) as usize
        } else {
            1
        };
        let mut plan = PagedPlan {
            layout,
            src_pages,
            dst_pages,
            pages_per_piece,
            count: 0,
            rotation,
            local_nics,
            remote_nics,
            next_page: 0,
            next_piece: 0,
        };
        let mut page = 0;
        while page < plan.src_pages.len() {
            page += plan.run_len(page);
            plan.count += 1;
        }
        Ok(plan)
    }

    /// Number of pieces after coalescing.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.src_pages.len()
    }

    /// Pages in the coalesced run that starts at page `start`.
    fn run_len(&self, start: usize) -> usize {
        let (s, d) = (&self.src_pages, &self.dst_pages);
        let mut n = 1;
        while n < self.pages_per_piece
            && start + n < s.len()
            && s[start + n] as u64 == s[start + n - 1] as u64 + 1
            && d[start + n] as u64 == d[start + n - 1] as u64 + 1
        {
            n += 1;
        }
        n
    }

    /// The next piece, or `None` when all have been handed out.
    pub fn next_piece(&mut self) -> Option<Piece> {
        let start = self.next_page;
        if start >= self.src_pages.len() {
            return None;
        }
        let run = self.run_len(start);
        let l = &self.layout;
        let (local_nic, remote_nic) = nic_pair(self.next_piece, self.rotation, self.local_nics, self.remote_nics);
        let piece = Piece {
            local_nic,
            remote_nic,
            src_offset: l.src_offset + self.src_pages[start] as u64 * l.src_stride,
            dst_offset: l.dst_offset + self.dst_pages[start] as u64 * l.dst_stride,
            len: run as u64 * l.page_len,
            rows: super::Rows::ONE,
        };
        self.next_page += run;
        self.next_piece += 1;
        Some(piece)
    }
}

fn check_page(
    side: &'static str,
    offset: u64,
    stride: u64,
    page_len: u64,
    max_page: u32,
    region_len: u64,
) -> Result<()> {
    let start = (max_page as u64).checked_mul(stride).and_then(|s| s.checked_add(offset));
    match start {
        Some(start) => check_range(side, start, page_len, region_len),
        None => Err(Error::OutOfBounds { side, offset: u64::MAX, len: page_len, region_len }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(mut plan: PagedPlan) -> Vec<Piece> {
        let count = plan.count();
        let v: Vec<_> = std::iter::from_fn(|| plan.next_piece()).collect();
        assert_eq!(v.len() as u64, count, "count() matches the pieces produced");
        v
    }

    #[test]
    fn coalesces_runs_consecutive_on_both_sides() {
        let plan = PagedPlan::new(
            PagedLayout::contiguous(1024),
            vec![0, 1, 2, 7, 8],
            vec![4, 5, 6, 9, 3],
            16 << 10,
            16 << 10,
            0,
            1,
            1,
            1 << 20,
        )
        .unwrap();
        let ps = all(plan);
        let shape: Vec<_> = ps.iter().map(|p| (p.src_offset, p.dst_offset, p.len)).collect();
        assert_eq!(shape, [(0, 4096, 3072), (7168, 9216, 1024), (8192, 3072, 1024)]);
    }

    #[test]
    fn strided_pages_are_not_coalesced() {
        let layout = PagedLayout { page_len: 100, src_stride: 128, dst_stride: 100, src_offset: 8, dst_offset: 0 };
        let ps = all(PagedPlan::new(layout, vec![0, 1, 2], vec![0, 1, 2], 1000, 1000, 0, 2, 2, 1 << 20).unwrap());
        assert_eq!(ps.len(), 3);
        assert_eq!(ps[2].src_offset, 8 + 256);
        assert_eq!(ps.iter().map(|p| p.local_nic).collect::<Vec<_>>(), [0, 1, 0]);
    }

    #[test]
    fn coalescing_stops_at_max_piece() {
        let pages: Vec<u32> = (0..10).collect();
        let ps =
            all(PagedPlan::new(PagedLayout::contiguous(4096), pages.clone(), pages, 1 << 20, 1 << 20, 0, 1, 1, 16384)
                .unwrap());
        assert_eq!(ps.iter().map(|p| p.len).collect::<Vec<_>>(), [16384, 16384, 8192]);
    }

    #[test]
    fn bounds_are_checked() {
        let l = PagedLayout::contiguous(1024);
        let e = PagedPlan::new(l, vec![3], vec![0], 4096, 4096, 0, 1, 1, 1 << 20);
        assert!(e.is_ok());
        let e = PagedPlan::new(l, vec![4], vec![0], 4096, 4096, 0, 1, 1, 1 << 20);
        assert!(matches!(e, Err(Error::OutOfBounds { side: "source", .. })));
        let e = PagedPlan::new(l, vec![0], vec![4], 4096, 4096, 0, 1, 1, 1 << 20);
        assert!(matches!(e, Err(Error::OutOfBounds { side: "destination", .. })));
        let huge = PagedLayout { page_len: 1, src_stride: u64::MAX, dst_stride: 1, src_offset: 0, dst_offset: 0 };
        assert!(PagedPlan::new(huge, vec![2], vec![0], u64::MAX, 10, 0, 1, 1, 1).is_err());
        assert!(PagedPlan::new(l, vec![0, 1], vec![0], 1 << 20, 1 << 20, 0, 1, 1, 1 << 20).is_err());
        assert!(PagedPlan::new(l, vec![], vec![], 1 << 20, 1 << 20, 0, 1, 1, 1 << 20).is_err());
        assert!(
            PagedPlan::new(PagedLayout::contiguous(0), vec![0], vec![0], 1 << 20, 1 << 20, 0, 1, 1, 1 << 20).is_err()
        );
    }

    #[test]
    fn pages_above_four_gib() {
        let l = PagedLayout::contiguous(64 << 10);
        let page = (6u64 << 30) / (64 << 10);
        let ps =
            all(PagedPlan::new(l, vec![page as u32], vec![page as u32 + 1], 8 << 30, 8 << 30, 0, 1, 1, 1 << 20)
                .unwrap());
        assert_eq!(ps[0].src_offset, 6 << 30);
        assert_eq!(ps[0].dst_offset, (6 << 30) + (64 << 10));
    }
}
