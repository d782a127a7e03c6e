//! Queue-pair state transitions: the attributes and masks of each
//! `ibv_modify_qp` step, built without touching a device so that they can
//! be tested here.
//!
//! RC: RESET → INIT (port, P_Key index, remote access) → RTR (path to the
//! peer, its QPN and first PSN, path MTU, RDMA-read responder resources,
//! RNR timer) → RTS (our first PSN, ACK timeout, retries, RDMA-read
//! initiator depth). UD: RESET → INIT (port, P_Key index, Q_Key) → RTR →
//! RTS (PSN). Any state → ERR (retiring a queue pair, `drain.rs`) and any
//! state → RESET (recovering the handshake queue pair).

use verbs_sys as sys;

use super::config::VerbsConfig;
use super::wire::NicAddr;

/// The Q_Key of strait's handshake UD queue pairs (high bit clear: not a
/// privileged Q_Key).
pub(crate) const HANDSHAKE_QKEY: u32 = 0x5354_4b31; // "STK1"

/// A filled `ibv_qp_attr` with the mask naming its fields.
pub(crate) struct Transition {
    pub attr: sys::ibv_qp_attr,
    pub mask: u32,
}

impl std::fmt::Debug for Transition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Transition(state {}, mask {:#x})", self.attr.qp_state, self.mask)
    }
}

fn blank(state: sys::ibv_qp_state) -> sys::ibv_qp_attr {
    // SAFETY: ibv_qp_attr is plain data (integers and unions of integers);
    // all-zero is a valid value of every field.
    let mut attr: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
    attr.qp_state = state;
    attr
}

/// The address vector that reaches `peer` from `port` using GID index
/// `sgid_index`: the peer's LID, and a GRH when the link is Ethernet
/// (always needed on RoCE).
pub(crate) fn path_to(peer: &NicAddr, port: u8, sgid_index: u8, roce: bool, config: &VerbsConfig) -> sys::ibv_ah_attr {
    // SAFETY: ibv_ah_attr is plain data; all-zero is valid.
    let mut ah: sys::ibv_ah_attr = unsafe { std::mem::zeroed() };
    ah.dlid = peer.lid;
    ah.sl = config.service_level;
    ah.port_num = port;
    if roce {
        ah.is_global = 1;
        ah.grh.dgid.raw = peer.gid;
        ah.grh.sgid_index = sgid_index;
        // RoCE v2 packets are routed: a hop limit of 1 would stop them at
        // the first router.
        ah.grh.hop_limit = 64;
        ah.grh.traffic_class = config.traffic_class;
    }
    ah
}

/// RC RESET → INIT: our port, P_Key index 0, and what peers may do to our
/// memory through this QP (the memory regions decide per region).
pub(crate) fn rc_init(port: u8) -> Transition {
    let mut attr = blank(sys::ibv_qp_state_IBV_QPS_INIT);
    attr.port_num = port;
    attr.pkey_index = 0;
    attr.qp_access_flags = sys::ibv_access_flags_IBV_ACCESS_REMOTE_WRITE | sys::ibv_access_flags_IBV_ACCESS_REMOTE_READ;
    Transition {
        attr,
        mask: sys::ibv_qp_attr_mask_IBV_QP_STATE
            | sys::ibv_qp_attr_mask_IBV_QP_PKEY_INDEX
            | sys::ibv_qp_attr_mask_IBV_QP_PORT
            | sys::ibv_qp_attr_mask_IBV_QP_ACCESS_FLAGS,
    }
}

/// RC INIT → RTR: the peer's queue pair and path.
pub(crate) fn rc_rtr(
    path: sys::ibv_ah_attr,
    mtu: u8,
    remote_qpn: u32,
    remote_psn: u32,
    rd_atomic: u8,
    config: &VerbsConfig,
) -> Transition {
    let mut attr = blank(sys::ibv_qp_state_IBV_QPS_RTR);
    attr.ah_attr = path;
    attr.path_mtu = mtu as sys::ibv_mtu;
    attr.dest_qp_num = remote_qpn;
    attr.rq_psn = remote_psn;
    attr.max_dest_rd_atomic = rd_atomic;
    attr.min_rnr_timer = config.min_rnr_timer;
    Transition {
        attr,
        mask: sys::ibv_qp_attr_mask_IBV_QP_STATE
            | sys::ibv_qp_attr_mask_IBV_QP_AV
            | sys::ibv_qp_attr_mask_IBV_QP_PATH_MTU
            | sys::ibv_qp_attr_mask_IBV_QP_DEST_QPN
            | sys::ibv_qp_attr_mask_IBV_QP_RQ_PSN
            | sys::ibv_qp_attr_mask_IBV_QP_MAX_DEST_RD_ATOMIC
            | sys::ibv_qp_attr_mask_IBV_QP_MIN_RNR_TIMER,
    }
}

/// RC RTR → RTS: our side of the send queue.
pub(crate) fn rc_rts(psn: u32, rd_atomic: u8, config: &VerbsConfig) -> Transition {
    let mut attr = blank(sys::ibv_qp_state_IBV_QPS_RTS);
    attr.sq_psn = psn;
    attr.timeout = config.ack_timeout;
    attr.retry_cnt = config.retry_count;
    attr.rnr_retry = config.rnr_retry;
    attr.max_rd_atomic = rd_atomic;
    Transition {
        attr,
        mask: sys::ibv_qp_attr_mask_IBV_QP_STATE
            | sys::ibv_qp_attr_mask_IBV_QP_SQ_PSN
            | sys::ibv_qp_attr_mask_IBV_QP_TIMEOUT
            | sys::ibv_qp_attr_mask_IBV_QP_RETRY_CNT
            | sys::ibv_qp_attr_mask_IBV_QP_RNR_RETRY
            | sys::ibv_qp_attr_mask_IBV_QP_MAX_QP_RD_ATOMIC,
    }
}

/// Any state → ERR: the device flushes what is outstanding and the queue
/// pair accepts nothing more from the peer.
pub(crate) fn to_error() -> Transition {
    Transition { attr: blank(sys::ibv_qp_state_IBV_QPS_ERR), mask: sys::ibv_qp_attr_mask_IBV_QP_STATE }
}

/// Any state → RESET: the queue pair forgets its work requests and can be
/// brought up again with [`ud_steps`].
pub(crate) fn to_reset() -> Transition {
    Transition { attr: blank(sys::ibv_qp_state_IBV_QPS_RESET), mask: sys::ibv_qp_attr_mask_IBV_QP_STATE }
}

/// The RDMA reads a connection keeps in flight (`max_rd_atomic` at RTS): as
/// many as our device initiates, but no more than the peer's queue pair
/// accepts (its `max_dest_rd_atomic`, carried in the handshake). Reads
/// beyond what the responder has resources for are NAKed or stall.
pub(crate) fn read_depth(local_initiator: u8, remote_responder: u8) -> u8 {
    local_initiator.min(remote_responder).max(1)
}

/// The three UD steps, in order.
pub(crate) fn ud_steps(port: u8, psn: u32) -> [Transition; 3] {
    let mut init = blank(sys::ibv_qp_state_IBV_QPS_INIT);
    init.port_num = port;
    init.pkey_index = 0;
    init.qkey = HANDSHAKE_QKEY;
    let rtr = blank(sys::ibv_qp_state_IBV_QPS_RTR);
    let mut rts = blank(sys::ibv_qp_state_IBV_QPS_RTS);
    rts.sq_psn = psn;
    [
        Transition {
            attr: init,
            mask: sys::ibv_qp_attr_mask_IBV_QP_STATE
                | sys::ibv_qp_attr_mask_IBV_QP_PKEY_INDEX
                | sys::ibv_qp_attr_mask_IBV_QP_PORT
                | sys::ibv_qp_attr_mask_IBV_QP_QKEY,
        },
        Transition { attr: rtr, mask: sys::ibv_qp_attr_mask_IBV_QP_STATE },
        Transition { attr: rts, mask: sys::ibv_qp_attr_mask_IBV_QP_STATE | sys::ibv_qp_attr_mask_IBV_QP_SQ_PSN },
    ]
}

/// The path MTU of a connection: the smallest of both ports' and the
/// configured bound (verbs codes).
pub(crate) fn path_mtu(local: u8, remote: u8, bound: Option<u8>) -> u8 {
    local.min(remote).min(bound.unwrap_or(u8::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(roce: bool) -> NicAddr {
        NicAddr { gid: [7; 16], lid: 12, ud_qpn: 0x99, nonce: 1, mtu: 5, roce, gid_index: 3, port: 1 }
    }

    #[test]
    fn rc_transitions_name_exactly_the_fields_they_set() {
        let c = VerbsConfig::default();
        let init = rc_init(2);
        assert_eq!(init.mask, 1 | 8 | 16 | 32, "STATE | ACCESS_FLAGS | PKEY_INDEX | PORT");
        assert_eq!(init.attr.qp_state, sys::ibv_qp_state_IBV_QPS_INIT);
        assert_eq!(init.attr.port_num, 2);
        assert_eq!(init.attr.qp_access_flags, 2 | 4, "REMOTE_WRITE | REMOTE_READ");

        let rtr = rc_rtr(path_to(&peer(true), 2, 3, true, &c), 3, 0x1234, 0xabc, 16, &c);
        assert_eq!(rtr.mask, 1 | 128 | 256 | 4096 | 32768 | 131072 | 1048576);
        assert_eq!(rtr.attr.qp_state, sys::ibv_qp_state_IBV_QPS_RTR);
        assert_eq!((rtr.attr.dest_qp_num, rtr.attr.rq_psn), (0x1234, 0xabc));
        assert_eq!(rtr.attr.path_mtu, 3);
        assert_eq!(rtr.attr.max_dest_rd_atomic, 16);
        assert_eq!(rtr.attr.min_rnr_timer, 12);

        let rts = rc_rts(0x777, 16, &c);
        assert_eq!(rts.mask, 1 | 512 | 1024 | 2048 | 8192 | 65536);
        assert_eq!(rts.attr.qp_state, sys::ibv_qp_state_IBV_QPS_RTS);
        assert_eq!((rts.attr.sq_psn, rts.attr.timeout, rts.attr.retry_cnt, rts.attr.rnr_retry), (0x777, 16, 7, 7));
    }

    #[test]
    fn ud_transitions() {
        let [init, rtr, rts] = ud_steps(1, 5);
        assert_eq!(init.mask, 1 | 16 | 32 | 64, "STATE | PKEY_INDEX | PORT | QKEY");
        assert_eq!(init.attr.qkey, HANDSHAKE_QKEY);
        const { assert!(HANDSHAKE_QKEY & 0x8000_0000 == 0, "not a privileged Q_Key") };
        assert_eq!(rtr.mask, 1);
        assert_eq!(rts.mask, 1 | 65536);
        assert_eq!(rts.attr.sq_psn, 5);
    }

    #[test]
    fn roce_paths_carry_a_routable_grh_and_ib_paths_do_not() {
        let c = VerbsConfig { traffic_class: 106, service_level: 3, ..Default::default() };
        let roce = path_to(&peer(true), 1, 3, true, &c);
        assert_eq!(roce.is_global, 1);
        // SAFETY: reading the raw bytes of a GID union that was written whole.
        assert_eq!(unsafe { roce.grh.dgid.raw }, [7; 16]);
        assert_eq!((roce.grh.sgid_index, roce.grh.hop_limit, roce.grh.traffic_class), (3, 64, 106));
        assert_eq!((roce.sl, roce.port_num), (3, 1));
        let ib = path_to(&peer(false), 1, 0, false, &c);
        assert_eq!((ib.is_global, ib.dlid), (0, 12));
    }

    #[test]
    fn error_and_reset_set_only_the_state() {
        assert_eq!((to_error().attr.qp_state, to_error().mask), (sys::ibv_qp_state_IBV_QPS_ERR, 1));
        assert_eq!((to_reset().attr.qp_state, to_reset().mask), (sys::ibv_qp_state_IBV_QPS_RESET, 1));
    }

    #[test]
    fn read_depth_never_exceeds_the_responder() {
        assert_eq!(read_depth(16, 16), 16, "ConnectX on both ends");
        assert_eq!(read_depth(16, 4), 4, "a peer with fewer responder resources");
        assert_eq!(read_depth(2, 16), 2);
        assert_eq!(read_depth(0, 16), 1, "at least one read in flight");
    }

    #[test]
    fn path_mtu_is_the_smallest() {
        assert_eq!(path_mtu(5, 3, None), 3);
        assert_eq!(path_mtu(5, 5, Some(4)), 4);
        assert_eq!(path_mtu(2, 5, Some(4)), 2);
    }
}
