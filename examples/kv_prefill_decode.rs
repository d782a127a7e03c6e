//! Disaggregated prefill/decode with `strait::kv`, two engines in one
//! process over tcp on loopback (in a real deployment each side is its own
//! process and node; only the bytes cross between them).
//!
//! Run with `cargo run --release --example kv_prefill_decode`.

use std::time::Duration;

use strait::kv::{KvCache, KvCacheDesc, KvConfig, KvExpect, KvLayout, KvRequest, KvShape, Tp};
use strait::{Provider, TransferEngine};

fn main() -> strait::Result<()> {
    let engine = || TransferEngine::builder().provider(Provider::Tcp).interface("lo").build();
    // Llama-3-8B's cache shape, vLLM flash-attention layout, 512 blocks of 16 tokens.
    let shape =
        KvShape { layers: 32, blocks: 512, block_tokens: 16, heads: 8, total_heads: 8, head_dim: 128, elem_bytes: 2 };
    let layout = KvLayout::vllm_flash(shape);

    // Start-up: each side registers its cache once and publishes the descriptor.
    let decode = KvCache::alloc(&engine()?, layout, Tp::SINGLE, KvConfig::default())?;
    let prefill = KvCache::alloc(&engine()?, layout, Tp::SINGLE, KvConfig::default())?;
    let decode_desc_bytes = decode.descriptor().to_bytes(); // -> prefill nodes
    let prefill_desc_bytes = prefill.descriptor().to_bytes(); // -> decode nodes

    // Decode side, per request: allocate blocks, expect the KV, send the request.
    let prefill_descs = [KvCacheDesc::from_bytes(&prefill_desc_bytes)?];
    let dst_blocks: Vec<u32> = (100..164).collect(); // 1024 tokens
    let recv = decode.expect(&KvExpect::push(&prefill_descs, &dst_blocks).timeout(Duration::from_secs(30)))?;
    let request_bytes = recv.request().to_bytes(); // -> every prefill rank

    // Prefill side: push each layer as soon as it is computed.
    let request = KvRequest::from_bytes(&request_bytes)?;
    let decoder = KvCacheDesc::from_bytes(&decode_desc_bytes)?;
    let src_blocks: Vec<u32> = (0..64).collect();
    let send = prefill.push(&request, &decoder, &src_blocks)?;
    for layer in 0..layout.layers {
        // ... compute layer `layer` into src_blocks ...
        send.send_layers(layer..layer + 1)?;
    }

    // Decode side: one outcome; per-layer progress meanwhile.
    recv.wait()?;
    assert_eq!(recv.landed_layers().len(), 32);
    send.wait()?;
    println!("moved {} layers of 1024 tokens into blocks {}..{}", layout.layers, dst_blocks[0], dst_blocks[63] + 1);
    Ok(())
}
