//! Asking a region's owner whether a key still grants access.
//!
//! # Why
//! On verbs, a write or read through a key the target does not hold fails
//! with a remote access error from the hardware. libfabric 1.17's `tcp` and
//! `shm` do not say so reliably: tcp cancels the operation and drops the
//! connection (the initiator sees a connection error unless the rejection
//! happens to arrive first), and shm never answers the operation at all (it
//! ends through the request timeout). So when a write or read fails with a
//! connection error or expires on a transport that does not report rejected
//! keys ([`Nic::reports_rejected_keys`](crate::backend::Nic)), the worker
//! asks the region's owner, in a two-sided message, whether the
//! descriptor's key is registered for that access and range. If the owner
//! says no, the request fails with [`Error::RemoteAccess`](crate::Error);
//! if it says yes or does not answer within [`WINDOW`], the original error
//! stands. The owner decides from its own registrations: the verdict is not
//! read into error codes.
//!
//! Control messages are sends that carry the immediate [`CONTROL_IMM`].
//! User sends never carry an immediate, so the two never mix, and control
//! messages never reach the user's queue or callback. They use the
//! receiving engine's receive buffers: a query (about 60 bytes plus the
//! asking engine's address) needs buffers of at least [`MAX_QUERY`] bytes
//! to be sure to fit (the default is 64 KiB; the minimum the builder allows
//! is 64 B, with which the owner's receive is truncated and the original
//! error stands).
//!
//! # Encoding (version 1)
//! * Query: `"STQ" 1`, what (1 write, 2 read), cookie (u64 LE), key (u64
//!   LE, for the owner's NIC 0), address (u64 LE, as the descriptor names
//!   the region's first byte), length (u64 LE), then the asking engine's
//!   address (as [`EngineAddress`] encodes it), nothing after.
//! * Answer: `"STV" 1`, verdict (0 granted, 1 denied), cookie (u64 LE).
//! * Hello: `"STH" 1`, cookie (u64 LE), the introducing engine's address;
//!   answered by Welcome: `"STW" 1`, cookie (u64 LE). See the worker's
//!   `Intro`: on transports whose RMA targets must know the initiator
//!   beforehand (EFA's efa-direct), an engine introduces itself this way
//!   before its first write or read to a peer.

use std::time::Duration;

use crate::address::EngineAddress;
use crate::error::Result;
use crate::wire::{Reader, MAX_NICS, MAX_NIC_ADDRESS_LEN};

/// The immediate that marks a send as a control message.
pub(crate) const CONTROL_IMM: u32 = 0x5354_4331;
/// How long a request waits for the owner's verdict before it ends with its
/// original error.
pub(crate) const WINDOW: Duration = Duration::from_millis(500);
/// Wait between tries of a query or answer that could not be sent (tcp
/// needs a moment to reconnect after the owner dropped the connection; a
/// new shm peer must be connected first).
pub(crate) const RETRY: Duration = Duration::from_millis(20);
/// Tries of a query that could not be sent, or whose send failed, before
/// the request ends with its original error: a peer that refuses every
/// connection (a dead process) is not kept waiting for the whole window.
pub(crate) const TRIES: u8 = 5;
/// The longest query: fixed fields plus the longest engine address.
pub(crate) const MAX_QUERY: usize = 4 + 1 + 32 + 6 + MAX_NICS * (1 + MAX_NIC_ADDRESS_LEN);
/// The length of an answer.
pub(crate) const ANSWER_LEN: usize = 4 + 1 + 8;

const QUERY_MAGIC: &[u8; 3] = b"STQ";
const ANSWER_MAGIC: &[u8; 3] = b"STV";
const HELLO_MAGIC: &[u8; 3] = b"STH";
const WELCOME_MAGIC: &[u8; 3] = b"STW";
const VERSION: u8 = 1;

/// The access a query asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wanted {
    Write = 1,
    Read = 2,
}

/// "Does key `key` grant `wanted` of `len` bytes from `addr`?"
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Query {
    pub wanted: Wanted,
    pub cookie: u64,
    pub key: u64,
    pub addr: u64,
    pub len: u64,
    pub reply_to: EngineAddress,
}

/// The owner's verdict on the query with `cookie`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub cookie: u64,
    pub denied: bool,
}

/// A control message, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Control {
    Query(Query),
    Answer(Answer),
    /// "Put me in your address vector, then say so": `reply_to` is the
    /// introducing engine.
    Hello {
        cookie: u64,
        reply_to: EngineAddress,
    },
    /// The answer to the hello with this cookie.
    Welcome {
        cookie: u64,
    },
    /// A message of the staging protocol (`"STS"`, see
    /// [`super::staging`]), passed to the stager as it came.
    Staged(Vec<u8>),
}

impl Query {
    /// Appends the encoding to `out` (cleared first).
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(QUERY_MAGIC);
        out.push(VERSION);
        out.push(self.wanted as u8);
        for v in [self.cookie, self.key, self.addr, self.len] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(self.reply_to.encoded());
    }
}

impl Answer {
    pub(crate) fn encode(&self) -> [u8; ANSWER_LEN] {
        let mut out = [0u8; ANSWER_LEN];
        out[..3].copy_from_slice(ANSWER_MAGIC);
        out[3] = VERSION;
        out[4] = u8::from(self.denied);
        out[5..].copy_from_slice(&self.cookie.to_le_bytes());
        out
    }
}

impl Control {
    /// The encoding (what [`decode`](Self::decode) accepts, byte for byte).
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Control::Query(q) => {
                let mut out = Vec::new();
                q.encode(&mut out);
                out
            }
            Control::Answer(a) => a.encode().to_vec(),
            Control::Hello { cookie, reply_to } => {
                let mut out = Vec::with_capacity(12 + reply_to.encoded().len());
                out.extend_from_slice(HELLO_MAGIC);
                out.push(VERSION);
                out.extend_from_slice(&cookie.to_le_bytes());
                out.extend_from_slice(reply_to.encoded());
                out
            }
            Control::Welcome { cookie } => {
                let mut out = Vec::with_capacity(12);
                out.extend_from_slice(WELCOME_MAGIC);
                out.push(VERSION);
                out.extend_from_slice(&cookie.to_le_bytes());
                out
            }
            Control::Staged(bytes) => bytes.clone(),
        }
    }

    /// Decodes a control message from a peer, checking every field.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Control> {
        let mut r = Reader::new(bytes, "control message");
        let magic = bytes.get(..3).unwrap_or(&[]);
        if magic == QUERY_MAGIC {
            r.header(QUERY_MAGIC, VERSION)?;
            let wanted = match r.u8("access")? {
                1 => Wanted::Write,
                2 => Wanted::Read,
                other => return Err(r.error(format!("unknown access {other}"))),
            };
            let cookie = r.u64("cookie")?;
            let key = r.u64("key")?;
            let addr = r.u64("address")?;
            let len = r.u64("length")?;
            if addr.checked_add(len).is_none() {
                return Err(r.error("address + length overflows"));
            }
            let (provider, nics) = EngineAddress::read(&mut r)?;
            r.finish()?;
            let reply_to = EngineAddress::new(provider, nics);
            Ok(Control::Query(Query { wanted, cookie, key, addr, len, reply_to }))
        } else if magic == HELLO_MAGIC {
            r.header(HELLO_MAGIC, VERSION)?;
            let cookie = r.u64("cookie")?;
            let (provider, nics) = EngineAddress::read(&mut r)?;
            r.finish()?;
            Ok(Control::Hello { cookie, reply_to: EngineAddress::new(provider, nics) })
        } else if magic == super::staging::MAGIC {
            Ok(Control::Staged(bytes.to_vec()))
        } else if magic == WELCOME_MAGIC {
            r.header(WELCOME_MAGIC, VERSION)?;
            let cookie = r.u64("cookie")?;
            r.finish()?;
            Ok(Control::Welcome { cookie })
        } else {
            r.header(ANSWER_MAGIC, VERSION)?;
            let denied = match r.u8("verdict")? {
                0 => false,
                1 => true,
                other => return Err(r.error(format!("unknown verdict {other}"))),
            };
            let cookie = r.u64("cookie")?;
            r.finish()?;
            Ok(Control::Answer(Answer { cookie, denied }))
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Grant {
    /// The key peers use through NIC 0.
    pub key: u64,
    /// The address peers name the region's first byte by.
    pub addr: u64,
    pub len: u64,
    pub remote_write: bool,
    pub remote_read: bool,
}

impl Grant {
    /// Whether this registration grants what `q` asks.
    pub(crate) fn grants(&self, q: &Query) -> bool {
        let allowed = match q.wanted {
            Wanted::Write => self.remote_write,
            Wanted::Read => self.remote_read,
        };
        allowed
            && self.key == q.key
            && q.addr >= self.addr
            && q.addr.checked_add(q.len).is_some_and(|end| end <= self.addr.saturating_add(self.len))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::provider::ProviderKind;

    fn address(nics: usize, len: usize) -> EngineAddress {
        EngineAddress::new(ProviderKind::Tcp, (0..nics).map(|i| vec![i as u8 + 1; len].into()).collect())
    }

    fn query() -> Query {
        Query { wanted: Wanted::Write, cookie: 7, key: 0x1234, addr: 0x1000, len: 0x100, reply_to: address(2, 16) }
    }

    #[test]
    fn round_trips() {
        let mut out = Vec::new();
        let q = query();
        q.encode(&mut out);
        assert_eq!(Control::decode(&out).unwrap(), Control::Query(q));
        let a = Answer { cookie: u64::MAX, denied: true };
        assert_eq!(Control::decode(&a.encode()).unwrap(), Control::Answer(a));
        for c in [
            Control::Hello { cookie: 3, reply_to: address(MAX_NICS, MAX_NIC_ADDRESS_LEN) },
            Control::Welcome { cookie: u64::MAX },
        ] {
            let bytes = c.encode();
            assert!(bytes.len() <= MAX_QUERY);
            assert_eq!(Control::decode(&bytes).unwrap(), c);
            for n in 0..bytes.len() {
                assert!(Control::decode(&bytes[..n]).is_err(), "{c:?} cut to {n} accepted");
            }
            let mut trailing = bytes.clone();
            trailing.push(0);
            assert!(Control::decode(&trailing).is_err());
        }
    }

    #[test]
    fn the_longest_query_fits_the_stated_bound() {
        let mut out = Vec::new();
        Query { reply_to: address(MAX_NICS, MAX_NIC_ADDRESS_LEN), ..query() }.encode(&mut out);
        assert_eq!(out.len(), MAX_QUERY);
    }

    #[test]
    fn wrong_input_is_rejected() {
        let mut good = Vec::new();
        query().encode(&mut good);
        let answer = Answer { cookie: 1, denied: false }.encode();
        let mut cases: Vec<Vec<u8>> = vec![Vec::new(), b"ST".to_vec(), b"XYZ\x01".to_vec()];
        cases.extend((0..good.len()).map(|n| good[..n].to_vec()));
        cases.extend((0..answer.len()).map(|n| answer[..n].to_vec()));
        let mut trailing = good.clone();
        trailing.push(0);
        cases.push(trailing);
        let mut version = good.clone();
        version[3] = 2;
        cases.push(version);
        let mut access = good.clone();
        access[4] = 3;
        cases.push(access);
        let mut overflow = good.clone();
        overflow[21..29].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push(overflow);
        let mut verdict = answer.to_vec();
        verdict[4] = 2;
        cases.push(verdict);
        for case in cases {
            assert!(Control::decode(&case).is_err(), "{case:?} accepted");
        }
    }

    #[test]
    fn grants_only_the_key_access_and_range_registered() {
        let g = Grant { key: 0x1234, addr: 0x1000, len: 0x1000, remote_write: true, remote_read: false };
        assert!(g.grants(&query()));
        assert!(g.grants(&Query { addr: 0x1f00, len: 0x100, ..query() }));
        assert!(!g.grants(&Query { addr: 0x1f01, len: 0x100, ..query() }));
        assert!(!g.grants(&Query { addr: 0xfff, ..query() }));
        assert!(!g.grants(&Query { key: 0x1235, ..query() }));
        assert!(!g.grants(&Query { wanted: Wanted::Read, ..query() }));
        assert!(!g.grants(&Query { addr: u64::MAX, len: 1, ..query() }));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Control::decode(&bytes);
        }

        #[test]
        fn any_query_round_trips(
            write in any::<bool>(), cookie in any::<u64>(), key in any::<u64>(),
            addr in any::<u64>(), len in any::<u64>(), nics in 1..=MAX_NICS, alen in 1..=MAX_NIC_ADDRESS_LEN,
        ) {
            prop_assume!(addr.checked_add(len).is_some());
            let wanted = if write { Wanted::Write } else { Wanted::Read };
            let q = Query { wanted, cookie, key, addr, len, reply_to: address(nics, alen) };
            let mut out = Vec::new();
            q.encode(&mut out);
            prop_assert_eq!(Control::decode(&out).unwrap(), Control::Query(q));
        }
    }
}
