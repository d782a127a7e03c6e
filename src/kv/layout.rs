//! Where a KV cache's bytes are: [`KvLayout`] describes one rank's cache by
//! its dimensions and byte strides, so that any engine's cache can be
//! described, with named constructors for the common ones.

use crate::error::{Error, Result};

/// MHA/GQA caches hold a K and a V per head; MLA caches one latent vector
/// per token, the same on every tensor-parallel rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvKind {
    /// Separate K and V, `kv_heads` heads split across tensor-parallel ranks.
    Mha,
    /// One latent per token (no K/V split), replicated across TP ranks.
    Mla,
}

/// Where the layers' tensors are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvTensors {
    /// One tensor (one registered region) per layer.
    PerLayer,
    /// One tensor for all layers; layer `l` starts `layer_stride * l` bytes
    /// into it.
    Pool {
        /// Bytes from one layer to the next.
        layer_stride: u64,
    },
}

/// A tensor-parallel position: rank `rank` of `size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tp {
    /// This rank.
    pub rank: u32,
    /// Ranks in the group.
    pub size: u32,
}

impl Tp {
    /// A single rank (no tensor parallelism).
    pub const SINGLE: Tp = Tp { rank: 0, size: 1 };

    /// Rank `rank` of `size`.
    pub fn new(rank: u32, size: u32) -> Result<Tp> {
        if size == 0 || rank >= size {
            return Err(Error::InvalidRequest(format!("tensor-parallel rank {rank} of {size}")));
        }
        Ok(Tp { rank, size })
    }
}

/// One rank's KV cache: dimensions and byte strides.
///
/// The bytes of (layer `l`, K or V `k`, block `b`, token `t`, head `h`) are
/// `head_bytes` contiguous bytes at `layer_base(l) + k * kv_stride + b *
/// block_stride + t * token_stride + h * head_stride` in the layer's tensor
/// (for [`KvTensors::Pool`], `layer_base(l) = l * layer_stride` in the
/// pool; for [`KvTensors::PerLayer`], 0 in tensor `l`). `heads` counts the
/// heads this rank holds; `total_heads` the model's KV heads, split evenly
/// over the tensor-parallel ranks (when there are more ranks than heads,
/// each rank holds one, replicated). Strides are bytes, never elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvLayout {
    /// MHA (K and V) or MLA (one latent).
    pub kind: KvKind,
    /// Transformer layers.
    pub layers: u32,
    /// Blocks (pages) per layer.
    pub blocks: u32,
    /// Tokens per block.
    pub block_tokens: u32,
    /// KV heads held by this rank (MLA: 1).
    pub heads: u32,
    /// KV heads of the model (MLA: 1).
    pub total_heads: u32,
    /// Elements per head (MLA: the latent dimension).
    pub head_dim: u32,
    /// Bytes per element (2 for bf16/fp16, 1 for fp8).
    pub elem_bytes: u32,
    /// One tensor per layer or one pool.
    pub tensors: KvTensors,
    /// Bytes from K to V (MHA; 0 for MLA).
    pub kv_stride: u64,
    /// Bytes from one block to the next.
    pub block_stride: u64,
    /// Bytes from one token to the next within a block.
    pub token_stride: u64,
    /// Bytes from one head to the next.
    pub head_stride: u64,
}

/// The dimensions shared by the named constructors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvShape {
    /// Transformer layers.
    pub layers: u32,
    /// Blocks per layer.
    pub blocks: u32,
    /// Tokens per block.
    pub block_tokens: u32,
    /// KV heads held by this rank.
    pub heads: u32,
    /// KV heads of the model.
    pub total_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Bytes per element.
    pub elem_bytes: u32,
}

impl KvLayout {
    fn mha(s: KvShape, kv_stride: u64, block_stride: u64, token_stride: u64, head_stride: u64) -> Self {
        Self::strided(KvKind::Mha, s, kv_stride, block_stride, token_stride, head_stride)
    }

    fn strided(
        kind: KvKind,
        s: KvShape,
        kv_stride: u64,
        block_stride: u64,
        token_stride: u64,
        head_stride: u64,
    ) -> Self {
        KvLayout {
            kind,
            layers: s.layers,
            blocks: s.blocks,
            block_tokens: s.block_tokens,
            heads: s.heads,
            total_heads: s.total_heads,
            head_dim: s.head_dim,
            elem_bytes: s.elem_bytes,
            tensors: KvTensors::PerLayer,
            kv_stride,
            block_stride,
            token_stride,
            head_stride,
        }
    }

    /// vLLM's flash-attention cache, one tensor per layer shaped
    /// `[2, blocks, block_tokens, heads, head_dim]`.
    pub fn vllm_flash(s: KvShape) -> Self {
        let head = s.head_dim as u64 * s.elem_bytes as u64;
        let token = head * s.heads as u64;
        let block = token * s.block_tokens as u64;
        Self::mha(s, block * s.blocks as u64, block, token, head)
    }

    /// FlashInfer's NHD cache, one tensor per layer shaped `[blocks, 2,
    /// block_tokens, heads, head_dim]`.
    pub fn flashinfer_nhd(s: KvShape) -> Self {
        let head = s.head_dim as u64 * s.elem_bytes as u64;
        let token = head * s.heads as u64;
        let kv = token * s.block_tokens as u64;
        Self::mha(s, kv, 2 * kv, token, head)
    }

    /// FlashInfer's HND cache, one tensor per layer shaped `[blocks, 2,
    /// heads, block_tokens, head_dim]`.
    pub fn flashinfer_hnd(s: KvShape) -> Self {
        let token = s.head_dim as u64 * s.elem_bytes as u64;
        let head = token * s.block_tokens as u64;
        let kv = head * s.heads as u64;
        Self::mha(s, kv, 2 * kv, token, head)
    }

    /// An MLA latent cache, one tensor per layer shaped `[blocks,
    /// block_tokens, latent_dim]` (DeepSeek-V2/V3: latent 576 = 512 + 64).
    pub fn mla(layers: u32, blocks: u32, block_tokens: u32, latent_dim: u32, elem_bytes: u32) -> Self {
        let token = latent_dim as u64 * elem_bytes as u64;
        let s = KvShape { layers, blocks, block_tokens, heads: 1, total_heads: 1, head_dim: latent_dim, elem_bytes };
        Self::strided(KvKind::Mla, s, 0, token * block_tokens as u64, token, token)
    }

    /// The same layout with every layer's tensor laid back to back in one
    /// pool (`[layers, ...]`).
    pub fn pooled(mut self) -> Self {
        self.tensors = KvTensors::Pool { layer_stride: self.layer_bytes() };
        self
    }

    /// Bytes of one row (one head of one token): `head_dim * elem_bytes`.
    pub fn head_bytes(&self) -> u64 {
        self.head_dim as u64 * self.elem_bytes as u64
    }

    /// K and V (2) or one latent (1).
    pub fn kv_count(&self) -> u64 {
        match self.kind {
            KvKind::Mha => 2,
            KvKind::Mla => 1,
        }
    }

    /// Bytes one layer's tensor spans: one past its last byte.
    pub fn layer_bytes(&self) -> u64 {
        let last = |n: u64, stride: u64| n.saturating_sub(1) * stride;
        last(self.kv_count(), self.kv_stride)
            + last(self.blocks as u64, self.block_stride)
            + last(self.block_tokens as u64, self.token_stride)
            + last(self.heads as u64, self.head_stride)
            + self.head_bytes()
    }

    /// Bytes a tensor must have: one layer's for per-layer tensors, the
    /// whole pool's otherwise.
    pub fn tensor_bytes(&self) -> u64 {
        match self.tensors {
            KvTensors::PerLayer => self.layer_bytes(),
            KvTensors::Pool { layer_stride } => (self.layers as u64 - 1) * layer_stride + self.layer_bytes(),
        }
    }

    /// Tensors (registered regions) the cache has.
    pub fn tensor_count(&self) -> usize {
        match self.tensors {
            KvTensors::PerLayer => self.layers as usize,
            KvTensors::Pool { .. } => 1,
        }
    }

    /// Which tensor holds layer `l`, and where the layer starts in it.
    pub fn layer_base(&self, layer: u32) -> (usize, u64) {
        match self.tensors {
            KvTensors::PerLayer => (layer as usize, 0),
            KvTensors::Pool { layer_stride } => (0, layer as u64 * layer_stride),
        }
    }

    /// Byte offset of a row within its tensor (the reference every test
    /// compares against).
    pub fn offset(&self, layer: u32, kv: u32, block: u32, token: u32, head: u32) -> u64 {
        self.layer_base(layer).1
            + kv as u64 * self.kv_stride
            + block as u64 * self.block_stride
            + token as u64 * self.token_stride
            + head as u64 * self.head_stride
    }

    /// Checks that the layout is well formed: no dimension is zero, sizes
    /// do not overflow, the heads match the model's heads split over `tp`,
    /// and no two rows overlap (strides nest: each dimension's stride at
    /// least the span of the dimensions inside it).
    pub fn validate(&self, tp: Tp) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(format!("KV layout: {m}")));
        if self.layers == 0 || self.blocks == 0 || self.block_tokens == 0 || self.heads == 0 {
            return bad("layers, blocks, tokens per block and heads must be at least 1".into());
        }
        if self.head_dim == 0 || self.elem_bytes == 0 || self.total_heads == 0 {
            return bad("head dim, element size and total heads must be at least 1".into());
        }
        if self.layers > MAX_LAYERS {
            return bad(format!("{} layers; at most {MAX_LAYERS}", self.layers));
        }
        if self.kind == KvKind::Mla && (self.heads != 1 || self.total_heads != 1) {
            return bad("an MLA cache has one latent (heads = total heads = 1)".into());
        }
        let (_, held) = heads_of(tp, self.total_heads)?;
        if held != self.heads {
            return bad(format!(
                "rank {} of {} holds {held} of the model's {} KV heads, but the layout has {}",
                tp.rank, tp.size, self.total_heads, self.heads
            ));
        }
        // Overflow: compute the spans in u128.
        let wide = |n: u64, s: u64| (n.saturating_sub(1)) as u128 * s as u128;
        let span = wide(self.kv_count(), self.kv_stride)
            + wide(self.blocks as u64, self.block_stride)
            + wide(self.block_tokens as u64, self.token_stride)
            + wide(self.heads as u64, self.head_stride)
            + self.head_bytes() as u128;
        let total = match self.tensors {
            KvTensors::PerLayer => span,
            KvTensors::Pool { layer_stride } => wide(self.layers as u64, layer_stride) + span,
        };
        if total > u64::MAX as u128 / 2 {
            return bad("the cache spans more than 2^63 bytes".into());
        }
        let mut dims: Vec<(u64, u64)> = vec![
            (self.kv_count(), self.kv_stride),
            (self.blocks as u64, self.block_stride),
            (self.block_tokens as u64, self.token_stride),
            (self.heads as u64, self.head_stride),
        ];
        if let KvTensors::Pool { layer_stride } = self.tensors {
            dims.push((self.layers as u64, layer_stride));
        }
        dims.retain(|&(n, _)| n > 1);
        dims.sort_by_key(|&(_, stride)| stride);
        let mut inner = self.head_bytes();
        for (n, stride) in dims {
            if stride < inner {
                return bad(format!("rows overlap: a stride of {stride} bytes inside a span of {inner}"));
            }
            inner += stride * (n - 1);
        }
        Ok(())
    }
}

/// Most layers a cache may have: the layer is the low byte of the KV
/// request's immediates.
pub const MAX_LAYERS: u32 = 256;

/// The first KV head rank `tp` holds of `total` and how many: an even
/// split when there are at least as many heads as ranks; one head each,
/// replicated over `size / total` consecutive ranks, when there are more
/// ranks.
pub fn heads_of(tp: Tp, total: u32) -> Result<(u32, u32)> {
    if tp.size == 0 || tp.rank >= tp.size {
        return Err(Error::InvalidRequest(format!("tensor-parallel rank {} of {}", tp.rank, tp.size)));
    }
    if tp.size <= total {
        if !total.is_multiple_of(tp.size) {
            return Err(Error::InvalidRequest(format!("{total} KV heads do not split over {} ranks", tp.size)));
        }
        let per = total / tp.size;
        Ok((tp.rank * per, per))
    } else {
        if !tp.size.is_multiple_of(total) {
            return Err(Error::InvalidRequest(format!("{} ranks do not replicate {total} KV heads evenly", tp.size)));
        }
        Ok((tp.rank / (tp.size / total), 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(heads: u32) -> KvShape {
        KvShape { layers: 4, blocks: 8, block_tokens: 16, heads, total_heads: 8, head_dim: 128, elem_bytes: 2 }
    }

    #[test]
    fn named_layouts_match_their_shapes() {
        let s = shape(8);
        let v = KvLayout::vllm_flash(s);
        // [2, 8, 16, 8, 128] x 2 bytes
        assert_eq!(v.layer_bytes(), 2 * 8 * 16 * 8 * 128 * 2);
        assert_eq!(v.offset(0, 1, 2, 3, 4), (((8 + 2) * 16 + 3) * 8 + 4) * 256);
        let n = KvLayout::flashinfer_nhd(s);
        assert_eq!(n.offset(0, 1, 2, 3, 4), (((2 * 2 + 1) * 16 + 3) * 8 + 4) * 256);
        let h = KvLayout::flashinfer_hnd(s);
        assert_eq!(h.offset(0, 1, 2, 3, 4), (((2 * 2 + 1) * 8 + 4) * 16 + 3) * 256);
        let m = KvLayout::mla(61, 10, 64, 576, 2);
        assert_eq!(m.offset(0, 0, 2, 3, 0), (2 * 64 + 3) * 1152);
        let p = v.pooled();
        assert_eq!(p.tensor_bytes(), 4 * v.layer_bytes());
        assert_eq!(p.layer_base(3), (0, 3 * v.layer_bytes()));
        for l in [v, n, h, m, p] {
            let tp = Tp::SINGLE;
            l.validate(tp).unwrap();
        }
    }

    #[test]
    fn bad_layouts_are_refused() {
        let mut v = KvLayout::vllm_flash(shape(8));
        v.token_stride = 256; // tokens overlap heads
        assert!(v.validate(Tp::SINGLE).is_err());
        let v = KvLayout::vllm_flash(shape(4));
        assert!(v.validate(Tp::SINGLE).is_err(), "4 of 8 heads on a single rank");
        assert!(v.validate(Tp::new(1, 2).unwrap()).is_ok());
        let v = KvLayout::vllm_flash(KvShape { blocks: 0, ..shape(8) });
        assert!(v.validate(Tp::SINGLE).is_err());
    }

    #[test]
    fn heads_split_and_replicate() {
        assert_eq!(heads_of(Tp::new(3, 4).unwrap(), 8).unwrap(), (6, 2));
        assert_eq!(heads_of(Tp::new(5, 16).unwrap(), 8).unwrap(), (2, 1));
        assert!(heads_of(Tp::new(0, 3).unwrap(), 8).is_err());
        assert!(heads_of(Tp::new(0, 12).unwrap(), 8).is_err());
    }
}
