//! KV-cache transfer over real libfabric engines (tcp and shm on loopback):
//! byte-exact against an independent reference for every named layout,
//! heterogeneous tensor parallelism, MLA, differing block sizes, push and
//! pull, layers in random order; concurrent requests; cancellation from
//! either side; failures reported to the decoder; a SIGKILLed sender.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{engine, TIMEOUT};
use strait::kv::{KvCache, KvCacheDesc, KvConfig, KvExpect, KvLayout, KvRecv, KvRequest, KvSend, KvShape, Tp};
use strait::{Error, Provider, TransferEngine};

/// The byte at (layer, kv, token position, model head, byte in the head):
/// what every rank holding that head has, and what the decoder must get.
fn byte(layer: u32, kv: u32, pos: u64, head: u32, b: u64) -> u8 {
    let mut x = (layer as u64) << 48 ^ (kv as u64) << 44 ^ pos << 20 ^ (head as u64) << 12 ^ b;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 | 1
}

fn config() -> KvConfig {
    KvConfig { heartbeat: Duration::from_millis(100), ..KvConfig::default() }
}

/// Calls `row(tensor, offset, reference bytes)` for every row (layer, K/V,
/// token, head) of `tokens` tokens in `blocks` of `cache`.
fn rows(cache: &KvCache, blocks: &[u32], tokens: u64, mut row: impl FnMut(usize, u64, Vec<u8>)) {
    let l = *cache.layout();
    let (first, _) = strait::kv::heads_of(cache.descriptor().tp, l.total_heads).unwrap();
    let bt = l.block_tokens as u64;
    for layer in 0..l.layers {
        let (t, _) = l.layer_base(layer);
        for kv in 0..l.kv_count() as u32 {
            for pos in 0..tokens {
                let (block, tok) = (blocks[(pos / bt) as usize], (pos % bt) as u32);
                for h in 0..l.heads {
                    let want = (0..l.head_bytes()).map(|b| byte(layer, kv, pos, first + h, b)).collect();
                    row(t, l.offset(layer, kv, block, tok, h), want);
                }
            }
        }
    }
}

/// Fills a sender's blocks with the reference bytes of `tokens` tokens.
fn fill(cache: &KvCache, blocks: &[u32], tokens: u64) {
    rows(cache, blocks, tokens, |t, offset, bytes| cache.tensors()[t].write_at(offset, &bytes).unwrap());
}

/// Checks a decoder's blocks hold the reference bytes.
fn check(cache: &KvCache, blocks: &[u32], tokens: u64) {
    let rank = cache.descriptor().tp.rank;
    rows(cache, blocks, tokens, |t, offset, want| {
        let got = cache.tensors()[t].to_vec(offset, want.len() as u64).unwrap();
        assert_eq!(got, want, "tensor {t} offset {offset} of decoder rank {rank}");
    });
}

type Ctor = fn(KvShape) -> KvLayout;

struct Side {
    caches: Vec<KvCache>,
}

fn side(provider: Provider, tp: u32, layers: u32, blocks: u32, block_tokens: u32, ctor: Ctor, heads: u32) -> Side {
    side_in(provider, tp, layers, blocks, block_tokens, ctor, heads, false)
}

/// `device`: the caches are staged device memory (the host stand-in of the
/// `test-backend` feature: host memory only the engine's stager copies).
#[allow(clippy::too_many_arguments)]
fn side_in(
    provider: Provider,
    tp: u32,
    layers: u32,
    blocks: u32,
    block_tokens: u32,
    ctor: Ctor,
    heads: u32,
    device: bool,
) -> Side {
    let caches = (0..tp)
        .map(|r| {
            let held = strait::kv::heads_of(Tp::new(r, tp).unwrap(), heads).unwrap().1;
            let shape =
                KvShape { layers, blocks, block_tokens, heads: held, total_heads: heads, head_dim: 8, elem_bytes: 2 };
            if device {
                device_cache(provider, ctor(shape), Tp::new(r, tp).unwrap())
            } else {
                let e = engine(provider, 1);
                KvCache::alloc(&e, ctor(shape), Tp::new(r, tp).unwrap(), config()).unwrap()
            }
        })
        .collect();
    Side { caches }
}

#[cfg(feature = "test-backend")]
fn device_cache(provider: Provider, layout: KvLayout, tp: Tp) -> KvCache {
    let e = TransferEngine::builder()
        .provider(provider)
        .interface("lo")
        .staging(4, 64 << 10)
        .host_device_stand_in()
        .build()
        .unwrap();
    let tensors = (0..layout.tensor_count())
        .map(|_| e.alloc_device(layout.tensor_bytes(), 0, strait::Access::REMOTE_READ_WRITE).unwrap())
        .collect();
    let cache = KvCache::new(&e, layout, tp, tensors, config()).unwrap();
    assert!(cache.tensors()[0].descriptor().is_staged());
    cache
}

#[cfg(not(feature = "test-backend"))]
fn device_cache(_: Provider, _: KvLayout, _: Tp) -> KvCache {
    unreachable!("device caches need the test-backend feature")
}

fn descs(side: &Side) -> Vec<KvCacheDesc> {
    side.caches.iter().map(|c| KvCacheDesc::from_bytes(&c.descriptor().to_bytes()).unwrap()).collect()
}

/// A shuffled order of `n` layers.
fn shuffled(n: u32, seed: u64) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// Runs one push (or pull) request from every sender rank to every decoder
/// rank and checks every byte.
#[allow(clippy::too_many_arguments)]
fn run(provider: Provider, p: u32, d: u32, sl: Ctor, dl: Ctor, bs: u32, bd: u32, tokens: u64, pull: bool) {
    run_in(provider, p, d, sl, dl, bs, bd, tokens, pull, false)
}

#[allow(clippy::too_many_arguments)]
fn run_in(
    provider: Provider,
    p: u32,
    d: u32,
    sl: Ctor,
    dl: Ctor,
    bs: u32,
    bd: u32,
    tokens: u64,
    pull: bool,
    device: bool,
) {
    let (layers, heads) = (3, 4);
    let senders = side_in(provider, p, layers, 12, bs, sl, heads, device);
    let decoders = side_in(provider, d, layers, 12, bd, dl, heads, device);
    let src_blocks: Vec<u32> = (0..tokens.div_ceil(bs as u64) as u32).map(|i| (i * 5 + 3) % 12).collect();
    let dst_blocks: Vec<u32> = (0..tokens.div_ceil(bd as u64) as u32).map(|i| 11 - i).collect();
    for c in &senders.caches {
        fill(c, &src_blocks, tokens);
    }
    let sender_descs = descs(&senders);
    let recvs: Vec<KvRecv> = decoders
        .caches
        .iter()
        .map(|c| {
            let e = if pull {
                KvExpect::pull(&sender_descs, &src_blocks, &dst_blocks)
            } else {
                KvExpect::push(&sender_descs, &dst_blocks)
            };
            c.expect(&e.tokens(tokens).timeout(TIMEOUT)).unwrap()
        })
        .collect();
    let mut sends: Vec<KvSend> = Vec::new();
    for (j, r) in recvs.iter().enumerate() {
        let request = KvRequest::from_bytes(&r.request().to_bytes()).unwrap();
        let decoder = KvCacheDesc::from_bytes(&decoders.caches[j].descriptor().to_bytes()).unwrap();
        for c in &senders.caches {
            let s = if pull { c.serve_pull(&request, &decoder) } else { c.push(&request, &decoder, &src_blocks) };
            sends.push(s.unwrap());
        }
    }
    for l in shuffled(layers, tokens + p as u64) {
        for s in &sends {
            s.send_layers(l..l + 1).unwrap();
        }
    }
    for (j, r) in recvs.iter().enumerate() {
        r.wait_timeout(TIMEOUT).unwrap_or_else(|e| panic!("decoder {j}: {e}"));
        assert_eq!(r.landed_layers(), (0..layers).collect::<Vec<_>>());
        check(&decoders.caches[j], &dst_blocks, tokens);
    }
    for s in &sends {
        s.wait_timeout(TIMEOUT).unwrap();
    }
}

const VLLM: Ctor = KvLayout::vllm_flash;
const NHD: Ctor = KvLayout::flashinfer_nhd;
const HND: Ctor = KvLayout::flashinfer_hnd;

#[test]
fn every_layout_one_to_one_over_tcp() {
    for (sl, dl) in [(VLLM, VLLM), (NHD, NHD), (HND, HND), (NHD, HND), (HND, VLLM)] {
        run(Provider::Tcp, 1, 1, sl, dl, 4, 4, 22, false);
    }
}

/// KV transfer between staged device caches (GPU memory on a transport
/// without GPUDirect; here the host stand-in): NHD head slices (strided
/// rows), HND, TP 2:1 and 1:2, push and pull.
#[test]
#[cfg(feature = "test-backend")]
fn staged_device_caches_over_tcp() {
    run_in(Provider::Tcp, 2, 1, NHD, NHD, 4, 4, 16, false, true);
    run_in(Provider::Tcp, 1, 2, HND, NHD, 4, 4, 22, false, true);
    run_in(Provider::Tcp, 2, 1, NHD, HND, 4, 4, 16, true, true);
}

#[test]
fn heterogeneous_tp_over_tcp() {
    run(Provider::Tcp, 2, 1, NHD, NHD, 4, 4, 16, false);
    run(Provider::Tcp, 1, 2, HND, HND, 4, 4, 16, false);
    run(Provider::Tcp, 4, 2, NHD, VLLM, 4, 4, 13, false);
    // More ranks than KV heads: replicated heads, one sender per layer.
    run(Provider::Tcp, 8, 2, VLLM, VLLM, 4, 4, 8, false);
}

#[test]
fn differing_block_sizes_and_pooled_tensors() {
    run(Provider::Tcp, 1, 1, VLLM, |s| KvLayout::vllm_flash(s).pooled(), 4, 8, 29, false);
    run(Provider::Tcp, 2, 1, |s| KvLayout::flashinfer_hnd(s).pooled(), NHD, 8, 2, 17, false);
}

#[test]
fn pull_mode_over_tcp() {
    run(Provider::Tcp, 1, 1, VLLM, VLLM, 4, 4, 16, true);
    run(Provider::Tcp, 2, 1, NHD, HND, 4, 4, 11, true);
}

#[test]
fn over_shm() {
    run(Provider::Shm, 2, 1, NHD, NHD, 4, 4, 16, false);
    run(Provider::Shm, 1, 1, VLLM, VLLM, 4, 8, 16, true);
    run(Provider::Shm, 2, 1, NHD, HND, 4, 4, 11, true);
}

fn mla_side(provider: Provider, tp: u32, blocks: u32, block_tokens: u32) -> Side {
    let caches = (0..tp)
        .map(|r| {
            let e = engine(provider, 1);
            KvCache::alloc(&e, KvLayout::mla(4, blocks, block_tokens, 12, 2), Tp::new(r, tp).unwrap(), config())
                .unwrap()
        })
        .collect();
    Side { caches }
}

#[test]
fn mla_one_sender_per_layer() {
    let (p, tokens) = (3u32, 20u64);
    let senders = mla_side(Provider::Tcp, p, 8, 4);
    let decoders = mla_side(Provider::Tcp, 2, 8, 8);
    let src: Vec<u32> = (0..5).collect();
    let dst: Vec<u32> = vec![6, 2, 4];
    for c in &senders.caches {
        fill(c, &src, tokens);
    }
    let sd = descs(&senders);
    for d in &decoders.caches {
        let r = d.expect(&KvExpect::push(&sd, &dst).tokens(tokens)).unwrap();
        let sends: Vec<KvSend> =
            senders.caches.iter().map(|c| c.push(r.request(), d.descriptor(), &src).unwrap()).collect();
        let per_rank: Vec<usize> = sends.iter().map(|s| s.layers_to_send().len()).collect();
        assert_eq!(per_rank.iter().sum::<usize>(), 4, "each layer from exactly one rank: {per_rank:?}");
        for s in &sends {
            s.send_all().unwrap();
        }
        r.wait_timeout(TIMEOUT).unwrap();
        check(d, &dst, tokens);
        for s in &sends {
            s.wait_timeout(TIMEOUT).unwrap();
        }
    }
}

/// A decoder of one rank and a sender of one rank, vLLM layout, 16 blocks.
fn pair(provider: Provider) -> (KvCache, KvCache) {
    let shape =
        KvShape { layers: 4, blocks: 16, block_tokens: 4, heads: 2, total_heads: 2, head_dim: 8, elem_bytes: 2 };
    let s = KvCache::alloc(&engine(provider, 1), KvLayout::vllm_flash(shape), Tp::SINGLE, config()).unwrap();
    let d = KvCache::alloc(&engine(provider, 1), KvLayout::vllm_flash(shape), Tp::SINGLE, config()).unwrap();
    (s, d)
}

#[test]
fn concurrent_requests_and_layer_progress() {
    let (s, d) = pair(Provider::Tcp);
    let senders = [s.descriptor().clone()];
    let blocks: Vec<Vec<u32>> = (0..4).map(|i| vec![i * 4, i * 4 + 1, i * 4 + 2, i * 4 + 3]).collect();
    fill(&s, &(0..16).collect::<Vec<_>>()[..4], 16);
    let recvs: Vec<KvRecv> = blocks.iter().map(|b| d.expect(&KvExpect::push(&senders, b)).unwrap()).collect();
    let mut ids: Vec<u64> = recvs.iter().map(|r| r.request().id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 4);
    let sends: Vec<KvSend> =
        recvs.iter().map(|r| s.push(r.request(), d.descriptor(), &[0, 1, 2, 3]).unwrap()).collect();
    // Layer 2 only: the decoders see exactly that layer land.
    for x in &sends {
        x.send_layers(2..3).unwrap();
    }
    let start = Instant::now();
    while recvs.iter().any(|r| !r.layer_landed(2)) {
        assert!(start.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(1));
    }
    for r in &recvs {
        assert_eq!(r.landed_layers(), [2]);
        assert!(!r.is_done());
    }
    for x in &sends {
        x.send_all().unwrap();
    }
    for (r, b) in recvs.iter().zip(&blocks) {
        r.wait_timeout(TIMEOUT).unwrap();
        check(&d, b, 16);
    }
}

#[test]
fn user_immediates_and_kv_immediates_never_mix() {
    let (s, d) = pair(Provider::Tcp);
    let r = d.expect(&KvExpect::push(&[s.descriptor().clone()], &[0, 1])).unwrap();
    let slot_value = strait::reserved_imm(strait::ImmSpace::Kv, r.request().slot, 0).unwrap();
    assert!(matches!(d.engine().expect_imm(slot_value, 1), Err(Error::InvalidRequest(_))));
    let user = d.engine().expect_imm(0, 1).unwrap();
    let x = s.push(r.request(), d.descriptor(), &[0, 1]).unwrap();
    x.send_all().unwrap();
    r.wait_timeout(TIMEOUT).unwrap();
    assert_eq!(user.seen(), 0, "KV immediates do not reach a user's counter");
}

#[test]
fn decoder_cancel_is_confirmed_by_the_sender() {
    let (s, d) = pair(Provider::Tcp);
    let r = d.expect(&KvExpect::push(&[s.descriptor().clone()], &[0, 1, 2])).unwrap();
    let x = s.push(r.request(), d.descriptor(), &[3, 4, 5]).unwrap();
    x.send_layers(0..1).unwrap();
    r.cancel();
    assert!(matches!(r.wait_timeout(TIMEOUT), Err(Error::Cancelled)));
    assert!(matches!(x.wait_timeout(TIMEOUT), Err(Error::Cancelled)));
    assert!(x.send_layers(1..2).is_err(), "nothing is posted after the cancel");
    // Once the cancel is confirmed the blocks stay as they are.
    let l = *d.layout();
    let snapshot = |layer| d.tensors()[layer as usize].to_vec(0, l.layer_bytes()).unwrap();
    let before: Vec<Vec<u8>> = (0..l.layers).map(snapshot).collect();
    std::thread::sleep(Duration::from_millis(300));
    let after: Vec<Vec<u8>> = (0..l.layers).map(snapshot).collect();
    assert!(before == after, "a byte landed after the cancel was confirmed");
}

#[test]
fn cancel_before_the_request_reaches_the_sender() {
    let (s, d) = pair(Provider::Tcp);
    let r = d.expect(&KvExpect::push(&[s.descriptor().clone()], &[0])).unwrap();
    r.cancel();
    assert!(matches!(r.wait_timeout(TIMEOUT), Err(Error::Cancelled)));
    // The late request is refused.
    assert!(matches!(s.push(r.request(), d.descriptor(), &[0]), Err(Error::Cancelled)));
}

#[test]
fn a_request_times_out_on_its_own_deadline() {
    let (s, d) = pair(Provider::Tcp);
    let senders = [s.descriptor().clone()];
    let start = Instant::now();
    // The sender never hears of it: the decoder's abort is confirmed by a
    // sender that has no such request.
    let r = d.expect(&KvExpect::push(&senders, &[0]).timeout(Duration::from_millis(200))).unwrap();
    assert!(matches!(r.wait_timeout(TIMEOUT), Err(Error::Timeout(t)) if t == Duration::from_millis(200)));
    // And one the sender is serving, having sent part of it.
    let r = d.expect(&KvExpect::push(&senders, &[1, 2]).timeout(Duration::from_millis(200))).unwrap();
    let x = s.push(r.request(), d.descriptor(), &[1, 2]).unwrap();
    x.send_layers(0..1).unwrap();
    assert!(matches!(r.wait_timeout(TIMEOUT), Err(Error::Timeout(_))));
    assert!(x.wait_timeout(TIMEOUT).is_err());
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

#[test]
fn sender_cancel_and_sender_failure_reach_the_decoder() {
    let (s, d) = pair(Provider::Tcp);
    let senders = [s.descriptor().clone()];
    let r = d.expect(&KvExpect::push(&senders, &[0, 1])).unwrap();
    let x = s.push(r.request(), d.descriptor(), &[0, 1]).unwrap();
    x.send_layers(0..2).unwrap();
    x.cancel();
    assert!(matches!(r.wait_timeout(TIMEOUT), Err(Error::Cancelled)));
    assert!(matches!(x.wait_timeout(TIMEOUT), Err(Error::Cancelled)));

    let r = d.expect(&KvExpect::push(&senders, &[2, 3])).unwrap();
    let x = s.push(r.request(), d.descriptor(), &[0, 1]).unwrap();
    x.send_layers(0..1).unwrap();
    let start = Instant::now();
    x.fail("prefill ran out of memory");
    match r.wait_timeout(TIMEOUT) {
        Err(Error::Aborted { reason, .. }) => assert_eq!(reason, "prefill ran out of memory"),
        other => panic!("expected the sender's failure, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(5), "reported at once, not by a timeout");
    assert!(matches!(x.wait_timeout(TIMEOUT), Err(Error::Aborted { .. })));
}

#[test]
fn mismatched_and_corrupt_descriptors_are_rejected() {
    let (s, d) = pair(Provider::Tcp);
    let other =
        KvShape { layers: 4, blocks: 16, block_tokens: 4, heads: 2, total_heads: 2, head_dim: 16, elem_bytes: 2 };
    let odd = KvCache::alloc(&engine(Provider::Tcp, 1), KvLayout::vllm_flash(other), Tp::SINGLE, config()).unwrap();
    let e = d.expect(&KvExpect::push(&[odd.descriptor().clone()], &[0])).unwrap_err();
    assert!(matches!(e, Error::LayoutMismatch { what: "head dim", .. }), "{e}");
    let r = d.expect(&KvExpect::push(&[s.descriptor().clone()], &[0])).unwrap();
    assert!(odd.push(r.request(), d.descriptor(), &[0]).is_err());
    assert!(s.push(r.request(), odd.descriptor(), &[0]).is_err(), "not the descriptor the request names");
    let mut bytes = d.descriptor().to_bytes();
    for i in [0, 5, 40, bytes.len() - 1] {
        let keep = bytes[i];
        bytes[i] ^= 0xA5;
        // Refused, or (a flipped stride, say) another, valid descriptor:
        // never the same one.
        assert!(KvCacheDesc::from_bytes(&bytes).map_or(true, |x| &x != d.descriptor()), "byte {i}");
        bytes[i] = keep;
    }
    assert!(KvCacheDesc::from_bytes(&bytes[..bytes.len() - 3]).is_err());
    assert!(KvRequest::from_bytes(&r.request().to_bytes()[1..]).is_err());
}

// ---- a SIGKILLed sender in another process ----

/// The child: a sender that prints its descriptor, reads the decoder's
/// descriptor and a request from stdin, sends layer 0, and then waits to
/// be killed.
#[test]
fn kv_sender_process() {
    let Ok(provider) = std::env::var("STRAIT_KV_SENDER") else { return };
    let provider = if provider == "shm" { Provider::Shm } else { Provider::Tcp };
    let (s, _) = pair(provider);
    println!("KVDESC {}", s.descriptor());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let decoder: KvCacheDesc = line.trim().parse().unwrap();
    line.clear();
    std::io::stdin().read_line(&mut line).unwrap();
    let request: KvRequest = line.trim().parse().unwrap();
    let x = s.push(&request, &decoder, &[0, 1]).unwrap();
    x.send_layers(0..1).unwrap();
    println!("KVSENT sent");
    std::thread::sleep(Duration::from_secs(60));
}

/// Runs the test `test` of this binary as a child process with `env=value`,
/// its stdin and stdout piped.
fn child_test(
    test: &str,
    env: &str,
    value: &str,
) -> (std::process::Child, std::io::BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env, value)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// What follows `tag` on the child's next line that has it (the harness
/// may print "test ... " first on the same line).
fn read_tagged(out: &mut impl std::io::BufRead, tag: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        out.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the sender process exited early");
        if let Some(at) = line.find(tag) {
            return line[at + tag.len()..].trim().to_string();
        }
    }
}

fn killed_sender(provider: Provider, name: &str) {
    use std::io::Write;
    let (mut child, mut out) = child_test("kv_sender_process", "STRAIT_KV_SENDER", name);
    let sender: KvCacheDesc = read_tagged(&mut out, "KVDESC ").parse().unwrap();
    // The bound on a dead sender is the heartbeat plus the engine's request
    // timeout (the ping's); 2 s here.
    let (healthy, _) = pair(provider);
    let shape = *healthy.layout();
    let quick = TransferEngine::builder()
        .provider(provider)
        .interface("lo")
        .request_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let d = KvCache::alloc(&quick, shape, Tp::SINGLE, config()).unwrap();
    let r = d.expect(&KvExpect::push(&[sender], &[0, 1])).unwrap();
    let other = d.expect(&KvExpect::push(&[healthy.descriptor().clone()], &[2, 3])).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{}", d.descriptor()).unwrap();
    writeln!(stdin, "{}", r.request()).unwrap();
    read_tagged(&mut out, "KVSENT ");
    let start = Instant::now();
    while !r.layer_landed(0) {
        assert!(start.elapsed() < TIMEOUT);
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    let outcome = r.wait_timeout(TIMEOUT);
    let took = killed.elapsed();
    assert!(matches!(outcome, Err(Error::PeerUnreachable(_))), "{outcome:?}");
    assert!(took < Duration::from_secs(5), "the decoder learned of the death in {took:?}");
    eprintln!("{name}: a killed sender failed its request in {took:?}");
    // The other request, from a live sender, is unaffected.
    let x = healthy.push(other.request(), d.descriptor(), &[0, 1]).unwrap();
    x.send_all().unwrap();
    other.wait_timeout(TIMEOUT).unwrap();
}

#[test]
fn killed_sender_fails_its_request_only_tcp() {
    killed_sender(Provider::Tcp, "tcp");
}

#[test]
fn killed_sender_fails_its_request_only_shm() {
    killed_sender(Provider::Shm, "shm");
}

// ---- two processes, byte-exact ----

const TWO_PROCESS_BLOCKS: [u32; 3] = [7, 2, 10];

/// The child: two NHD sender ranks (TP 2, 8 tokens per block) in one
/// process. Prints their descriptors, reads the decoder's descriptor and a
/// request from stdin, pushes every layer in a shuffled order, and exits
/// once its sends have completed.
#[test]
fn kv_tp_senders_process() {
    let Ok(provider) = std::env::var("STRAIT_KV_TP_SENDERS") else { return };
    let provider = if provider == "shm" { Provider::Shm } else { Provider::Tcp };
    let senders = side(provider, 2, 3, 12, 8, NHD, 4);
    let tokens = 8 * TWO_PROCESS_BLOCKS.len() as u64 - 3;
    for c in &senders.caches {
        fill(c, &TWO_PROCESS_BLOCKS, tokens);
        println!("KVDESC {}", c.descriptor());
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let decoder: KvCacheDesc = line.trim().parse().unwrap();
    line.clear();
    std::io::stdin().read_line(&mut line).unwrap();
    let request: KvRequest = line.trim().parse().unwrap();
    let sends: Vec<KvSend> =
        senders.caches.iter().map(|c| c.push(&request, &decoder, &TWO_PROCESS_BLOCKS).unwrap()).collect();
    for l in shuffled(3, 11) {
        for s in &sends {
            s.send_layers(l..l + 1).unwrap();
        }
    }
    for s in &sends {
        s.wait_timeout(TIMEOUT).unwrap();
    }
    println!("KVSENT done");
}

/// Prefill TP 2 (NHD, 8-token blocks) in a child process to a decode rank
/// (HND, 4-token blocks) here: every byte checked against the reference.
fn two_processes(provider: Provider, name: &str) {
    use std::io::Write;
    let (mut child, mut out) = child_test("kv_tp_senders_process", "STRAIT_KV_TP_SENDERS", name);
    let senders: Vec<KvCacheDesc> = (0..2).map(|_| read_tagged(&mut out, "KVDESC ").parse().unwrap()).collect();
    let decoder = side(provider, 1, 3, 12, 4, HND, 4);
    let d = &decoder.caches[0];
    let tokens = 8 * TWO_PROCESS_BLOCKS.len() as u64 - 3;
    let dst_blocks: Vec<u32> = (0..tokens.div_ceil(4) as u32).map(|i| 11 - i).collect();
    let r = d.expect(&KvExpect::push(&senders, &dst_blocks).tokens(tokens).timeout(TIMEOUT)).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{}", d.descriptor()).unwrap();
    writeln!(stdin, "{}", r.request()).unwrap();
    r.wait_timeout(TIMEOUT).unwrap();
    check(d, &dst_blocks, tokens);
    let status = child.wait().unwrap();
    assert!(status.success(), "the sender process: {status}");
}

#[test]
fn two_processes_byte_exact_tcp() {
    two_processes(Provider::Tcp, "tcp");
}

#[test]
fn two_processes_byte_exact_shm() {
    two_processes(Provider::Shm, "shm");
}
