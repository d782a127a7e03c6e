//! Splitting one contiguous transfer into pieces across NICs.

use super::{nic_pair, Piece};

/// How contiguous transfers are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardConfig {
    /// Transfers are not split into pieces smaller than this to use more
    /// NICs (small writes go whole to one NIC pair; many small writes are
    /// spread across NICs by rotation instead).
    pub min_piece: u64,
    /// No piece is longer than this (keeps each NIC's queue fed and stays
    /// under providers' maximum message sizes).
    pub max_piece: u64,
    /// Piece boundaries are multiples of this (a power of two).
    pub align: u64,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig { min_piece: 256 << 10, max_piece: 4 << 20, align: 4096 }
    }
}

/// The pieces of one contiguous transfer of `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    src_offset: u64,
    dst_offset: u64,
    len: u64,
    piece_len: u64,
    count: u64,
    rotation: usize,
    local_nics: usize,
    remote_nics: usize,
}

impl ShardPlan {
    /// Plans `len` bytes from `src_offset` to `dst_offset`. `local_nics` and
    /// `remote_nics` must be at least 1. A zero-length transfer (an
    /// immediate only) is one empty piece.
    ///
    /// The piece count is the largest of: 1; as many as there are NICs on
    /// the busier side, if each piece still gets `min_piece` bytes; and as
    /// many as `max_piece` forces. Pieces are equal, aligned, and the last
    /// takes the remainder.
    pub fn new(
        src_offset: u64,
        dst_offset: u64,
        len: u64,
        rotation: usize,
        local_nics: usize,
        remote_nics: usize,
        config: &ShardConfig,
    ) -> Self {
        assert!(local_nics > 0 && remote_nics > 0, "a group has at least one NIC");
        let nics = local_nics.max(remote_nics) as u64;
        let by_nics = nics.min(len / config.min_piece.max(1)).max(1);
        let by_size = len.div_ceil(config.max_piece.max(1));
        let wanted = by_nics.max(by_size).max(1);
        let (piece_len, count) = if wanted == 1 {
            (len, 1)
        } else {
            let align = config.align.max(1);
            let piece_len = len.div_ceil(wanted).next_multiple_of(align).min(config.max_piece.max(align));
            (piece_len, len.div_ceil(piece_len))
        };
        ShardPlan { src_offset, dst_offset, len, piece_len, count, rotation, local_nics, remote_nics }
    }

    /// Number of pieces (at least 1).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Piece `index` (`index < count()`).
    pub fn piece(&self, index: u64) -> Piece {
        debug_assert!(index < self.count);
        let start = index * self.piece_len;
        let len = if index + 1 == self.count { self.len - start } else { self.piece_len };
        let (local_nic, remote_nic) = nic_pair(index, self.rotation, self.local_nics, self.remote_nics);
        Piece {
            local_nic,
            remote_nic,
            src_offset: self.src_offset + start,
            dst_offset: self.dst_offset + start,
            len,
            rows: super::Rows::ONE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(plan: &ShardPlan) -> Vec<Piece> {
        (0..plan.count()).map(|i| plan.piece(i)).collect()
    }

    /// The pieces tile `[0, len)` exactly, in order, within max_piece.
    fn assert_tiles(plan: &ShardPlan, len: u64, config: &ShardConfig) {
        let mut next = 0;
        for p in pieces(plan) {
            assert_eq!(p.src_offset, next);
            assert_eq!(p.dst_offset, next);
            assert!(p.len <= config.max_piece.max(config.align));
            assert!(p.len > 0 || len == 0);
            next += p.len;
        }
        assert_eq!(next, len);
    }

    #[test]
    fn small_write_is_one_piece() {
        let c = ShardConfig::default();
        let plan = ShardPlan::new(0, 0, 4096, 0, 4, 4, &c);
        assert_eq!(plan.count(), 1);
        assert_eq!(
            plan.piece(0),
            Piece {
                local_nic: 0,
                remote_nic: 0,
                src_offset: 0,
                dst_offset: 0,
                len: 4096,
                rows: super::super::Rows::ONE
            }
        );
    }

    #[test]
    fn zero_length_is_one_empty_piece() {
        let plan = ShardPlan::new(7, 9, 0, 3, 2, 2, &ShardConfig::default());
        assert_eq!(plan.count(), 1);
        assert_eq!(plan.piece(0).len, 0);
        assert_eq!(plan.piece(0).local_nic, 1);
    }

    #[test]
    fn large_write_uses_every_nic_of_the_busier_side() {
        let c = ShardConfig { max_piece: 1 << 30, ..ShardConfig::default() };
        let plan = ShardPlan::new(0, 0, 16 << 20, 0, 4, 2, &c);
        assert_eq!(plan.count(), 4);
        let ps = pieces(&plan);
        assert_eq!(ps.iter().map(|p| p.local_nic).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(ps.iter().map(|p| p.remote_nic).collect::<Vec<_>>(), [0, 1, 0, 1]);
        assert!(ps.iter().all(|p| p.len == 4 << 20));
    }

    #[test]
    fn pieces_are_aligned_and_tile_the_range() {
        let c = ShardConfig::default();
        for len in [1, 4095, 4096, 300_000, 1 << 20, (1 << 20) + 1, 64 << 20, (64 << 20) - 3] {
            for (ln, rn) in [(1, 1), (2, 1), (1, 4), (4, 4), (3, 2)] {
                let plan = ShardPlan::new(0, 0, len, 0, ln, rn, &c);
                assert_tiles(&plan, len, &c);
                for p in pieces(&plan).iter().take(plan.count() as usize - 1) {
                    assert_eq!(p.len % c.align, 0, "len {len}");
                }
            }
        }
    }

    #[test]
    fn offsets_are_carried() {
        let plan = ShardPlan::new(100, 1 << 40, 8 << 20, 0, 2, 2, &ShardConfig::default());
        let p = plan.piece(1);
        assert_eq!(p.src_offset - 100, p.dst_offset - (1 << 40));
    }

    #[test]
    fn above_four_gib() {
        let c = ShardConfig::default();
        let len = (5u64 << 30) + 12345;
        let plan = ShardPlan::new(0, 1 << 33, len, 1, 4, 4, &c);
        assert_eq!(plan.count(), len.div_ceil(c.max_piece));
        let last = plan.piece(plan.count() - 1);
        assert_eq!(last.src_offset + last.len, len);
        assert_eq!(last.dst_offset + last.len, (1 << 33) + len);
    }

    #[test]
    fn rotation_spreads_small_writes() {
        let c = ShardConfig::default();
        let nics: Vec<_> = (0..4).map(|r| ShardPlan::new(0, 0, 64, r, 2, 4, &c).piece(0)).collect();
        assert_eq!(
            nics.iter().map(|p| (p.local_nic, p.remote_nic)).collect::<Vec<_>>(),
            [(0, 0), (1, 1), (0, 2), (1, 3)]
        );
    }
}
