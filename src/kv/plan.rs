//! Which bytes of a KV request go where: pure functions of the two
//! layouts, the two tensor-parallel positions and the block lists.
//!
//! Tokens are mapped by position: token `i` of the request is token `i %
//! B` of block `blocks[i / B]` on each side (`B` that side's tokens per
//! block), so the two sides' block sizes may differ. Each sender rank moves
//! only the heads it shares with the decoder rank. A head held by several
//! sender ranks (more ranks than KV heads, and MLA, whose latent every rank
//! holds) is sent by exactly one of them per layer, chosen by `(layer +
//! decoder rank) % replicas`, which spreads the layers over the replicas.

use super::layout::{heads_of, KvKind, KvLayout, Tp};
use crate::error::{Error, Result};
use crate::plan::{CopyList, Strided};

/// The two sides' layouts must describe the same model.
pub fn check_compatible(sender: &KvLayout, decoder: &KvLayout) -> Result<()> {
    let fields: [(&'static str, u64, u64); 5] = [
        ("layers", sender.layers as u64, decoder.layers as u64),
        ("model KV heads", sender.total_heads as u64, decoder.total_heads as u64),
        ("head dim", sender.head_dim as u64, decoder.head_dim as u64),
        ("element size", sender.elem_bytes as u64, decoder.elem_bytes as u64),
        ("kind (0 MHA, 1 MLA)", (sender.kind == KvKind::Mla) as u64, (decoder.kind == KvKind::Mla) as u64),
    ];
    for (what, ours, theirs) in fields {
        if ours != theirs {
            return Err(Error::LayoutMismatch { what, sender: ours, decoder: theirs });
        }
    }
    Ok(())
}

/// The sender rank (of `sender_tp_size`) that sends decoder head `head` of
/// `layer` to decoder rank `decoder_rank`.
pub fn sender_of(layer: u32, head: u32, total_heads: u32, sender_tp_size: u32, decoder_rank: u32) -> u32 {
    if sender_tp_size <= total_heads {
        head / (total_heads / sender_tp_size)
    } else {
        let replicas = sender_tp_size / total_heads;
        head * replicas + (layer + decoder_rank) % replicas
    }
}

/// The sender ranks that send something of `layer` to `decoder`, in
/// increasing order: as many immediates as the decoder rank counts for
/// that layer.
pub fn senders_for(layer: u32, decoder: Tp, sender_tp_size: u32, total_heads: u32) -> Result<Vec<u32>> {
    let (first, count) = heads_of(decoder, total_heads)?;
    heads_of(Tp { rank: 0, size: sender_tp_size }, total_heads)?;
    let mut ranks: Vec<u32> =
        (first..first + count).map(|h| sender_of(layer, h, total_heads, sender_tp_size, decoder.rank)).collect();
    ranks.dedup();
    Ok(ranks)
}

/// Whether `sender` sends anything of `layer` to `decoder`.
pub fn sends_layer(layer: u32, sender: Tp, decoder: Tp, total_heads: u32) -> Result<bool> {
    Ok(senders_for(layer, decoder, sender.size, total_heads)?.contains(&sender.rank))
}

/// What one sender rank moves to one decoder rank, the same for every
/// layer: the strided copies from the start of the sender's layer tensor
/// to the start of the decoder's, for the heads the two share (`None`
/// when they share none).
#[derive(Clone, Debug)]
pub struct PairPlan {
    /// The copies (offsets from the layers' bases).
    pub copies: CopyList,
    /// First shared head (model numbering) and how many.
    pub heads: (u32, u32),
}

/// Block lists of a request, checked against a layout: as many blocks as
/// `tokens` need (at least one token), each inside the cache.
pub fn check_blocks(side: &str, layout: &KvLayout, blocks: &[u32], tokens: u64) -> Result<()> {
    if tokens == 0 {
        return Err(Error::InvalidRequest("a KV request of 0 tokens".into()));
    }
    let want = tokens.div_ceil(layout.block_tokens as u64);
    if blocks.len() as u64 != want {
        return Err(Error::InvalidRequest(format!(
            "{tokens} tokens in blocks of {} need {want} {side} blocks, got {}",
            layout.block_tokens,
            blocks.len()
        )));
    }
    if let Some(&b) = blocks.iter().find(|&&b| b >= layout.blocks) {
        return Err(Error::InvalidRequest(format!("{side} block {b} is past the cache's {} blocks", layout.blocks)));
    }
    Ok(())
}

/// Plans the copies from `sender` (rank `stp`, its `src_blocks`) to
/// `decoder` (rank `dtp`, its `dst_blocks`) for `tokens` tokens.
#[allow(clippy::too_many_arguments)]
pub fn pair_plan(
    sender: &KvLayout,
    stp: Tp,
    src_blocks: &[u32],
    decoder: &KvLayout,
    dtp: Tp,
    dst_blocks: &[u32],
    tokens: u64,
) -> Result<Option<PairPlan>> {
    check_compatible(sender, decoder)?;
    sender.validate(stp)?;
    decoder.validate(dtp)?;
    check_blocks("source", sender, src_blocks, tokens)?;
    check_blocks("destination", decoder, dst_blocks, tokens)?;
    let total = sender.total_heads;
    let (s0, sn) = heads_of(stp, total)?;
    let (d0, dn) = heads_of(dtp, total)?;
    let (a, b) = (s0.max(d0), (s0 + sn).min(d0 + dn));
    if a >= b {
        return Ok(None);
    }
    let (m, hb) = ((b - a) as u64, sender.head_bytes());
    let (hs, hd) = ((a - s0) as u64, (a - d0) as u64);
    let (bs, bd) = (sender.block_tokens as u64, decoder.block_tokens as u64);
    let kv_inner = sender.kv_stride < sender.block_stride;
    let kvs = sender.kv_count();
    let mut copies = Vec::new();
    // Runs of tokens contiguous in one block on both sides.
    let mut runs = Vec::new();
    let mut pos = 0u64;
    while pos < tokens {
        let (ts, td) = (pos % bs, pos % bd);
        let n = (bs - ts).min(bd - td).min(tokens - pos);
        runs.push((src_blocks[(pos / bs) as usize] as u64, ts, dst_blocks[(pos / bd) as usize] as u64, td, n));
        pos += n;
    }
    let mut emit = |kv: u64, &(sb, ts, db, td, n): &(u64, u64, u64, u64, u64)| {
        let src = kv * sender.kv_stride + sb * sender.block_stride + ts * sender.token_stride + hs * sender.head_stride;
        let dst =
            kv * decoder.kv_stride + db * decoder.block_stride + td * decoder.token_stride + hd * decoder.head_stride;
        push_2d(
            &mut copies,
            src,
            dst,
            n,
            m,
            hb,
            (sender.token_stride, sender.head_stride),
            (decoder.token_stride, decoder.head_stride),
        );
    };
    if kv_inner {
        for run in &runs {
            for kv in 0..kvs {
                emit(kv, run);
            }
        }
    } else {
        for kv in 0..kvs {
            for run in &runs {
                emit(kv, run);
            }
        }
    }
    Ok(Some(PairPlan { copies: CopyList::new(copies)?, heads: (a, b - a) }))
}

/// Copies an `n` tokens x `m` heads patch of `hb`-byte rows, with the
/// fewest rows the two sides' strides allow.
#[allow(clippy::too_many_arguments)]
fn push_2d(out: &mut Vec<Strided>, src: u64, dst: u64, n: u64, m: u64, hb: u64, s: (u64, u64), d: (u64, u64)) {
    let ((st, sh), (dt, dh)) = (s, d);
    let strided = |src, dst, rows, row_len, src_stride, dst_stride| Strided {
        src_offset: src,
        dst_offset: dst,
        rows,
        row_len,
        src_stride,
        dst_stride,
    };
    if m == 1 || (sh == hb && dh == hb) {
        // Heads packed on both sides (NHD, vLLM): a row per token.
        out.push(strided(src, dst, n, m * hb, st, dt));
    } else if n == 1 || (st == hb && dt == hb) {
        // Tokens packed per head on both sides (HND): a row per head.
        out.push(strided(src, dst, m, n * hb, sh, dh));
    } else {
        // The sides disagree (NHD to HND): a row per (token, head).
        for t in 0..n {
            out.push(strided(src + t * st, dst + t * dt, m, hb, sh, dh));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::KvShape;
    use super::*;
    use proptest::prelude::*;

    fn shape(heads: u32, total: u32, blocks: u32, block_tokens: u32) -> KvShape {
        KvShape { layers: 3, blocks, block_tokens, heads, total_heads: total, head_dim: 4, elem_bytes: 2 }
    }

    /// Every byte the plan moves, as (sender offset, decoder offset), from
    /// replaying its copies; and the same from plain indexing of the two
    /// layouts: they must be equal.
    fn replay(p: &PairPlan) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        for c in p.copies.copies() {
            for r in 0..c.rows {
                for b in 0..c.row_len {
                    v.push((c.src_offset + r * c.src_stride + b, c.dst_offset + r * c.dst_stride + b));
                }
            }
        }
        v.sort_unstable();
        v
    }

    #[allow(clippy::too_many_arguments)]
    fn reference(s: &KvLayout, stp: Tp, sb: &[u32], d: &KvLayout, dtp: Tp, db: &[u32], tokens: u64) -> Vec<(u64, u64)> {
        let (s0, sn) = heads_of(stp, s.total_heads).unwrap();
        let (d0, dn) = heads_of(dtp, d.total_heads).unwrap();
        let mut v = Vec::new();
        for kv in 0..s.kv_count() as u32 {
            for i in 0..tokens as u32 {
                for h in s0.max(d0)..(s0 + sn).min(d0 + dn) {
                    let (bs, bd) = (s.block_tokens, d.block_tokens);
                    let so = s.offset(0, kv, sb[(i / bs) as usize], i % bs, h - s0);
                    let do_ = d.offset(0, kv, db[(i / bd) as usize], i % bd, h - d0);
                    for b in 0..s.head_bytes() {
                        v.push((so + b, do_ + b));
                    }
                }
            }
        }
        v.sort_unstable();
        v
    }

    type Ctor = fn(KvShape) -> KvLayout;
    const LAYOUTS: [Ctor; 3] = [KvLayout::vllm_flash, KvLayout::flashinfer_nhd, KvLayout::flashinfer_hnd];

    #[test]
    fn full_blocks_of_one_rank_coalesce_to_few_copies() {
        let l = KvLayout::vllm_flash(shape(8, 8, 64, 16));
        let blocks: Vec<u32> = (10..42).collect();
        let p = pair_plan(&l, Tp::SINGLE, &blocks, &l, Tp::SINGLE, &blocks, 32 * 16).unwrap().unwrap();
        assert_eq!(p.copies.copies().len(), 2, "one run for K, one for V");
        let n = KvLayout::flashinfer_nhd(shape(8, 8, 64, 16));
        let p = pair_plan(&n, Tp::SINGLE, &blocks, &n, Tp::SINGLE, &blocks, 32 * 16).unwrap().unwrap();
        assert_eq!(p.copies.copies().len(), 1, "K and V interleave per block: one run");
    }

    #[test]
    fn mismatches_are_typed_errors() {
        let a = KvLayout::vllm_flash(shape(8, 8, 4, 16));
        let mut b = a;
        b.head_dim = 8;
        b.head_stride = 16;
        b.token_stride = 128;
        b.block_stride = 2048;
        b.kv_stride = 8192;
        let e = pair_plan(&a, Tp::SINGLE, &[0], &b, Tp::SINGLE, &[0], 16).unwrap_err();
        assert!(matches!(e, Error::LayoutMismatch { what: "head dim", .. }), "{e}");
        let e = pair_plan(&a, Tp::SINGLE, &[0, 1], &a, Tp::SINGLE, &[0], 16).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(_)));
        let e = pair_plan(&a, Tp::SINGLE, &[9], &a, Tp::SINGLE, &[0], 16).unwrap_err();
        assert!(matches!(e, Error::InvalidRequest(m) if m.contains("past")));
    }

    #[test]
    fn one_sender_per_head_and_layer() {
        // Prefill TP 16 over 8 heads (2 replicas each), decode TP 4.
        for layer in 0..4 {
            for j in 0..4 {
                let s = senders_for(layer, Tp::new(j, 4).unwrap(), 16, 8).unwrap();
                assert_eq!(s.len(), 2, "decoder {j} holds 2 heads, one sender each");
            }
        }
        // MLA: one sender per layer, rotating.
        let picks: Vec<u32> = (0..4).map(|l| senders_for(l, Tp::SINGLE, 4, 1).unwrap()[0]).collect();
        assert_eq!(picks, [0, 1, 2, 3]);
        // TP 2 -> 1: both senders for every layer.
        assert_eq!(senders_for(5, Tp::SINGLE, 2, 8).unwrap(), [0, 1]);
        assert_eq!(senders_for(5, Tp::new(1, 2).unwrap(), 1, 8).unwrap(), [0]);
    }

    proptest! {
        #[test]
        fn plans_move_exactly_the_reference_bytes(
            sl in 0usize..3, dl in 0usize..3, stp in prop::sample::select(vec![1u32, 2, 4]),
            dtp in prop::sample::select(vec![1u32, 2, 4]), srank in 0u32..4, drank in 0u32..4,
            bs in prop::sample::select(vec![2u32, 4, 8]), bd in prop::sample::select(vec![2u32, 4, 8]),
            tokens in 1u64..20, seed in any::<u64>(),
        ) {
            let (srank, drank) = (srank % stp, drank % dtp);
            let total = 4;
            let s = LAYOUTS[sl](shape(total / stp, total, 12, bs));
            let d = LAYOUTS[dl](shape(total / dtp, total, 12, bd));
            let pick = |n: u64, salt: u64| -> Vec<u32> {
                let mut all: Vec<u32> = (0..12).collect();
                let mut x = seed ^ salt;
                for i in (1..all.len()).rev() {
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                    all.swap(i, (x % (i as u64 + 1)) as usize);
                }
                all.truncate(n as usize);
                all
            };
            let sb = pick(tokens.div_ceil(bs as u64), 1);
            let db = pick(tokens.div_ceil(bd as u64), 2);
            let (st, dt) = (Tp::new(srank, stp).unwrap(), Tp::new(drank, dtp).unwrap());
            let want = reference(&s, st, &sb, &d, dt, &db, tokens);
            match pair_plan(&s, st, &sb, &d, dt, &db, tokens).unwrap() {
                Some(p) => prop_assert_eq!(replay(&p), want),
                None => prop_assert!(want.is_empty()),
            }
        }
    }
}
