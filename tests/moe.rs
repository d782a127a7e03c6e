//! MoE dispatch and combine between R ranks (one engine each, a thread
//! each; and ranks in separate processes), over libfabric tcp and shm,
//! checked against a CPU reference computed here: per-expert counts equal
//! the global bincount, every (token, expert) pair with a valid index
//! appears exactly once at its expert with its source and bytes, combine of
//! 2x with weights summing to 1 gives 2x, reruns are bit-identical.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{engine, LineChild};
use strait::moe::{bf16_to_f32, f32_to_bf16, Dispatched, MoeConfig, MoeDtype, MoeGroup, MoeRank, MoeRankDesc};
use strait::{Error, Provider, TransferEngine};

/// One rank's input: tokens `[t, hidden]` (as bytes), top-k experts and
/// weights.
#[derive(Clone)]
struct Input {
    x: Vec<u8>,
    idx: Vec<i32>,
    w: Vec<f32>,
}

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

/// Random routing: `tokens` tokens, each with `top_k` distinct experts
/// (some -1 when `holes`), weights summing to 1, values small integers
/// (exact in bf16).
fn input(c: &MoeConfig, tokens: usize, seed: u64, holes: bool) -> Input {
    let mut r = rng(seed);
    let k = c.top_k as usize;
    let mut idx = Vec::with_capacity(tokens * k);
    let mut w = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut chosen: Vec<i32> = Vec::new();
        while chosen.len() < k {
            let e = (r() % u64::from(c.experts)) as i32;
            let e = if holes && r().is_multiple_of(5) { -1 } else { e };
            if e == -1 || !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        let valid = chosen.iter().filter(|&&e| e >= 0).count().max(1) as f32;
        w.extend(chosen.iter().map(|&e| if e >= 0 { 1.0 / valid } else { 0.0 }));
        idx.extend(chosen);
    }
    let x = values(c, tokens, &mut r);
    Input { x, idx, w }
}

fn values(c: &MoeConfig, tokens: usize, r: &mut impl FnMut() -> u64) -> Vec<u8> {
    let n = tokens * c.hidden as usize;
    match c.dtype {
        MoeDtype::F32 => (0..n).flat_map(|_| ((r() % 512) as f32 - 256.0).to_le_bytes()).collect(),
        MoeDtype::Bf16 => (0..n).flat_map(|_| f32_to_bf16((r() % 64) as f32 - 32.0).to_le_bytes()).collect(),
    }
}

fn group(provider: Provider, c: MoeConfig) -> Vec<MoeGroup> {
    let ranks: Vec<MoeRank> = (0..c.ranks).map(|r| MoeRank::new(&engine(provider, 1), c, r).unwrap()).collect();
    let descs: Vec<MoeRankDesc> =
        ranks.iter().map(|r| MoeRankDesc::from_bytes(&r.descriptor().to_bytes()).unwrap()).collect();
    ranks.into_iter().map(|r| r.connect(&descs).unwrap()).collect()
}

/// Doubles every element (the "expert").
fn twice(c: &MoeConfig, bytes: &[u8]) -> Vec<u8> {
    match c.dtype {
        MoeDtype::F32 => bytes
            .chunks_exact(4)
            .flat_map(|b| (2.0 * f32::from_le_bytes(b.try_into().unwrap())).to_le_bytes())
            .collect(),
        MoeDtype::Bf16 => bytes
            .chunks_exact(2)
            .flat_map(|b| f32_to_bf16(2.0 * bf16_to_f32(u16::from_le_bytes(b.try_into().unwrap()))).to_le_bytes())
            .collect(),
    }
}

/// Every rank dispatches its input, doubles what it got, and combines.
fn round_trip(groups: &mut [MoeGroup], inputs: &[Input]) -> Vec<(Dispatched, Vec<u8>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter_mut()
            .zip(inputs)
            .map(|(g, inp)| {
                s.spawn(move || {
                    let c = *g.config();
                    let d = g.dispatch(&inp.x, &inp.idx, &inp.w).unwrap_or_else(|e| panic!("rank {}: {e}", g.rank()));
                    let y = g
                        .combine(&twice(&c, &d.expert_x), &d.handle)
                        .unwrap_or_else(|e| panic!("rank {}: {e}", g.rank()));
                    (d, y)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn check(c: &MoeConfig, inputs: &[Input], out: &[(Dispatched, Vec<u8>)]) {
    let (k, tb) = (c.top_k as usize, c.token_bytes as usize);
    let le = c.experts / c.ranks;
    // Counts: the global bincount.
    let mut bincount = vec![0u32; c.experts as usize];
    for inp in inputs {
        for &e in inp.idx.iter().filter(|&&e| e >= 0) {
            bincount[e as usize] += 1;
        }
    }
    let mut seen = vec![Vec::new(); inputs.len()];
    for (s, inp) in inputs.iter().enumerate() {
        seen[s] = vec![false; inp.idx.len()];
    }
    for (d, (disp, _)) in out.iter().enumerate() {
        assert_eq!(disp.counts, bincount[d * le as usize..(d + 1) * le as usize], "rank {d}'s counts");
        let width = disp.capacity as usize;
        assert_eq!(width, disp.counts.iter().copied().max().unwrap_or(0) as usize);
        for i in 0..le as usize {
            let mut last = None;
            for j in 0..disp.counts[i] as usize {
                let (s, t, kk) = disp.handle.source(i as u32, j as u32).unwrap();
                let (s, t, kk) = (s as usize, t as usize, kk as usize);
                let e = d * le as usize + i;
                assert_eq!(inputs[s].idx[t * k + kk], e as i32, "rank {d} expert {i} row {j}: routed elsewhere");
                assert!(!seen[s][t * k + kk], "({s}, {t}, {kk}) twice");
                seen[s][t * k + kk] = true;
                let row = &disp.expert_x[(i * width + j) * tb..(i * width + j + 1) * tb];
                assert_eq!(row, &inputs[s].x[t * tb..(t + 1) * tb], "rank {d} expert {i} row {j}: bytes");
                // Sources in rank order, each in (token, k) order.
                assert!(last < Some((s, t, kk)), "rank {d} expert {i}: out of order");
                last = Some((s, t, kk));
            }
        }
    }
    for (s, inp) in inputs.iter().enumerate() {
        for (i, &e) in inp.idx.iter().enumerate() {
            assert_eq!(seen[s][i], e >= 0, "rank {s} pair {i} (expert {e}) delivered {} times", u8::from(seen[s][i]));
        }
    }
    // Combine of 2x with weights summing to 1 is 2x (0 for a token with no
    // expert).
    for (s, inp) in inputs.iter().enumerate() {
        let y = &out[s].1;
        let tokens = inp.idx.len() / k;
        assert_eq!(y.len(), tokens * c.row_bytes() as usize);
        for t in 0..tokens {
            let any = inp.idx[t * k..(t + 1) * k].iter().any(|&e| e >= 0);
            for h in 0..c.hidden as usize {
                let (got, x) = match c.dtype {
                    MoeDtype::F32 => {
                        let at = (t * c.hidden as usize + h) * 4;
                        (
                            f32::from_le_bytes(y[at..at + 4].try_into().unwrap()),
                            f32::from_le_bytes(inp.x[at..at + 4].try_into().unwrap()),
                        )
                    }
                    MoeDtype::Bf16 => {
                        let at = (t * c.hidden as usize + h) * 2;
                        (
                            bf16_to_f32(u16::from_le_bytes(y[at..at + 2].try_into().unwrap())),
                            bf16_to_f32(u16::from_le_bytes(inp.x[at..at + 2].try_into().unwrap())),
                        )
                    }
                };
                let want = if any { 2.0 * x } else { 0.0 };
                let tol = match c.dtype {
                    MoeDtype::F32 => 1e-4 * want.abs().max(1.0),
                    MoeDtype::Bf16 => 1e-2 * want.abs().max(1.0),
                };
                assert!((got - want).abs() <= tol, "rank {s} token {t} elem {h}: {got} vs {want}");
            }
        }
    }
}

fn run(provider: Provider, c: MoeConfig, tokens: &[usize], seed: u64, holes: bool) {
    let inputs: Vec<Input> = tokens.iter().enumerate().map(|(r, &t)| input(&c, t, seed + r as u64, holes)).collect();
    let mut groups = group(provider, c);
    let first = round_trip(&mut groups, &inputs);
    check(&c, &inputs, &first);
    // A rerun on the same group is bit-identical.
    let again = round_trip(&mut groups, &inputs);
    for (a, b) in first.iter().zip(&again) {
        assert!(a.0.expert_x == b.0.expert_x && a.1 == b.1, "rerun differs");
    }
}

fn config(ranks: u32, experts: u32, top_k: u32, hidden: u32, dtype: MoeDtype) -> MoeConfig {
    MoeConfig { timeout: Duration::from_secs(20), ..MoeConfig::new(ranks, experts, top_k, 64, hidden, dtype) }
}

#[test]
fn random_routing_over_tcp() {
    run(Provider::Tcp, config(4, 16, 4, 32, MoeDtype::F32), &[40, 64, 17, 33], 1, false);
    run(Provider::Tcp, config(2, 8, 2, 24, MoeDtype::Bf16), &[64, 50], 2, true);
}

#[test]
fn random_routing_over_shm() {
    run(Provider::Shm, config(4, 8, 2, 16, MoeDtype::Bf16), &[30, 0, 64, 5], 3, true);
}

#[test]
fn edge_cases() {
    // No tokens anywhere, and on some ranks.
    run(Provider::Tcp, config(2, 4, 2, 8, MoeDtype::F32), &[0, 0], 4, false);
    run(Provider::Tcp, config(3, 6, 2, 8, MoeDtype::F32), &[0, 12, 0], 5, false);
    // k = 1, E = R.
    run(Provider::Tcp, config(3, 3, 1, 8, MoeDtype::F32), &[9, 1, 20], 6, false);
    // Every token to one expert: rank 1's pool (capacity 2 * 64 * 2)
    // overflows, so it takes its copies in rounds.
    let c = config(3, 6, 2, 8, MoeDtype::F32);
    let mut inputs: Vec<Input> =
        [64, 64, 64].iter().enumerate().map(|(r, &t)| input(&c, t, 7 + r as u64, false)).collect();
    for inp in &mut inputs {
        for (i, e) in inp.idx.iter_mut().enumerate() {
            *e = if i % 2 == 0 { 2 } else { -1 };
        }
        for (i, w) in inp.w.iter_mut().enumerate() {
            *w = if i % 2 == 0 { 1.0 } else { 0.0 };
        }
    }
    let mut groups = group(Provider::Tcp, c);
    let out = round_trip(&mut groups, &inputs);
    check(&c, &inputs, &out);
}

#[test]
fn small_pools_take_copies_in_rounds() {
    let c = MoeConfig { capacity: Some(7), ..config(4, 8, 3, 16, MoeDtype::F32) };
    run(Provider::Tcp, c, &[20, 33, 1, 50], 8, true);
    run(Provider::Shm, MoeConfig { capacity: Some(1), ..c }, &[5, 3, 0, 9], 9, false);
}

#[test]
fn bad_arguments_and_descriptors_are_refused() {
    let c = config(2, 4, 2, 8, MoeDtype::F32);
    let mut groups = group(Provider::Tcp, c);
    let g = &mut groups[0];
    assert!(matches!(g.dispatch(&[0u8; 33], &[0; 2], &[1.0; 2]), Err(Error::InvalidRequest(_))));
    assert!(matches!(g.dispatch(&[0u8; 32], &[0; 3], &[1.0; 3]), Err(Error::InvalidRequest(_))));
    assert!(matches!(g.dispatch(&[0u8; 32], &[4, 0], &[1.0; 2]), Err(Error::InvalidRequest(_))));
    let too_many = vec![0u8; 65 * 32];
    assert!(matches!(g.dispatch(&too_many, &[0; 130], &[1.0; 130]), Err(Error::InvalidRequest(_))));
    // Descriptors: corrupt, for another configuration, in the wrong place.
    let r0 = MoeRank::new(&engine(Provider::Tcp, 1), c, 0).unwrap();
    let r1 = MoeRank::new(&engine(Provider::Tcp, 1), c, 1).unwrap();
    let bytes = r0.descriptor().to_bytes();
    assert_eq!(MoeRankDesc::from_bytes(&bytes).unwrap(), *r0.descriptor());
    assert_eq!(r0.descriptor().to_string().parse::<MoeRankDesc>().unwrap(), *r0.descriptor());
    for cut in 0..bytes.len() {
        assert!(MoeRankDesc::from_bytes(&bytes[..cut]).is_err(), "truncated to {cut}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(MoeRankDesc::from_bytes(&longer).is_err());
    // Any byte changed: refused, or decoded into something that encodes
    // back to the same bytes (never a panic).
    let mut next = rng(5);
    for _ in 0..2000 {
        let mut b = bytes.clone();
        let i = (next() % b.len() as u64) as usize;
        b[i] ^= 1 << (next() % 8);
        if let Ok(d) = MoeRankDesc::from_bytes(&b) {
            assert_eq!(d.to_bytes(), b);
        }
    }
    let other = MoeRank::new(&engine(Provider::Tcp, 1), MoeConfig { top_k: 1, ..c }, 1).unwrap();
    let (d0, d1) = (r0.descriptor().clone(), r1.descriptor().clone());
    assert!(r0.connect(&[d0.clone(), other.descriptor().clone()]).is_err());
    assert!(r1.connect(&[d1.clone(), d0]).is_err());
}

/// A rank that never shows up (alive, silent): the others fail within the
/// timeout, naming it; the group then refuses further calls.
#[test]
fn a_silent_rank_fails_the_call_naming_it_and_the_survivors_regroup() {
    let c = MoeConfig { timeout: Duration::from_millis(1500), ..config(3, 6, 2, 8, MoeDtype::F32) };
    let engines: Vec<TransferEngine> = (0..3).map(|_| engine(Provider::Tcp, 1)).collect();
    let connect = |c: MoeConfig, engines: &[TransferEngine]| -> Vec<MoeGroup> {
        let ranks: Vec<MoeRank> =
            engines.iter().enumerate().map(|(r, e)| MoeRank::new(e, c, r as u32).unwrap()).collect();
        let descs: Vec<MoeRankDesc> =
            ranks.iter().map(|r| MoeRankDesc::from_bytes(&r.descriptor().to_bytes()).unwrap()).collect();
        ranks.into_iter().map(|r| r.connect(&descs).unwrap()).collect()
    };
    let mut groups = connect(c, &engines);
    let _silent = groups.pop().unwrap();
    let start = Instant::now();
    let errors: Vec<Error> = std::thread::scope(|s| {
        let hs: Vec<_> = groups
            .iter_mut()
            .map(|g| {
                s.spawn(move || {
                    let inp = input(g.config(), 10, 11, false);
                    g.dispatch(&inp.x, &inp.idx, &inp.w).unwrap_err()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let took = start.elapsed();
    for e in &errors {
        assert!(matches!(e, Error::PeerUnreachable(m) if m.contains("rank 2")), "{e}");
    }
    assert!(took < Duration::from_secs(5), "failed after {took:?}");
    let inp = input(&c, 1, 1, false);
    assert!(
        matches!(groups[0].dispatch(&inp.x, &inp.idx, &inp.w), Err(Error::InvalidRequest(m)) if m.contains("build a new one"))
    );
    // The survivors build a group of two on the same engines (the silent
    // rank's experts spread over them) and go on, exact.
    drop(groups);
    let c2 = config(2, 6, 2, 8, MoeDtype::F32);
    let mut survivors = connect(c2, &engines[..2]);
    let inputs: Vec<Input> = (0..2).map(|r| input(&c2, 10, 20 + r, true)).collect();
    let out = round_trip(&mut survivors, &inputs);
    check(&c2, &inputs, &out);
}

// ---- ranks in separate processes, and a SIGKILLed one ----

/// The child: rank `STRAIT_MOE_RANK` of a group; prints its descriptor,
/// reads every rank's from stdin, runs `STRAIT_MOE_CALLS` round trips (its
/// outputs checked against the reference, and their digest printed, after
/// each; a line on stdin before each call after the first), then waits for
/// stdin to close.
#[test]
fn moe_rank_process() {
    let Ok(rank) = std::env::var("STRAIT_MOE_RANK") else { return };
    let rank: u32 = rank.parse().unwrap();
    let provider =
        if std::env::var("STRAIT_MOE_PROVIDER").as_deref() == Ok("shm") { Provider::Shm } else { Provider::Tcp };
    let ranks: u32 = std::env::var("STRAIT_MOE_RANKS").unwrap().parse().unwrap();
    let calls: u32 = std::env::var("STRAIT_MOE_CALLS").unwrap().parse().unwrap();
    let c = MoeConfig { timeout: Duration::from_secs(3), ..config(ranks, 2 * ranks, 2, 16, MoeDtype::F32) };
    let me = MoeRank::new(&engine(provider, 1), c, rank).unwrap();
    println!("MOEDESC {}", me.descriptor());
    let mut descs = Vec::new();
    let mut line = String::new();
    for _ in 0..ranks {
        line.clear();
        std::io::stdin().read_line(&mut line).unwrap();
        descs.push(line.trim().parse::<MoeRankDesc>().unwrap());
    }
    let mut g = me.connect(&descs).unwrap();
    let inputs: Vec<Input> = (0..ranks).map(|r| input(&c, 8 + 5 * r as usize, 40 + u64::from(r), true)).collect();
    for call in 0..calls {
        if call > 0 {
            // The parent says when (after killing a rank, in one test).
            line.clear();
            std::io::stdin().read_line(&mut line).unwrap();
        }
        let inp = &inputs[rank as usize];
        match g.dispatch(&inp.x, &inp.idx, &inp.w).and_then(|d| {
            let y = g.combine(&twice(&c, &d.expert_x), &d.handle)?;
            Ok((d, y))
        }) {
            Ok((d, y)) => {
                let digest =
                    d.expert_x.iter().chain(&y).fold(0u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
                check_one(&c, &inputs, rank as usize, &d, &y);
                println!("MOECALL {call} ok {digest:x}");
            }
            Err(e) => println!("MOECALL {call} err {e}"),
        }
    }
    line.clear();
    let _ = std::io::stdin().read_line(&mut line);
}

/// `check` for one rank's outputs, knowing every rank's inputs.
fn check_one(c: &MoeConfig, inputs: &[Input], rank: usize, d: &Dispatched, y: &[u8]) {
    let (k, tb) = (c.top_k as usize, c.token_bytes as usize);
    let le = (c.experts / c.ranks) as usize;
    for i in 0..le {
        let e = (rank * le + i) as i32;
        let want: usize = inputs.iter().map(|inp| inp.idx.iter().filter(|&&x| x == e).count()).sum();
        assert_eq!(d.counts[i] as usize, want);
        for j in 0..d.counts[i] as usize {
            let (s, t, kk) = d.handle.source(i as u32, j as u32).unwrap();
            let (s, t, kk) = (s as usize, t as usize, kk as usize);
            assert_eq!(inputs[s].idx[t * k + kk], e);
            let w = d.capacity as usize;
            assert_eq!(&d.expert_x[(i * w + j) * tb..(i * w + j + 1) * tb], &inputs[s].x[t * tb..(t + 1) * tb]);
        }
    }
    let inp = &inputs[rank];
    for t in 0..inp.idx.len() / k {
        let any = inp.idx[t * k..(t + 1) * k].iter().any(|&e| e >= 0);
        for h in 0..c.hidden as usize {
            let at = (t * c.hidden as usize + h) * 4;
            let got = f32::from_le_bytes(y[at..at + 4].try_into().unwrap());
            let x = f32::from_le_bytes(inp.x[at..at + 4].try_into().unwrap());
            let want = if any { 2.0 * x } else { 0.0 };
            assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "token {t}: {got} vs {want}");
        }
    }
}

fn spawn_group(provider: &str, ranks: u32, calls: u32) -> Vec<LineChild> {
    let mut children: Vec<LineChild> = (0..ranks)
        .map(|r| {
            LineChild::spawn(
                Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", "moe_rank_process", "--nocapture", "--test-threads=1"])
                    .env("STRAIT_MOE_RANK", r.to_string())
                    .env("STRAIT_MOE_RANKS", ranks.to_string())
                    .env("STRAIT_MOE_CALLS", calls.to_string())
                    .env("STRAIT_MOE_PROVIDER", provider),
            )
        })
        .collect();
    let descs: Vec<String> = children.iter_mut().map(|c| c.line("MOEDESC ")).collect();
    for c in &mut children {
        for d in &descs {
            c.say(d);
        }
    }
    children
}

fn processes(provider: &str, ranks: u32) {
    let mut children = spawn_group(provider, ranks, 2);
    let firsts: Vec<String> = children.iter_mut().map(|c| c.line("MOECALL 0 ")).collect();
    for c in &mut children {
        c.say("go");
    }
    for (c, first) in children.iter_mut().zip(firsts) {
        let second = c.line("MOECALL 1 ");
        assert!(first.starts_with("ok "), "{first}");
        assert_eq!(first, second, "a rerun differs");
    }
    for mut c in children {
        drop(c.child.stdin.take());
        assert!(c.child.wait().unwrap().success());
    }
}

#[test]
fn ranks_as_processes_over_tcp() {
    processes("tcp", 2);
    processes("tcp", 4);
    processes("tcp", 8);
}

#[test]
fn ranks_as_processes_over_shm() {
    processes("shm", 4);
    processes("shm", 8);
}

/// Rank 1 of 4 is SIGKILLed after the first call: the others' second call
/// fails within the bound (3 s timeout), naming rank 1.
#[test]
fn a_killed_rank_fails_the_others_naming_it() {
    for provider in ["tcp", "shm"] {
        let mut children = spawn_group(provider, 4, 2);
        for c in &mut children {
            assert!(c.line("MOECALL 0 ").starts_with("ok "));
        }
        // The first call is over everywhere; kill rank 1, then start the
        // second call on the others.
        children[1].child.kill().unwrap();
        children[1].child.wait().unwrap();
        let killed = Instant::now();
        for (r, c) in children.iter_mut().enumerate() {
            if r != 1 {
                c.say("go");
            }
        }
        for (r, c) in children.iter_mut().enumerate() {
            if r == 1 {
                continue;
            }
            let second = c.line("MOECALL 1 ");
            assert!(second.starts_with("err ") && second.contains("rank 1"), "{provider} rank {r}: {second}");
        }
        let took = killed.elapsed();
        assert!(took < Duration::from_secs(8), "{provider}: the others failed after {took:?}");
        eprintln!("{provider}: a killed rank failed the others' call in {took:?}");
        for mut c in children {
            drop(c.child.stdin.take());
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
    }
}
