//! The server side (`serve`, and the child of `loopback`): answers one
//! client at a time over the side channel, serving its engine's region,
//! raw endpoints and kernel TCP streams.

use std::io::Read as _;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use strait::{Access, EngineAddress, MrDesc, TransferEngine};

use crate::client::{CONFIRM_TIMEOUT, PING, PONG};
use crate::proto::{Channel, Driver, Echo, Msg, RawEnds, PROTOCOL};
use crate::raw::RawEnd;
use crate::EngineOptions;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // Second Ctrl-C: leave now.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Options of `serve`.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub bind: IpAddr,
    pub port: u16,
    pub forever: bool,
    pub quiet: bool,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Opens the engine, prints how to reach it, and serves clients: one, or
/// until interrupted with `forever`.
pub fn serve(engine_options: &EngineOptions, options: &ServeOptions) -> Result<(), String> {
    // SAFETY: installing a handler that only touches an atomic (and _exit).
    unsafe { libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t) };
    let engine = engine_options.build()?;
    let listener =
        TcpListener::bind((options.bind, options.port)).map_err(|e| format!("binding the side channel: {e}"))?;
    let local = listener.local_addr().map_err(err)?;
    let shown = if local.ip().is_unspecified() { crate::reachable_ip() } else { local.ip() };
    println!("strait-bench serve: listening on {shown}:{}", local.port());
    println!("  provider {}, {} NIC(s), engine address {}", engine.provider(), engine.nic_count(), engine.address());
    println!("  run on the other node: strait-bench connect {shown}:{}", local.port());
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    loop {
        let Some(stream) = accept(&listener)? else {
            eprintln!("strait-bench serve: interrupted");
            return Ok(());
        };
        let peer = stream.peer_addr().map_err(err)?;
        if !options.quiet {
            println!("strait-bench serve: client {peer}");
        }
        let result = Session::start(&engine, engine_options, stream, options.quiet).and_then(Session::run);
        match result {
            Ok(()) if !options.forever => return Ok(()),
            Ok(()) => {}
            Err(e) if !options.forever => return Err(e),
            Err(e) => eprintln!("strait-bench serve: client {peer}: {e}"),
        }
    }
}

/// Accepts one connection, checking for Ctrl-C every 200 ms.
fn accept(listener: &TcpListener) -> Result<Option<TcpStream>, String> {
    let mut fd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    while !interrupted() {
        // SAFETY: one valid pollfd for the call.
        if unsafe { libc::poll(&mut fd, 1, 200) } > 0 {
            return listener.accept().map(|(s, _)| Some(s)).map_err(err);
        }
    }
    Ok(None)
}

struct Session<'a> {
    engine: &'a TransferEngine,
    ch: Channel,
    local_ip: IpAddr,
    client_engine: EngineAddress,
    client_desc: MrDesc,
    region: strait::MemoryRegion,
    raw: Option<RawEnd>,
    /// KV setups, by number.
    kv: Vec<crate::kv::KvServer>,
    quiet: bool,
}

impl<'a> Session<'a> {
    fn start(
        engine: &'a TransferEngine,
        options: &EngineOptions,
        stream: TcpStream,
        quiet: bool,
    ) -> Result<Self, String> {
        let local_ip = stream.local_addr().map_err(err)?.ip();
        let mut ch = Channel::new(stream).map_err(err)?;
        let (protocol, engine_hex, desc_hex, region_len, raw_ends) = ch.expect("hello", |m| match m {
            Msg::Hello { protocol, engine, desc, region_len, raw } => Some((protocol, engine, desc, region_len, raw)),
            _ => None,
        })?;
        if protocol != PROTOCOL {
            let message =
                format!("protocol {protocol} is not this server's {PROTOCOL}: use the same strait-bench on both ends");
            let _ = ch.send(&Msg::Error { message: message.clone() });
            return Err(message);
        }
        let setup = (|| {
            let client_engine = EngineAddress::from_str(&engine_hex).map_err(err)?;
            let client_desc = MrDesc::from_str(&desc_hex).map_err(err)?;
            let region = engine.alloc(region_len, Access::REMOTE_READ_WRITE).map_err(err)?;
            let raw = match raw_ends {
                Some(ends) => {
                    let mut raw =
                        RawEnd::open(options.provider, options.interface.as_deref(), options.nics, region_len)?;
                    raw.connect(
                        &EngineAddress::from_str(&ends.address).map_err(err)?,
                        MrDesc::from_str(&ends.desc).map_err(err)?,
                    )?;
                    Some(raw)
                }
                None => None,
            };
            Ok::<_, String>((client_engine, client_desc, region, raw))
        })();
        let (client_engine, client_desc, region, raw) = match setup {
            Ok(s) => s,
            Err(message) => {
                let _ = ch.send(&Msg::Error { message: message.clone() });
                return Err(message);
            }
        };
        ch.send(&Msg::Welcome {
            engine: engine.address().to_string(),
            desc: region.descriptor().to_string(),
            raw: raw.as_ref().map(|r| RawEnds { address: r.address().to_string(), desc: r.descriptor().to_string() }),
            nics: engine.nic_count(),
            provider: engine.provider().to_string(),
        })?;
        Ok(Session { engine, ch, local_ip, client_engine, client_desc, region, raw, kv: Vec::new(), quiet })
    }

    /// Waits for the next message, keeping the raw endpoints progressing
    /// (the client's raw operations need the target to poll).
    fn next(&mut self) -> Result<Msg, String> {
        loop {
            if interrupted() {
                return Err("interrupted".into());
            }
            match self.raw.as_mut() {
                Some(raw) => {
                    if self.ch.readable(Duration::ZERO) {
                        break;
                    }
                    raw.serve()?;
                }
                None => {
                    if self.ch.readable(Duration::from_millis(200)) {
                        break;
                    }
                }
            }
        }
        self.ch.recv()
    }

    fn run(mut self) -> Result<(), String> {
        loop {
            let msg = self.next()?;
            let outcome = self.handle(msg);
            match outcome {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(message) => {
                    let _ = self.ch.send(&Msg::Error { message: message.clone() });
                    return Err(message);
                }
            }
        }
    }

    /// Handles one message; true at the end of the session.
    fn handle(&mut self, msg: Msg) -> Result<bool, String> {
        match msg {
            Msg::Finished { driver: Driver::Strait, tag, count } => {
                let counter = self.engine.expect_imm(tag, count).map_err(err)?;
                let _ = counter.wait_timeout(CONFIRM_TIMEOUT);
                let seen = counter.seen();
                self.ch.send(&Msg::Counted { seen })?;
            }
            Msg::Finished { driver: Driver::Raw, tag, count } => {
                let raw = self.raw.as_mut().ok_or("no raw endpoints")?;
                let seen = raw.wait_tally(tag, count, CONFIRM_TIMEOUT)?;
                self.ch.send(&Msg::Counted { seen })?;
            }
            Msg::Echo { driver: Driver::Strait, kind, size, iters } => {
                self.echo(kind, size, iters)?;
                self.ch.send(&Msg::Echoed)?;
            }
            Msg::Echo { driver: Driver::Raw, kind, size, iters } => {
                let raw = self.raw.as_mut().ok_or("no raw endpoints")?;
                raw.echo((kind == Echo::Imm).then_some((PING, PONG)), size, iters)?;
                self.ch.send(&Msg::Echoed)?;
            }
            Msg::TcpListen { streams } => self.tcp(streams)?,
            Msg::KvSetup { setup, spec, senders } => match crate::kv::KvServer::setup(self.engine, spec, &senders) {
                Ok((kv, reply)) => {
                    self.kv.truncate(setup);
                    self.kv.push(kv);
                    self.ch.send(&reply)?;
                }
                Err(message) => self.ch.send(&Msg::Error { message })?,
            },
            Msg::KvExpect { setup } => {
                let reply = match self.kv.get_mut(setup) {
                    Some(kv) => kv.expect().unwrap_or_else(|message| Msg::Error { message }),
                    None => Msg::Error { message: "no KV setup".into() },
                };
                self.ch.send(&reply)?;
            }
            Msg::KvWait { setup } => {
                let reply = match self.kv.get_mut(setup) {
                    Some(kv) => kv.wait(),
                    None => Msg::Error { message: "no KV setup".into() },
                };
                self.ch.send(&reply)?;
            }
            Msg::Report { report } => {
                if !self.quiet {
                    print!("{}", report.tables());
                }
            }
            Msg::Bye => return Ok(true),
            other => return Err(format!("unexpected message {other:?}")),
        }
        Ok(false)
    }

    fn echo(&mut self, kind: Echo, size: u64, iters: u64) -> Result<(), String> {
        let timeout = Duration::from_secs(10);
        match kind {
            Echo::Imm => {
                let counter = self.engine.expect_imm(PING, 1).map_err(err)?;
                for _ in 0..iters {
                    counter.wait_timeout(timeout).map_err(err)?;
                    counter.rearm(1).map_err(err)?;
                    let _sent = self.engine.write_imm(&self.client_desc, PONG).map_err(err)?;
                }
            }
            Echo::Send => {
                for _ in 0..iters {
                    self.engine.recv_timeout(timeout).map_err(err)?;
                    let _sent = self.engine.send(&self.client_engine, &self.region, 0, size).map_err(err)?;
                }
            }
        }
        Ok(())
    }

    /// Accepts `streams` kernel TCP connections and reads them to the end.
    fn tcp(&mut self, streams: usize) -> Result<(), String> {
        let listener = TcpListener::bind((self.local_ip, 0)).map_err(err)?;
        let port = listener.local_addr().map_err(err)?.port();
        self.ch.send(&Msg::TcpPort { port })?;
        let conns =
            (0..streams).map(|_| listener.accept().map(|(s, _)| s).map_err(err)).collect::<Result<Vec<_>, _>>()?;
        let bytes: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = conns
                .into_iter()
                .map(|mut c| {
                    s.spawn(move || {
                        let mut buf = vec![0u8; 1 << 20];
                        let mut total = 0u64;
                        loop {
                            match c.read(&mut buf) {
                                Ok(0) => return Ok(total),
                                Ok(n) => total += n as u64,
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                                Err(e) => return Err(e.to_string()),
                            }
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| "tcp thread panicked".to_string())?)
                .sum::<Result<u64, String>>()
        })?;
        self.ch.send(&Msg::TcpCount { bytes })
    }
}
