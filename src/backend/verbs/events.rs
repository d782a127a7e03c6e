//! What strait does with each kind of verbs async event.
//!
//! Async events (`ibv_get_async_event(3)`) report what no completion can:
//! a queue pair that failed outside a work request, the last receive of a
//! retiring queue pair, ports going down or up, a CQ overrun, a device
//! failure. The NIC reads them without blocking from `poll` (see `nic.rs`)
//! and acknowledges each one.

use verbs_sys as sys;

/// The action class of one async event, with its name for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AsyncKind {
    /// The queue pair is in error: its peer's connection is rebuilt (the
    /// handshake queue pair: rebuilt in place).
    QueuePairFailed(&'static str),
    /// A queue pair on an SRQ in the error state consumed its last receive
    /// (completes a retirement, `drain.rs`).
    LastWqeReached(&'static str),
    /// The link of a port changed: logged (connections through a port
    /// that went down fail through their completions).
    Port { up: bool, what: &'static str },
    /// The CQ overran, an SRQ or the device failed: logged as errors.
    Fatal(&'static str),
    /// Informational (LID, P_Key, SM, GID changes; path migration;
    /// SRQ limit; communication established).
    Other(&'static str),
}

pub(crate) fn classify(event: sys::ibv_event_type) -> AsyncKind {
    use AsyncKind::*;
    match event {
        sys::ibv_event_type_IBV_EVENT_QP_FATAL => QueuePairFailed("QP_FATAL"),
        sys::ibv_event_type_IBV_EVENT_QP_REQ_ERR => QueuePairFailed("QP_REQ_ERR"),
        sys::ibv_event_type_IBV_EVENT_QP_ACCESS_ERR => QueuePairFailed("QP_ACCESS_ERR"),
        sys::ibv_event_type_IBV_EVENT_QP_LAST_WQE_REACHED => LastWqeReached("QP_LAST_WQE_REACHED"),
        sys::ibv_event_type_IBV_EVENT_PORT_ACTIVE => Port { up: true, what: "PORT_ACTIVE" },
        sys::ibv_event_type_IBV_EVENT_PORT_ERR => Port { up: false, what: "PORT_ERR" },
        sys::ibv_event_type_IBV_EVENT_CQ_ERR => Fatal("CQ_ERR (completion queue overrun)"),
        sys::ibv_event_type_IBV_EVENT_SRQ_ERR => Fatal("SRQ_ERR"),
        sys::ibv_event_type_IBV_EVENT_DEVICE_FATAL => Fatal("DEVICE_FATAL"),
        sys::ibv_event_type_IBV_EVENT_WQ_FATAL => Fatal("WQ_FATAL"),
        sys::ibv_event_type_IBV_EVENT_COMM_EST => Other("COMM_EST"),
        sys::ibv_event_type_IBV_EVENT_SQ_DRAINED => Other("SQ_DRAINED"),
        sys::ibv_event_type_IBV_EVENT_PATH_MIG => Other("PATH_MIG"),
        sys::ibv_event_type_IBV_EVENT_PATH_MIG_ERR => Other("PATH_MIG_ERR"),
        sys::ibv_event_type_IBV_EVENT_LID_CHANGE => Other("LID_CHANGE"),
        sys::ibv_event_type_IBV_EVENT_PKEY_CHANGE => Other("PKEY_CHANGE"),
        sys::ibv_event_type_IBV_EVENT_SM_CHANGE => Other("SM_CHANGE"),
        sys::ibv_event_type_IBV_EVENT_SRQ_LIMIT_REACHED => Other("SRQ_LIMIT_REACHED"),
        sys::ibv_event_type_IBV_EVENT_CLIENT_REREGISTER => Other("CLIENT_REREGISTER"),
        sys::ibv_event_type_IBV_EVENT_GID_CHANGE => Other("GID_CHANGE"),
        _ => Other("unknown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_pair_errors_break_and_the_rest_is_logged() {
        for e in [
            sys::ibv_event_type_IBV_EVENT_QP_FATAL,
            sys::ibv_event_type_IBV_EVENT_QP_REQ_ERR,
            sys::ibv_event_type_IBV_EVENT_QP_ACCESS_ERR,
        ] {
            assert!(matches!(classify(e), AsyncKind::QueuePairFailed(_)), "{e}");
        }
        assert!(matches!(classify(sys::ibv_event_type_IBV_EVENT_QP_LAST_WQE_REACHED), AsyncKind::LastWqeReached(_)));
        assert_eq!(classify(sys::ibv_event_type_IBV_EVENT_PORT_ERR), AsyncKind::Port { up: false, what: "PORT_ERR" });
        assert!(matches!(classify(sys::ibv_event_type_IBV_EVENT_PORT_ACTIVE), AsyncKind::Port { up: true, .. }));
        assert!(matches!(classify(sys::ibv_event_type_IBV_EVENT_CQ_ERR), AsyncKind::Fatal(_)));
        assert!(matches!(classify(sys::ibv_event_type_IBV_EVENT_DEVICE_FATAL), AsyncKind::Fatal(_)));
        // COMM_EST is not a failure, and an event type newer than our
        // headers is not either.
        assert!(matches!(classify(sys::ibv_event_type_IBV_EVENT_COMM_EST), AsyncKind::Other(_)));
        assert_eq!(classify(999), AsyncKind::Other("unknown"));
    }
}
