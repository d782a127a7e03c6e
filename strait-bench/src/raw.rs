//! The `--baseline raw` driver: plain libfabric endpoints ([`RawGroup`])
//! driven on this thread, with the same request semantics as the engine
//! (a request's immediate goes on its last piece, posted only after every
//! other piece has completed) but none of its machinery.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use strait::baseline::{RawEvent, RawGroup, RawPeer, RawRegion};
use strait::{Access, EngineAddress, MrDesc, Provider};

/// Receive buffers posted per endpoint for send/recv ping-pong.
const RECEIVES: u64 = 16;
/// Size of each receive buffer.
pub const RECEIVE_LEN: u64 = 64 << 10;
/// How long to keep polling after the last event before sleeping, as the
/// engine's adaptive mode.
const SPIN: Duration = Duration::from_micros(50);
/// Sleeps between progress calls when idle start at `NAP_MIN` and double
/// up to `NAP`, as the engine's worker does without wait descriptors.
const NAP: Duration = Duration::from_micros(200);
const NAP_MIN: Duration = Duration::from_micros(20);
/// Tokens of receive buffers have this bit set.
const RECV_TOKEN: u64 = 1 << 63;

/// One piece of a raw request: endpoint and byte ranges.
#[derive(Clone, Copy, Debug)]
pub struct Piece {
    pub nic: usize,
    pub src_offset: u64,
    pub dst_offset: u64,
    pub len: u64,
}

/// Writes or reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Write,
    Read,
}

/// A raw endpoint group with one buffer and one peer.
pub struct RawEnd {
    group: RawGroup,
    region: RawRegion,
    receives: RawRegion,
    peer: Option<RawPeer>,
    remote: Option<MrDesc>,
    events: Vec<RawEvent>,
    /// Immediates seen and not yet consumed, per value.
    pub tally: HashMap<u32, u64>,
    /// Messages received and not yet consumed.
    received: u64,
    /// Next idle sleep (see `NAP_MIN`).
    nap: Duration,
    /// When the endpoints last had something to do; after `SPIN` without,
    /// every idle turn sleeps (no spinning between naps).
    active_at: Instant,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    active: bool,
    outstanding: usize,
    last_posted: bool,
}

impl RawEnd {
    pub fn open(provider: Provider, interface: Option<&str>, nics: usize, region_len: u64) -> Result<Self, String> {
        let mut group =
            RawGroup::open(provider, interface, nics, RECEIVES as usize, true).map_err(|e| e.to_string())?;
        let region = group.alloc(region_len, Access::REMOTE_READ_WRITE).map_err(|e| e.to_string())?;
        let receives = group.alloc(RECEIVES * RECEIVE_LEN * nics as u64, Access::LOCAL).map_err(|e| e.to_string())?;
        for nic in 0..nics {
            for i in 0..RECEIVES {
                let offset = (nic as u64 * RECEIVES + i) * RECEIVE_LEN;
                let token = RECV_TOKEN | offset;
                if !group.post_recv(nic, receives, offset, RECEIVE_LEN, token).map_err(|e| e.to_string())? {
                    return Err("raw endpoint has fewer receive slots than needed".into());
                }
            }
        }
        Ok(RawEnd {
            group,
            region,
            receives,
            peer: None,
            remote: None,
            events: Vec::with_capacity(256),
            tally: HashMap::new(),
            received: 0,
            nap: NAP_MIN,
            active_at: Instant::now(),
        })
    }

    pub fn address(&self) -> &EngineAddress {
        self.group.address()
    }

    pub fn descriptor(&self) -> &MrDesc {
        self.group.descriptor(self.region)
    }

    pub fn nic_count(&self) -> usize {
        self.group.nic_count()
    }

    /// Connects to the peer's raw endpoints and buffer.
    pub fn connect(&mut self, address: &EngineAddress, remote: MrDesc) -> Result<(), String> {
        self.peer = Some(self.group.connect(address).map_err(|e| e.to_string())?);
        self.remote = Some(remote);
        Ok(())
    }

    fn peer(&self) -> Result<(RawPeer, MrDesc), String> {
        match (self.peer, &self.remote) {
            (Some(p), Some(r)) => Ok((p, r.clone())),
            _ => Err("raw endpoints not connected".into()),
        }
    }

    /// Polls once; returns how many events there were. Completions of
    /// operations go to `done` (token, ok); immediates to the tally;
    /// receives are reposted and counted.
    fn progress(&mut self, mut done: impl FnMut(u64) -> Result<(), String>) -> Result<usize, String> {
        let n = self.group.poll(&mut self.events);
        if n > 0 {
            self.nap = NAP_MIN;
            self.active_at = Instant::now();
        }
        // Drain a buffer taken out of self and put it back, so that its
        // capacity is reused: no allocation per poll.
        let mut events = std::mem::take(&mut self.events);
        let result = self.handle_events(&mut events, &mut done);
        events.clear();
        self.events = events;
        result.map(|()| n)
    }

    fn handle_events(
        &mut self,
        events: &mut Vec<RawEvent>,
        done: &mut impl FnMut(u64) -> Result<(), String>,
    ) -> Result<(), String> {
        for e in events.drain(..) {
            match e {
                RawEvent::Done(token) => done(token)?,
                RawEvent::Failed(token, err) if token & RECV_TOKEN == 0 => return Err(format!("raw operation: {err}")),
                RawEvent::Failed(_, err) => return Err(format!("raw receive: {err}")),
                RawEvent::Imm(v) => *self.tally.entry(v).or_default() += 1,
                RawEvent::Received { token, imm, .. } => {
                    let offset = token & !RECV_TOKEN;
                    let nic = (offset / RECEIVE_LEN / RECEIVES) as usize;
                    match imm {
                        Some(v) => *self.tally.entry(v).or_default() += 1,
                        None => self.received += 1,
                    }
                    self.group.post_recv(nic, self.receives, offset, RECEIVE_LEN, token).map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// A turn found nothing to do: keep spinning within `SPIN` of the last
    /// activity, else sleep on the CQ wait descriptors if there are, or for
    /// the current nap, doubling it (as the engine's adaptive worker).
    fn idle(&mut self) {
        if self.active_at.elapsed() < SPIN {
            return;
        }
        self.group.sleep(self.nap);
        self.nap = (self.nap * 2).min(NAP);
    }

    /// Keeps the endpoints progressing (serving a peer's operations): spins,
    /// then sleeps once, returning early when something happened.
    pub fn serve(&mut self) -> Result<(), String> {
        if self.progress(|_| Ok(()))? == 0 {
            self.idle();
        }
        Ok(())
    }

    /// Progresses until `count` immediates `tag` have arrived or `timeout`
    /// passes; consumes them and returns how many there were.
    pub fn wait_tally(&mut self, tag: u32, count: u64, timeout: Duration) -> Result<u64, String> {
        let deadline = Instant::now() + timeout;
        while self.tally.get(&tag).copied().unwrap_or(0) < count && Instant::now() < deadline {
            self.serve()?;
        }
        Ok(self.tally.remove(&tag).unwrap_or(0))
    }

    /// Waits for one immediate `tag` (or one received message when `tag` is
    /// `None`), progressing meanwhile.
    fn wait_one(&mut self, tag: Option<u32>, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = match tag {
                Some(t) => self.tally.get_mut(&t).filter(|c| **c > 0).map(|c| *c -= 1).is_some(),
                None => (self.received > 0).then(|| self.received -= 1).is_some(),
            };
            if got {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("raw: nothing arrived within {timeout:?}"));
            }
            if self.progress(|_| Ok(()))? == 0 {
                self.idle();
            }
        }
    }

    /// Posts one zero-length write with immediate `imm` (or a send of `size`
    /// bytes when `imm` is `None`) through endpoint 0, retrying while busy.
    fn post_ping(&mut self, imm: Option<u32>, size: u64) -> Result<(), String> {
        let (peer, remote) = self.peer()?;
        loop {
            let posted = match imm {
                Some(v) => self.group.post_write(0, peer, self.region, 0, &remote, 0, 0, Some(v), 0),
                None => self.group.post_send(0, peer, self.region, 0, size, 0),
            }
            .map_err(|e| e.to_string())?;
            if posted {
                return Ok(());
            }
            self.progress(|_| Ok(()))?;
        }
    }

    /// One round trip: ping, then wait for the answer.
    pub fn ping(&mut self, imm: Option<(u32, u32)>, size: u64) -> Result<(), String> {
        self.post_ping(imm.map(|i| i.0), size)?;
        self.wait_one(imm.map(|i| i.1), Duration::from_secs(10))
    }

    /// Answers `iters` pings.
    pub fn echo(&mut self, imm: Option<(u32, u32)>, size: u64, iters: u64) -> Result<(), String> {
        for _ in 0..iters {
            self.wait_one(imm.map(|i| i.0), Duration::from_secs(10))?;
            self.post_ping(imm.map(|i| i.1), size)?;
        }
        Ok(())
    }

    /// Runs requests built from `template` (piece endpoints shifted by the
    /// request number, so successive requests rotate over the endpoints)
    /// with `depth` in flight until `duration` has passed, then drains.
    /// Returns the number of requests completed and the elapsed time.
    pub fn stream(
        &mut self,
        kind: Kind,
        template: &[Piece],
        imm: Option<u32>,
        depth: usize,
        duration: Duration,
    ) -> Result<(u64, Duration), String> {
        let (peer, remote) = self.peer()?;
        let nics = self.group.nic_count();
        let n = template.len();
        let hold_last = imm.is_some() && n > 1;
        let mut slots = vec![Slot::default(); depth];
        let mut requests = vec![0u64; depth];
        let mut queue: VecDeque<(usize, usize)> = VecDeque::with_capacity(depth * n);
        let mut next_request = 0u64;
        let mut completed = 0u64;
        let start = Instant::now();
        let deadline = start + duration;
        let first = if hold_last { n - 1 } else { n };
        // Starts request `next` in `slot`: its pieces (all but the one with
        // the immediate, when that must wait) go to the post queue.
        let begin =
            |slot: usize, s: &mut Slot, request: &mut u64, queue: &mut VecDeque<(usize, usize)>, next: &mut u64| {
                *s = Slot { active: true, outstanding: first, last_posted: !hold_last };
                *request = *next;
                *next += 1;
                queue.extend((0..first).map(|p| (slot, p)));
            };
        for slot in 0..depth {
            begin(slot, &mut slots[slot], &mut requests[slot], &mut queue, &mut next_request);
        }
        let mut done_tokens: Vec<u64> = Vec::with_capacity(256);
        while slots.iter().any(|s| s.active) {
            let mut busy = false;
            while let Some(&(slot, p)) = queue.front() {
                let piece = template[p];
                let nic = (piece.nic + requests[slot] as usize) % nics;
                let token = (slot as u64) << 32 | p as u64;
                let with_imm = p == n - 1;
                let posted = match kind {
                    Kind::Write => self.group.post_write(
                        nic,
                        peer,
                        self.region,
                        piece.src_offset,
                        &remote,
                        piece.dst_offset,
                        piece.len,
                        if with_imm { imm } else { None },
                        token,
                    ),
                    Kind::Read => self.group.post_read(
                        nic,
                        peer,
                        self.region,
                        piece.dst_offset,
                        &remote,
                        piece.src_offset,
                        piece.len,
                        token,
                    ),
                }
                .map_err(|e| e.to_string())?;
                if !posted {
                    break;
                }
                busy = true;
                queue.pop_front();
            }
            if self.progress(|t| {
                done_tokens.push(t);
                Ok(())
            })? > 0
            {
                busy = true;
            }
            for token in done_tokens.drain(..) {
                let slot = (token >> 32) as usize;
                let s = &mut slots[slot];
                s.outstanding -= 1;
                if s.outstanding > 0 {
                    continue;
                }
                if !s.last_posted {
                    s.last_posted = true;
                    s.outstanding = 1;
                    queue.push_back((slot, n - 1));
                } else {
                    completed += 1;
                    if Instant::now() < deadline {
                        begin(slot, s, &mut requests[slot], &mut queue, &mut next_request);
                    } else {
                        s.active = false;
                    }
                }
            }
            if busy {
                self.active_at = Instant::now();
            } else {
                self.idle();
            }
        }
        Ok((completed, start.elapsed()))
    }
}
