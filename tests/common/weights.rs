//! Helpers of the weights tests: share bytes from a full tensor's byte
//! function, a random source, sample descriptors.

use std::sync::OnceLock;

use strait::weights::{Role, Share, TensorSpec, WeightsConfig, WeightsRank};
use strait::{Provider, TransferEngine};

/// xorshift.
pub fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

/// The bytes of `spec`'s share (row-major over the share's shape) of the
/// full tensor whose byte `i` is `f(i)`.
pub fn share_bytes(spec: &TensorSpec, f: impl Fn(u64) -> u8) -> Vec<u8> {
    let dims = if spec.shape.is_empty() { vec![1] } else { spec.shape.clone() };
    let (dim, start, end) = match spec.share {
        Share::Replicated => (0, 0, dims[0]),
        Share::Split { dim, start, end } => (dim as usize, start, end),
    };
    let e = u64::from(spec.elem_bytes);
    let mut ext = dims.clone();
    ext[dim] = end - start;
    let n: u64 = ext.iter().product();
    let mut out = Vec::with_capacity((n * e) as usize);
    let mut idx = vec![0u64; dims.len()];
    for _ in 0..n {
        let mut lin = 0;
        for d in 0..dims.len() {
            lin = lin * dims[d] + idx[d] + if d == dim { start } else { 0 };
        }
        for b in 0..e {
            out.push(f(lin * e + b));
        }
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            if idx[d] < ext[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// The encoding of one of a few real descriptors (a destination or a
/// source with a few tensors), picked by `seed`.
pub fn sample_descriptor_bytes(seed: u64) -> Vec<u8> {
    static SAMPLES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let samples = SAMPLES.get_or_init(|| {
        let engine = TransferEngine::builder().provider(Provider::Tcp).interface("lo").build().unwrap();
        (0..4u32)
            .map(|i| {
                let role = if i % 2 == 0 { Role::Destination } else { Role::Source };
                let specs = vec![
                    TensorSpec::chunk("embed", 2, &[32, 16], 0, i % 2, 2),
                    TensorSpec::split("mlp.up", 1, &[8, 8, 4], 1, 0, 3 + u64::from(i)),
                    TensorSpec::replicated("norm", 4, &[16]),
                    TensorSpec::replicated("scale", 4, &[]),
                ];
                let rank = WeightsRank::alloc(&engine, WeightsConfig::default(), role, i / 2, specs).unwrap();
                rank.descriptor().to_bytes()
            })
            .collect()
    });
    samples[(seed % samples.len() as u64) as usize].clone()
}
