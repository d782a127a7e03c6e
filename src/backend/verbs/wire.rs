//! What verbs NICs tell each other: a NIC's address (inside the engine
//! address) and the RC connection handshake carried over UD.
//!
//! Both are plain byte layouts, little-endian, checked field by field on
//! decode: they arrive from other processes (the address through the user's
//! side channel, handshakes from the network, where anything on the fabric
//! that knows our UD QPN and Q_Key can send to it).

use std::fmt;

/// Version byte at the start of a verbs NIC address: 'W', the address of a
/// NIC that speaks handshake v2 (two queue pairs per peer NIC).
const ADDRESS_TAG: u8 = 0x57;
/// The tag of the addresses of strait versions with handshake v1 (one
/// queue pair per peer NIC), which cannot talk to this one.
const ADDRESS_TAG_V1: u8 = 0x56; // 'V'
/// Encoded length of a [`NicAddr`].
pub(crate) const ADDRESS_LEN: usize = 31;

/// An RDMA path MTU as verbs encodes it (`IBV_MTU_256` = 1 ... `IBV_MTU_4096` = 5).
pub(crate) fn mtu_bytes(code: u8) -> Option<u32> {
    (1..=5).contains(&code).then(|| 128u32 << code)
}

/// Everything a peer needs to reach one verbs NIC: its port's LID and GID,
/// the UD queue pair that answers handshakes, and a nonce that tells this
/// incarnation of the NIC from an earlier one that had the same QPN.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct NicAddr {
    pub gid: [u8; 16],
    pub lid: u16,
    pub ud_qpn: u32,
    pub nonce: u32,
    /// The port's active MTU (verbs code, 1..=5).
    pub mtu: u8,
    /// The link is Ethernet (RoCE): routes always carry a GRH.
    pub roce: bool,
    /// The GID index this NIC sends from (for the peer's diagnostics only).
    pub gid_index: u8,
    pub port: u8,
}

impl fmt::Debug for NicAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NicAddr(gid {}, lid {}, ud qpn {:#x}, port {}, mtu {}, {})",
            format_gid(&self.gid),
            self.lid,
            self.ud_qpn,
            self.port,
            mtu_bytes(self.mtu).unwrap_or(0),
            if self.roce { "RoCE" } else { "InfiniBand" }
        )
    }
}

/// A GID as an IPv6 address (IPv4-mapped GIDs show as `::ffff:a.b.c.d`).
pub(crate) fn format_gid(gid: &[u8; 16]) -> String {
    std::net::Ipv6Addr::from(*gid).to_string()
}

impl NicAddr {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.push(ADDRESS_TAG);
        out.extend_from_slice(&self.gid);
        out.extend_from_slice(&self.lid.to_le_bytes());
        out.extend_from_slice(&self.ud_qpn.to_le_bytes());
        out.extend_from_slice(&self.nonce.to_le_bytes());
        out.push(self.mtu);
        out.push(self.roce as u8);
        out.push(self.gid_index);
        out.push(self.port);
    }

    pub(crate) fn to_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ADDRESS_LEN);
        self.encode(&mut out);
        out
    }

    /// Decodes and checks one NIC address.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, &'static str> {
        if bytes.len() != ADDRESS_LEN {
            return Err("a verbs NIC address is 31 bytes");
        }
        if bytes[0] == ADDRESS_TAG_V1 {
            return Err(
                "a verbs NIC address of an older strait (handshake v1); run the same strait version on both sides",
            );
        }
        if bytes[0] != ADDRESS_TAG {
            return Err("not a verbs NIC address");
        }
        let mut c = Cursor(&bytes[1..]);
        let addr = NicAddr {
            gid: c.array(),
            lid: u16::from_le_bytes(c.array()),
            ud_qpn: u32::from_le_bytes(c.array()),
            nonce: u32::from_le_bytes(c.array()),
            mtu: c.byte(),
            roce: match c.byte() {
                0 => false,
                1 => true,
                _ => return Err("bad link-layer flag"),
            },
            gid_index: c.byte(),
            port: c.byte(),
        };
        if addr.ud_qpn == 0 || addr.ud_qpn > QPN_MAX {
            return Err("queue pair number out of range");
        }
        if mtu_bytes(addr.mtu).is_none() {
            return Err("unknown MTU");
        }
        if addr.port == 0 {
            return Err("port 0 does not exist");
        }
        if !addr.roce && addr.lid == 0 {
            return Err("InfiniBand address without a LID");
        }
        Ok(addr)
    }
}

/// Queue pair numbers and PSNs are 24-bit.
pub(crate) const QPN_MAX: u32 = 0xff_ffff;

/// The handshake's magic and version. Version 2 describes two queue pairs
/// (writes and reads; sends) and the sender's RDMA-read responder depth.
/// A version 1 message cannot come from a peer we accepted (its address
/// tag differs), so it is refused as such rather than parsed.
const HANDSHAKE_MAGIC: [u8; 4] = *b"SVH2";
const HANDSHAKE_MAGIC_V1: [u8; 4] = *b"SVH1";
/// Encoded length of a [`Handshake`], checksum included.
pub(crate) const HANDSHAKE_LEN: usize = 4 + 1 + ADDRESS_LEN + 4 * 8 + 1 + 4;

/// Request (connect to me) or reply (connected to you).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HandshakeKind {
    Request = 1,
    Reply = 2,
}

/// One handshake message. The sender describes its two RC queue pairs for
/// this peer (the RMA one, which names the pair, and the message one):
/// numbers, first PSNs, and their generation (a counter the sender raises
/// each time it replaces the pair, so that a late or duplicated message
/// about an older pair is recognised and ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Handshake {
    pub kind: HandshakeKind,
    /// The sender's NIC address (how to reply, and who is connecting).
    pub from: NicAddr,
    /// The nonce of the NIC this message is for: a message meant for an
    /// earlier incarnation of the receiver is dropped.
    pub to_nonce: u32,
    /// The RMA queue pair (writes, reads, immediates).
    pub qpn: u32,
    pub psn: u32,
    /// The message queue pair (sends).
    pub msg_qpn: u32,
    pub msg_psn: u32,
    /// RDMA reads the sender's queue pairs accept in flight (its
    /// `max_dest_rd_atomic`): the peer's initiator depth must not exceed it.
    pub rd_depth: u8,
    pub generation: u32,
    /// In a reply, the generation of the requester's queue pair it answers
    /// (0 in a request).
    pub echo_generation: u32,
    /// In a reply, the requester's queue pair number it answers.
    pub echo_qpn: u32,
}

/// Why a handshake was rejected (for debug logs; never sent back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BadHandshake {
    Length,
    Magic,
    /// A handshake of another strait version.
    Version,
    Checksum,
    Kind,
    Address(&'static str),
    Field(&'static str),
}

impl Handshake {
    pub(crate) fn encode(&self) -> [u8; HANDSHAKE_LEN] {
        let mut out = Vec::with_capacity(HANDSHAKE_LEN);
        out.extend_from_slice(&HANDSHAKE_MAGIC);
        out.push(self.kind as u8);
        self.from.encode(&mut out);
        for v in [
            self.to_nonce,
            self.qpn,
            self.psn,
            self.msg_qpn,
            self.msg_psn,
            self.generation,
            self.echo_generation,
            self.echo_qpn,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(self.rd_depth);
        let sum = checksum(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out.try_into().expect("handshake layout")
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, BadHandshake> {
        if bytes.len() >= 4 && bytes[..4] == HANDSHAKE_MAGIC_V1 {
            return Err(BadHandshake::Version);
        }
        if bytes.len() != HANDSHAKE_LEN {
            return Err(BadHandshake::Length);
        }
        if bytes[..4] != HANDSHAKE_MAGIC {
            return Err(BadHandshake::Magic);
        }
        let (body, sum) = bytes.split_at(HANDSHAKE_LEN - 4);
        if checksum(body).to_le_bytes() != sum {
            return Err(BadHandshake::Checksum);
        }
        let kind = match body[4] {
            1 => HandshakeKind::Request,
            2 => HandshakeKind::Reply,
            _ => return Err(BadHandshake::Kind),
        };
        let from = NicAddr::decode(&body[5..5 + ADDRESS_LEN]).map_err(BadHandshake::Address)?;
        let mut c = Cursor(&body[5 + ADDRESS_LEN..]);
        let mut next = || u32::from_le_bytes(c.array());
        let (to_nonce, qpn, psn, msg_qpn, msg_psn) = (next(), next(), next(), next(), next());
        let (generation, echo_generation, echo_qpn) = (next(), next(), next());
        let rd_depth = c.byte();
        let m = Handshake {
            kind,
            from,
            to_nonce,
            qpn,
            psn,
            msg_qpn,
            msg_psn,
            rd_depth,
            generation,
            echo_generation,
            echo_qpn,
        };
        let qpn_ok = |q: u32| q != 0 && q <= QPN_MAX;
        if !qpn_ok(m.qpn) || !qpn_ok(m.msg_qpn) || m.qpn == m.msg_qpn || m.echo_qpn > QPN_MAX {
            return Err(BadHandshake::Field("queue pair number out of range"));
        }
        if m.psn > QPN_MAX || m.msg_psn > QPN_MAX {
            return Err(BadHandshake::Field("PSN out of range"));
        }
        if m.rd_depth == 0 {
            return Err(BadHandshake::Field("RDMA-read depth 0"));
        }
        if m.generation == 0 {
            return Err(BadHandshake::Field("generation 0"));
        }
        match kind {
            HandshakeKind::Request if m.echo_generation != 0 || m.echo_qpn != 0 => {
                Err(BadHandshake::Field("request with an echo"))
            }
            HandshakeKind::Reply if m.echo_generation == 0 || m.echo_qpn == 0 => {
                Err(BadHandshake::Field("reply without an echo"))
            }
            _ => Ok(m),
        }
    }
}

/// FNV-1a, 32 bits: catches corruption and stray datagrams, not forgery
/// (UD traffic is not authenticated; see the README's security section).
fn checksum(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("length checked by the caller")
    }

    fn byte(&mut self) -> u8 {
        self.array::<1>()[0]
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn addr() -> NicAddr {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&[10, 0, 0, 7]);
        NicAddr { gid, lid: 0, ud_qpn: 0x1234, nonce: 99, mtu: 5, roce: true, gid_index: 3, port: 1 }
    }

    fn request() -> Handshake {
        Handshake {
            kind: HandshakeKind::Request,
            from: addr(),
            to_nonce: 7,
            qpn: 0x55,
            psn: 0xabcdef,
            msg_qpn: 0x56,
            msg_psn: 0x123456,
            rd_depth: 16,
            generation: 1,
            echo_generation: 0,
            echo_qpn: 0,
        }
    }

    #[test]
    fn address_round_trips_and_prints() {
        let a = addr();
        let bytes = a.to_bytes();
        assert_eq!(bytes.len(), ADDRESS_LEN);
        assert_eq!(NicAddr::decode(&bytes).unwrap(), a);
        assert!(format!("{a:?}").contains("::ffff:10.0.0.7"), "{a:?}");
        assert!(format!("{a:?}").contains("mtu 4096"));
    }

    #[test]
    fn bad_addresses_are_rejected() {
        let good = addr().to_bytes();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..30].to_vec(), "31 bytes"),
            ([good.clone(), vec![0]].concat(), "31 bytes"),
            (
                {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                "not a verbs",
            ),
            (
                {
                    let mut b = good.clone();
                    b[0] = b'V';
                    b
                },
                "older strait",
            ),
            (
                {
                    let mut b = good.clone();
                    b[19..23].copy_from_slice(&[0; 4]);
                    b
                },
                "queue pair",
            ),
            (
                {
                    let mut b = good.clone();
                    b[27] = 6;
                    b
                },
                "MTU",
            ),
            (
                {
                    let mut b = good.clone();
                    b[28] = 2;
                    b
                },
                "link-layer",
            ),
            (
                {
                    let mut b = good.clone();
                    b[30] = 0;
                    b
                },
                "port 0",
            ),
            (
                {
                    let mut b = good.clone();
                    b[28] = 0;
                    b
                },
                "without a LID",
            ),
        ];
        for (bytes, why) in cases {
            let err = NicAddr::decode(&bytes).unwrap_err();
            assert!(err.contains(why), "{err} should mention {why}");
        }
    }

    #[test]
    fn handshake_round_trips() {
        let m = request();
        assert_eq!(Handshake::decode(&m.encode()).unwrap(), m);
        let reply = Handshake { kind: HandshakeKind::Reply, echo_generation: 4, echo_qpn: 0x77, ..m };
        assert_eq!(Handshake::decode(&reply.encode()).unwrap(), reply);
    }

    #[test]
    fn corrupt_handshakes_are_rejected() {
        let bytes = request().encode();
        assert_eq!(Handshake::decode(&bytes[..HANDSHAKE_LEN - 1]), Err(BadHandshake::Length));
        assert_eq!(Handshake::decode(&[&bytes[..], &[0]].concat()), Err(BadHandshake::Length));
        let mut b = bytes;
        b[0] = b'X';
        assert_eq!(Handshake::decode(&b), Err(BadHandshake::Magic));
        // Fields that are wrong but consistently checksummed reach the
        // field checks.
        let reseal = |edit: &dyn Fn(&mut Handshake)| {
            let mut m = request();
            edit(&mut m);
            Handshake::decode(&m.encode())
        };
        assert!(matches!(reseal(&|m| m.qpn = 0), Err(BadHandshake::Field(_))));
        assert!(matches!(reseal(&|m| m.qpn = 1 << 24), Err(BadHandshake::Field(_))));
        assert!(matches!(reseal(&|m| m.psn = 1 << 24), Err(BadHandshake::Field(_))));
        assert!(matches!(reseal(&|m| m.msg_qpn = 0), Err(BadHandshake::Field(_))));
        assert!(matches!(reseal(&|m| m.msg_qpn = m.qpn), Err(BadHandshake::Field(_))));
        assert!(matches!(reseal(&|m| m.msg_psn = 1 << 24), Err(BadHandshake::Field(_))));
        assert!(matches!(reseal(&|m| m.rd_depth = 0), Err(BadHandshake::Field(_))));
        assert!(matches!(reseal(&|m| m.generation = 0), Err(BadHandshake::Field(_))));
        assert!(matches!(reseal(&|m| m.echo_qpn = 5), Err(BadHandshake::Field(_))));
        assert!(matches!(
            reseal(&|m| m.kind = HandshakeKind::Reply),
            Err(BadHandshake::Field("reply without an echo"))
        ));
        assert!(matches!(reseal(&|m| m.from.mtu = 9), Err(BadHandshake::Address(_))));
        let mut b = request().encode();
        b[4] = 3;
        assert_eq!(Handshake::decode(&b), Err(BadHandshake::Checksum));
        // A version 1 handshake (72 bytes, magic SVH1) is recognised as such.
        let mut v1 = vec![0u8; 72];
        v1[..4].copy_from_slice(b"SVH1");
        assert_eq!(Handshake::decode(&v1), Err(BadHandshake::Version));
    }

    proptest! {
        /// Any single flipped bit is caught, and no input panics.
        #[test]
        fn flipped_bits_are_caught(bit in 0usize..HANDSHAKE_LEN * 8) {
            let mut b = request().encode();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Handshake::decode(&b).is_err());
        }

        /// Every valid v2 handshake survives encoding, the new fields too.
        #[test]
        fn valid_handshakes_round_trip(
            qpn in 1..=QPN_MAX,
            msg_qpn in 1..=QPN_MAX,
            psn in 0..=QPN_MAX,
            msg_psn in 0..=QPN_MAX,
            rd_depth in 1u8..,
            generation in 1u32..,
            echo in proptest::option::of((1u32.., 1..=QPN_MAX)),
        ) {
            prop_assume!(qpn != msg_qpn);
            let m = Handshake {
                kind: if echo.is_some() { HandshakeKind::Reply } else { HandshakeKind::Request },
                qpn,
                msg_qpn,
                psn,
                msg_psn,
                rd_depth,
                generation,
                echo_generation: echo.map_or(0, |e| e.0),
                echo_qpn: echo.map_or(0, |e| e.1),
                ..request()
            };
            prop_assert_eq!(Handshake::decode(&m.encode()), Ok(m));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = Handshake::decode(&bytes);
            let _ = NicAddr::decode(&bytes);
        }
    }
}
