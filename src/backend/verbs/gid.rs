//! Choosing the GID a NIC sends from.
//!
//! On InfiniBand the LID routes within a subnet and GID 0 (the port GID)
//! is used. On RoCE every packet carries a GRH and the GID decides the
//! protocol: a RoCE v2 GID sends routable UDP/IP packets, a RoCE v1 GID
//! raw Ethernet frames that never leave the L2 domain. The default is
//! what RoCE deployments configure their switches for: RoCE v2 over IPv4,
//! i.e. the IPv4-mapped RoCE v2 GID (`::ffff:a.b.c.d`).

use super::wire::format_gid;

/// The type of one GID table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GidType {
    Ib,
    RoceV1,
    RoceV2,
}

/// One entry of a port's GID table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GidEntry {
    pub index: u8,
    pub gid: [u8; 16],
    pub kind: GidType,
}

impl GidEntry {
    fn is_zero(&self) -> bool {
        self.gid == [0; 16]
    }

    fn ipv4_mapped(&self) -> bool {
        self.gid[..10] == [0; 10] && self.gid[10..12] == [0xff, 0xff]
    }

    fn link_local(&self) -> bool {
        self.gid[0] == 0xfe && self.gid[1] & 0xc0 == 0x80
    }
}

/// Picks the GID for a port: `wanted` when given (it must exist and be
/// non-zero), else on InfiniBand index 0, else on RoCE the first
/// IPv4-mapped RoCE v2 GID, then any other routable (not link-local) RoCE
/// v2 GID, then a link-local RoCE v2 GID, then RoCE v1.
pub(crate) fn select_gid(table: &[GidEntry], roce: bool, wanted: Option<u8>) -> Result<GidEntry, String> {
    let usable = || table.iter().filter(|e| !e.is_zero());
    if let Some(index) = wanted {
        return usable().find(|e| e.index == index).copied().ok_or_else(|| {
            let have: Vec<String> =
                usable().map(|e| format!("{} ({:?} {})", e.index, e.kind, format_gid(&e.gid))).collect();
            format!("GID index {index} is not in the port's table (valid: {})", have.join(", "))
        });
    }
    if !roce {
        return usable()
            .find(|e| e.index == 0)
            .or_else(|| usable().next())
            .copied()
            .ok_or("the port has no GID".into());
    }
    let v2 = || usable().filter(|e| e.kind == GidType::RoceV2);
    v2().find(|e| e.ipv4_mapped())
        .or_else(|| v2().find(|e| !e.link_local()))
        .or_else(|| v2().next())
        .or_else(|| usable().find(|e| e.kind == GidType::RoceV1))
        .copied()
        .ok_or_else(|| "the RoCE port has no usable GID (is an IP address configured on its netdev?)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u8, text: &str, kind: GidType) -> GidEntry {
        let gid = text.parse::<std::net::Ipv6Addr>().unwrap().octets();
        GidEntry { index, gid, kind }
    }

    /// A typical ConnectX RoCE port with an IPv4 and an IPv6 address: each
    /// address appears as a v1 and a v2 GID.
    fn roce_table() -> Vec<GidEntry> {
        vec![
            entry(0, "fe80::ba59:9fff:fe12:3456", GidType::RoceV1),
            entry(1, "fe80::ba59:9fff:fe12:3456", GidType::RoceV2),
            entry(2, "::ffff:10.1.2.3", GidType::RoceV1),
            entry(3, "::ffff:10.1.2.3", GidType::RoceV2),
            entry(4, "2001:db8::7", GidType::RoceV1),
            entry(5, "2001:db8::7", GidType::RoceV2),
            entry(6, "::", GidType::RoceV2),
        ]
    }

    #[test]
    fn roce_prefers_ipv4_mapped_v2() {
        assert_eq!(select_gid(&roce_table(), true, None).unwrap().index, 3);
    }

    #[test]
    fn roce_falls_back_in_order() {
        let without_v4: Vec<_> = roce_table().into_iter().filter(|e| e.index != 3).collect();
        assert_eq!(select_gid(&without_v4, true, None).unwrap().index, 5, "routable IPv6 v2");
        let link_local_only: Vec<_> = roce_table().into_iter().filter(|e| e.index < 2).collect();
        assert_eq!(select_gid(&link_local_only, true, None).unwrap().index, 1, "link-local v2");
        let v1_only: Vec<_> = roce_table().into_iter().filter(|e| e.kind == GidType::RoceV1).collect();
        assert_eq!(select_gid(&v1_only, true, None).unwrap().index, 0, "RoCE v1 last");
        let zero = vec![entry(0, "::", GidType::RoceV2)];
        assert!(select_gid(&zero, true, None).unwrap_err().contains("no usable GID"));
    }

    #[test]
    fn explicit_index_wins_and_is_checked() {
        assert_eq!(select_gid(&roce_table(), true, Some(5)).unwrap().index, 5);
        let err = select_gid(&roce_table(), true, Some(6)).unwrap_err();
        assert!(err.contains("GID index 6") && err.contains("3 (RoceV2 ::ffff:10.1.2.3)"), "{err}");
        assert!(select_gid(&roce_table(), true, Some(40)).is_err());
    }

    #[test]
    fn infiniband_uses_the_port_gid() {
        let table = vec![entry(0, "fe80::2:c903:0:1", GidType::Ib), entry(1, "fec0::2:c903:0:1", GidType::Ib)];
        assert_eq!(select_gid(&table, false, None).unwrap().index, 0);
        assert_eq!(select_gid(&table, false, Some(1)).unwrap().index, 1);
    }
}
