//! RL weight transfer over the engine (libfabric tcp and shm): sources
//! push steps straight into destinations' tensors, checked byte for byte
//! after every step, for resharding (FSDP dim-0 shards to TP column and
//! row splits), replicated and uneven sources, a chain broadcast, several
//! consecutive steps with changing data, ranks as threads and as
//! processes; a SIGKILLed source fails its destinations' step naming it;
//! mismatched descriptions and stale steps are refused.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::weights::share_bytes;
use common::{engine, LineChild};
use strait::weights::{Mode, PlanConfig, Role, TensorSpec, WeightsConfig, WeightsGroup, WeightsRank, WeightsRankDesc};
use strait::{Error, Provider};

/// Byte `i` of tensor `name` at step `step`.
fn value(name: &str, step: u64, i: u64) -> u8 {
    let h = name
        .bytes()
        .fold(step.wrapping_mul(0x51_7CC1_B727_220A), |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    (h.wrapping_add(i.wrapping_mul(0x9E37_79B9)) >> 11) as u8
}

/// A small model: (name, elem bytes, shape).
fn model() -> Vec<(&'static str, u32, Vec<u64>)> {
    vec![
        ("embed", 2, vec![50, 64]),
        ("layers.0.qkv", 2, vec![96, 64]),
        ("layers.0.o_proj", 2, vec![64, 96]),
        ("layers.0.norm", 4, vec![64]),
        ("layers.0.experts.w1", 1, vec![4, 40, 64]),
        ("lm_head", 2, vec![130, 64]),
        ("step_scale", 4, vec![]),
    ]
}

/// FSDP: every tensor cut along dim 0 over the sources (uneven, as
/// `torch.chunk` cuts); scalars and 1-D tensors replicated.
fn fsdp_sources(n: u32) -> Vec<Vec<TensorSpec>> {
    (0..n)
        .map(|r| {
            model()
                .into_iter()
                .map(|(name, e, shape)| {
                    if shape.len() < 2 {
                        TensorSpec::replicated(name, e, &shape)
                    } else {
                        TensorSpec::chunk(name, e, &shape, 0, r, n)
                    }
                })
                .collect()
        })
        .collect()
}

/// Tensor parallel: column splits (dim 0), row splits (dim 1, strided),
/// the experts along dim 2, norms replicated.
fn tp_dests(n: u32) -> Vec<Vec<TensorSpec>> {
    (0..n)
        .map(|r| {
            model()
                .into_iter()
                .map(|(name, e, shape)| match name {
                    "layers.0.o_proj" | "lm_head" => TensorSpec::chunk(name, e, &shape, 1, r, n),
                    "layers.0.experts.w1" => TensorSpec::chunk(name, e, &shape, 2, r, n),
                    _ if shape.len() < 2 => TensorSpec::replicated(name, e, &shape),
                    _ => TensorSpec::chunk(name, e, &shape, 0, r, n),
                })
                .collect()
        })
        .collect()
}

fn replicated(n: u32) -> Vec<Vec<TensorSpec>> {
    (0..n)
        .map(|_| model().into_iter().map(|(name, e, shape)| TensorSpec::replicated(name, e, &shape)).collect())
        .collect()
}

fn config(mode: Mode) -> WeightsConfig {
    WeightsConfig { plan: PlanConfig { chunk: 4096 }, mode, timeout: Duration::from_secs(5), watermark: 64 << 10 }
}

/// Fills a source's shares with step `step`'s bytes.
fn fill(rank: &WeightsRank, step: u64) {
    for (i, t) in rank.tensors().iter().enumerate() {
        let (region, offset, _) = rank.tensor(i).unwrap();
        region.write_at(offset, &share_bytes(&t.spec, |b| value(&t.spec.name, step, b))).unwrap();
    }
}

/// Checks a destination's shares hold step `step`'s bytes.
fn check(rank: &WeightsRank, step: u64) {
    for (i, t) in rank.tensors().iter().enumerate() {
        let (region, offset, len) = rank.tensor(i).unwrap();
        let got = region.to_vec(offset, len).unwrap();
        assert!(
            got == share_bytes(&t.spec, |b| value(&t.spec.name, step, b)),
            "destination tensor {} at step {step}",
            t.spec.name
        );
    }
}

/// Builds the group (one engine per rank, threads), runs `steps` steps,
/// checking every destination after each.
fn run(provider: Provider, sources: Vec<Vec<TensorSpec>>, dests: Vec<Vec<TensorSpec>>, mode: Mode, steps: u64) {
    let c = config(mode);
    let mut ranks = Vec::new();
    for (role, specs) in [(Role::Source, &sources), (Role::Destination, &dests)] {
        for (r, s) in specs.iter().enumerate() {
            ranks.push(WeightsRank::alloc(&engine(provider, 1 + r % 2), c, role, r as u32, s.clone()).unwrap());
        }
    }
    let descs: Vec<WeightsRankDesc> =
        ranks.iter().map(|r| WeightsRankDesc::from_bytes(&r.descriptor().to_bytes()).unwrap()).collect();
    let mut groups: Vec<WeightsGroup> = ranks.into_iter().map(|r| r.connect(&descs).unwrap()).collect();
    for step in 1..=steps {
        for g in groups.iter().filter(|g| g.role() == Role::Source) {
            fill(g.local(), step);
        }
        std::thread::scope(|s| {
            for g in groups.iter_mut() {
                s.spawn(move || match g.role() {
                    Role::Source => g.push(step).unwrap(),
                    Role::Destination => g.wait(step).unwrap(),
                });
            }
        });
        for g in groups.iter().filter(|g| g.role() == Role::Destination) {
            check(g.local(), step);
        }
    }
    // A step not newer than the last is refused on both sides.
    for g in &mut groups {
        let r = if g.role() == Role::Source { g.push(steps) } else { g.wait(steps) };
        assert!(matches!(r, Err(Error::InvalidRequest(m)) if m.contains("not newer")));
    }
}

#[test]
fn four_fsdp_sources_to_four_tp_destinations() {
    for provider in common::PROVIDERS {
        run(provider, fsdp_sources(4), tp_dests(4), Mode::Direct, 3);
    }
}

#[test]
fn uneven_and_replicated_sources() {
    // 3 sources (uneven dim-0 cuts) to 2 destinations; 3 replicated
    // sources to 3 destinations (the plan spreads the bytes over them).
    run(Provider::Tcp, fsdp_sources(3), tp_dests(2), Mode::Direct, 2);
    run(Provider::Tcp, replicated(3), tp_dests(3), Mode::Direct, 2);
    run(Provider::Shm, replicated(2), replicated(2), Mode::Direct, 2);
}

#[test]
fn one_source_broadcasts_to_four_destinations_through_a_chain() {
    for provider in common::PROVIDERS {
        run(provider, replicated(1), tp_dests(1).into_iter().cycle().take(4).collect(), Mode::Broadcast, 3);
    }
    run(Provider::Tcp, replicated(2), replicated(3), Mode::Broadcast, 2);
}

#[test]
fn mismatched_descriptions_are_refused_at_connect() {
    let c = config(Mode::Direct);
    let e = engine(Provider::Tcp, 1);
    let src = WeightsRank::alloc(&e, c, Role::Source, 0, vec![TensorSpec::replicated("w", 2, &[8, 8])]).unwrap();
    let dst = WeightsRank::alloc(&e, c, Role::Destination, 0, vec![TensorSpec::replicated("w", 2, &[8, 4])]).unwrap();
    let descs = vec![src.descriptor().clone(), dst.descriptor().clone()];
    let err = dst.connect(&descs).unwrap_err();
    assert!(matches!(&err, Error::WeightsPlan(_)), "{err}");
    assert!(err.to_string().contains("shape"), "{err}");
    // A list without this rank, or with a rank twice.
    let err = src.connect(&descs[1..]).unwrap_err();
    assert!(matches!(err, Error::InvalidRequest(_)), "{err}");
}

// ---- ranks in separate processes, and a SIGKILLed source ----

/// The child: rank `STRAIT_W_RANK` of `STRAIT_W_ROLE`; prints its
/// descriptor, reads every rank's from stdin, then runs a step per `go`
/// line (a source fills and pushes; a destination waits and checks),
/// printing `WSTEP n ok` or `WSTEP n err ...`.
#[test]
fn weights_rank_process() {
    let Ok(rank) = std::env::var("STRAIT_W_RANK") else { return };
    let rank: u32 = rank.parse().unwrap();
    let role = if std::env::var("STRAIT_W_ROLE").unwrap() == "source" { Role::Source } else { Role::Destination };
    let provider =
        if std::env::var("STRAIT_W_PROVIDER").as_deref() == Ok("shm") { Provider::Shm } else { Provider::Tcp };
    let (s, d): (u32, u32) = (2, 2);
    let specs = if role == Role::Source { fsdp_sources(s) } else { tp_dests(d) };
    let c = WeightsConfig { timeout: Duration::from_secs(3), ..config(Mode::Direct) };
    let me = WeightsRank::alloc(&engine(provider, 2), c, role, rank, specs[rank as usize].clone()).unwrap();
    println!("WDESC {}", me.descriptor());
    let mut line = String::new();
    let mut descs = Vec::new();
    for _ in 0..s + d {
        line.clear();
        std::io::stdin().read_line(&mut line).unwrap();
        descs.push(line.trim().parse::<WeightsRankDesc>().unwrap());
    }
    let mut g = me.connect(&descs).unwrap();
    for step in 1.. {
        line.clear();
        if std::io::stdin().read_line(&mut line).unwrap() == 0 {
            return;
        }
        let r = match role {
            Role::Source => {
                fill(g.local(), step);
                g.push(step)
            }
            Role::Destination => g.wait(step).map(|()| check(g.local(), step)),
        };
        match r {
            Ok(()) => println!("WSTEP {step} ok"),
            Err(e) => println!("WSTEP {step} err {e}"),
        }
    }
}

/// Sources 0 and 1, then destinations 0 and 1.
fn spawn(provider: &str) -> Vec<LineChild> {
    let mut children: Vec<LineChild> = ["source", "source", "destination", "destination"]
        .iter()
        .enumerate()
        .map(|(i, role)| {
            LineChild::spawn(
                Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", "weights_rank_process", "--nocapture", "--test-threads=1"])
                    .env("STRAIT_W_RANK", (i % 2).to_string())
                    .env("STRAIT_W_ROLE", role)
                    .env("STRAIT_W_PROVIDER", provider),
            )
        })
        .collect();
    let descs: Vec<String> = children.iter_mut().map(|c| c.line("WDESC ")).collect();
    for c in &mut children {
        for d in &descs {
            c.say(d);
        }
    }
    children
}

#[test]
fn ranks_as_processes_over_tcp_and_shm() {
    for provider in ["tcp", "shm"] {
        let mut children = spawn(provider);
        for step in 1..=3 {
            for c in &mut children {
                c.say("go");
            }
            for (i, c) in children.iter_mut().enumerate() {
                let got = c.line(&format!("WSTEP {step} "));
                assert_eq!(got, "ok", "{provider}: rank process {i}, step {step}");
            }
        }
    }
}

#[test]
fn a_killed_source_fails_its_destinations_step_naming_it() {
    for provider in ["tcp", "shm"] {
        let mut children = spawn(provider);
        for c in &mut children {
            c.say("go");
        }
        for c in &mut children {
            assert_eq!(c.line("WSTEP 1 "), "ok");
        }
        children[1].child.kill().unwrap();
        children[1].child.wait().unwrap();
        let killed = Instant::now();
        for (i, c) in children.iter_mut().enumerate() {
            if i != 1 {
                c.say("go");
            }
        }
        assert_eq!(children[0].line("WSTEP 2 "), "ok", "{provider}: the live source's push");
        for c in &mut children[2..] {
            let got = c.line("WSTEP 2 ");
            assert!(got.starts_with("err ") && got.contains("source rank 1"), "{provider}: {got}");
            eprintln!("{provider}: {got}");
        }
        let took = killed.elapsed();
        assert!(took < Duration::from_secs(8), "{provider}: failed after {took:?}");
        eprintln!("{provider}: a killed source failed its destinations' step in {took:?}");
    }
}
