//! The `kv` workload: one prefill instance (the client, TP `P` ranks)
//! pushes a request's KV cache into one decode instance (the server, TP
//! `D` ranks), layer by layer or whole, with real model shapes. Baselines
//! run in the same invocation on the same bytes: `contiguous`, each
//! (layer, sender, decoder) share as one contiguous write (the ceiling: no
//! layout, no scattering); `per-block`, one engine request per (layer,
//! K/V, block), the descriptor-per-block pattern of today's connectors
//! (same-TP runs only, where a block's K or V is contiguous); and, for a
//! TP split (`P != D`) that moves the same bytes as TP 1:1 (heads split,
//! not replicated), `same-TP`: strait's own push of the same request
//! between one prefill and one decode rank, the transfer the split is
//! measured against.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strait::kv::{KvCache, KvCacheDesc, KvConfig, KvExpect, KvLayout, KvRecv, KvRequest, KvShape, Tp};
use strait::{MemoryRegion, MrDesc, Transfer, TransferEngine};

use crate::proto::Msg;

/// What to move: a model's cache shape, the layout, the TP split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvSpec {
    pub preset: String,
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub elem_bytes: u32,
    pub block_tokens: u32,
    /// `vllm`, `nhd`, `hnd` or `mla`.
    pub layout: String,
    pub tokens: u64,
    pub prefill_tp: u32,
    pub decode_tp: u32,
    /// Layer by layer (true) or one call for all layers.
    pub layerwise: bool,
}

impl KvSpec {
    /// A named model: `llama3-8b`, `qwen3-32b`, `deepseek-v3` (MLA).
    pub fn preset(name: &str, layout: &str, tokens: u64, tp: (u32, u32), layerwise: bool) -> Result<Self, String> {
        let (layers, kv_heads, head_dim, layout) = match name {
            "llama3-8b" => (32, 8, 128, layout),
            "qwen3-32b" => (64, 8, 128, layout),
            "deepseek-v3" => (61, 1, 576, "mla"),
            _ => return Err(format!("unknown KV preset {name:?} (llama3-8b, qwen3-32b, deepseek-v3)")),
        };
        if !["vllm", "nhd", "hnd", "mla"].contains(&layout) || (layout == "mla") != (name == "deepseek-v3") {
            return Err(format!("layout {layout:?} does not fit {name} (vllm, nhd, hnd; mla for deepseek-v3)"));
        }
        Ok(KvSpec {
            preset: name.into(),
            layers,
            kv_heads,
            head_dim,
            elem_bytes: 2,
            block_tokens: if name == "deepseek-v3" { 64 } else { 16 },
            layout: layout.into(),
            tokens,
            prefill_tp: tp.0,
            decode_tp: tp.1,
            layerwise,
        })
    }

    fn blocks(&self) -> u32 {
        self.tokens.div_ceil(self.block_tokens as u64) as u32
    }

    /// The layout of rank `tp`.
    pub fn layout(&self, tp: Tp) -> Result<KvLayout, String> {
        if self.layout == "mla" {
            return Ok(KvLayout::mla(self.layers, self.blocks(), self.block_tokens, self.head_dim, self.elem_bytes));
        }
        let (_, heads) = strait::kv::heads_of(tp, self.kv_heads).map_err(|e| e.to_string())?;
        let shape = KvShape {
            layers: self.layers,
            blocks: self.blocks(),
            block_tokens: self.block_tokens,
            heads,
            total_heads: self.kv_heads,
            head_dim: self.head_dim,
            elem_bytes: self.elem_bytes,
        };
        Ok(match self.layout.as_str() {
            "nhd" => KvLayout::flashinfer_nhd(shape),
            "hnd" => KvLayout::flashinfer_hnd(shape),
            _ => KvLayout::vllm_flash(shape),
        })
    }

    /// Source blocks: in order. Destination blocks: a fixed shuffle, as
    /// block tables are after a while (no two consecutive).
    pub fn block_lists(&self) -> (Vec<u32>, Vec<u32>) {
        let n = self.blocks();
        let src: Vec<u32> = (0..n).collect();
        let mut dst: Vec<u32> = (0..n).collect();
        let mut x = 0x9E37_79B9u64;
        for i in (1..dst.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            dst.swap(i, (x % (i as u64 + 1)) as usize);
        }
        (src, dst)
    }

    fn caches(&self, engine: &TransferEngine, size: u32) -> Result<Vec<KvCache>, String> {
        (0..size)
            .map(|r| {
                let tp = Tp::new(r, size).map_err(|e| e.to_string())?;
                KvCache::alloc(engine, self.layout(tp)?, tp, KvConfig::default()).map_err(|e| e.to_string())
            })
            .collect()
    }
}

/// The server's side: the decode ranks' caches and their requests.
pub struct KvServer {
    caches: Vec<KvCache>,
    senders: Vec<KvCacheDesc>,
    recvs: Vec<KvRecv>,
    spec: KvSpec,
}

impl KvServer {
    pub fn setup(engine: &TransferEngine, spec: KvSpec, senders: &[String]) -> Result<(Self, Msg), String> {
        let caches = spec.caches(engine, spec.decode_tp)?;
        let senders = senders
            .iter()
            .map(|h| h.parse::<KvCacheDesc>().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let descs = caches.iter().map(|c| c.descriptor().to_string()).collect();
        Ok((KvServer { caches, senders, recvs: Vec::new(), spec }, Msg::KvReady { decoders: descs }))
    }

    /// A new request on every decode rank; returns their bytes.
    pub fn expect(&mut self) -> Result<Msg, String> {
        let (_, dst) = self.spec.block_lists();
        self.recvs = self
            .caches
            .iter()
            .map(|c| c.expect(&KvExpect::push(&self.senders, &dst).tokens(self.spec.tokens)))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        Ok(Msg::KvRequests { requests: self.recvs.iter().map(|r| r.request().to_string()).collect() })
    }

    /// Waits for every decode rank's outcome.
    pub fn wait(&mut self) -> Msg {
        let errors: Vec<String> = self
            .recvs
            .drain(..)
            .filter_map(|r| r.wait_timeout(Duration::from_secs(60)).err().map(|e| e.to_string()))
            .collect();
        Msg::KvDone { error: (!errors.is_empty()).then(|| errors.join("; ")) }
    }
}

/// One measured request.
pub struct KvRun {
    pub seconds: f64,
    pub requests: u64,
    /// Caller CPU time spent submitting, per layer.
    pub cpu_per_layer: f64,
}

/// One sender's share for one decoder: bytes per layer, and the layers.
type Share<'a> = (&'a KvCache, &'a KvCacheDesc, u64, Vec<u32>);

/// The client's side: the prefill ranks' caches.
pub struct KvClient {
    pub spec: KvSpec,
    engine: TransferEngine,
    caches: Vec<KvCache>,
    decoders: Vec<KvCacheDesc>,
}

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

impl KvClient {
    pub fn new(engine: &TransferEngine, spec: KvSpec) -> Result<(Self, Vec<String>), String> {
        let caches = spec.caches(engine, spec.prefill_tp)?;
        let descs = caches.iter().map(|c| c.descriptor().to_string()).collect();
        Ok((KvClient { spec, engine: engine.clone(), caches, decoders: Vec::new() }, descs))
    }

    pub fn set_decoders(&mut self, decoders: &[String]) -> Result<(), String> {
        self.decoders =
            decoders.iter().map(|h| h.parse::<KvCacheDesc>().map_err(|e| e.to_string())).collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Bytes of one request over every (sender, decoder) pair.
    pub fn bytes(&self) -> Result<u64, String> {
        Ok(self.shares()?.iter().map(|(_, _, bytes, layers)| bytes * layers.len() as u64).sum())
    }

    /// What each sender moves to each decoder per layer, and for which
    /// layers.
    fn shares(&self) -> Result<Vec<Share<'_>>, String> {
        let (src, dst) = self.spec.block_lists();
        let mut shares = Vec::new();
        for d in &self.decoders {
            for c in &self.caches {
                let (stp, total) = (c.descriptor().tp, c.layout().total_heads);
                let plan = strait::kv::plan::pair_plan(c.layout(), stp, &src, &d.layout, d.tp, &dst, self.spec.tokens)
                    .map_err(|e| e.to_string())?;
                let Some(plan) = plan else { continue };
                let layers = (0..self.spec.layers)
                    .filter(|&l| strait::kv::plan::sends_layer(l, stp, d.tp, total).unwrap_or(false))
                    .collect();
                shares.push((c, d, plan.copies.bytes(), layers));
            }
        }
        Ok(shares)
    }

    /// strait's KV transfer of one request (the server made `requests`).
    pub fn strait(&self, requests: &[String]) -> Result<KvRun, String> {
        let (src, _) = self.spec.block_lists();
        let mut sends = Vec::new();
        for (j, r) in requests.iter().enumerate() {
            let request: KvRequest = r.parse().map_err(|e: strait::Error| e.to_string())?;
            for c in &self.caches {
                sends.push(c.push(&request, &self.decoders[j], &src).map_err(|e| e.to_string())?);
            }
        }
        let layers = self.spec.layers;
        let (start, cpu) = (Instant::now(), thread_cpu());
        if self.spec.layerwise {
            for l in 0..layers {
                for s in &sends {
                    s.send_layers(l..l + 1).map_err(|e| e.to_string())?;
                }
            }
        } else {
            for s in &sends {
                s.send_all().map_err(|e| e.to_string())?;
            }
        }
        let cpu = thread_cpu() - cpu;
        for s in &sends {
            s.wait_timeout(Duration::from_secs(60)).map_err(|e| e.to_string())?;
        }
        let requests = sends.iter().map(|s| s.layers_to_send().len() as u64).sum();
        Ok(KvRun { seconds: start.elapsed().as_secs_f64(), requests, cpu_per_layer: cpu / layers as f64 })
    }

    /// The ceiling: each (layer, sender, decoder) share as one contiguous
    /// write of the same bytes.
    pub fn contiguous(&self) -> Result<KvRun, String> {
        let shares = self.shares()?;
        self.timed(|layer| {
            let mut out = Vec::new();
            for (c, d, bytes, layers) in &shares {
                if layers.contains(&layer) {
                    let (si, sbase) = c.layout().layer_base(layer);
                    let (di, dbase) = d.layout.layer_base(layer);
                    out.push(self.engine.write(&c.tensors()[si], sbase, &d.tensors[di], dbase, *bytes, None));
                }
            }
            out
        })
    }

    /// One engine request per (layer, K/V, block): same TP only.
    pub fn per_block(&self) -> Result<Option<KvRun>, String> {
        if self.spec.prefill_tp != 1 || self.spec.decode_tp != 1 || self.spec.layout == "hnd" {
            return Ok(None);
        }
        let (src, dst) = self.spec.block_lists();
        let (c, d) = (&self.caches[0], &self.decoders[0]);
        let l = *c.layout();
        let block_bytes = l.block_tokens as u64 * l.token_stride;
        let items: Vec<(u64, u64)> = (0..l.kv_count() as u32)
            .flat_map(|kv| src.iter().zip(&dst).map(move |(&s, &t)| (kv, s, t)))
            .map(|(kv, s, t)| (l.offset(0, kv, s, 0, 0), d.layout.offset(0, kv, t, 0, 0)))
            .collect();
        let full = self.spec.tokens.is_multiple_of(l.block_tokens as u64);
        if !full {
            return Ok(None);
        }
        self.timed(|layer| {
            let (si, sbase) = l.layer_base(layer);
            let (di, dbase) = d.layout.layer_base(layer);
            let (src, dst): (&MemoryRegion, &MrDesc) = (&c.tensors()[si], &d.tensors[di]);
            items.iter().map(|&(s, t)| self.engine.write(src, sbase + s, dst, dbase + t, block_bytes, None)).collect()
        })
        .map(Some)
    }

    fn timed(&self, mut layer: impl FnMut(u32) -> Vec<strait::Result<Transfer>>) -> Result<KvRun, String> {
        let start = Instant::now();
        let mut all = Vec::new();
        let mut cpu_total = 0.0;
        for l in 0..self.spec.layers {
            let before = thread_cpu();
            let ts = layer(l);
            cpu_total += thread_cpu() - before;
            for t in ts {
                all.push(t.map_err(|e| e.to_string())?);
            }
        }
        let requests = all.len() as u64;
        for t in &all {
            t.wait_timeout(Duration::from_secs(60)).map_err(|e| e.to_string())?;
        }
        Ok(KvRun {
            seconds: start.elapsed().as_secs_f64(),
            requests,
            cpu_per_layer: cpu_total / self.spec.layers as f64,
        })
    }
}
