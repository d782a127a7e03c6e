//! What a user can tune about the verbs backend.

use std::time::Duration;

/// Settings of the ConnectX (ibverbs RC) backend, passed with
/// [`EngineBuilder::verbs`](crate::EngineBuilder::verbs). The defaults suit
/// a ConnectX-6/7 fabric (InfiniBand or RoCE v2) as NCCL and most RDMA
/// libraries configure it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerbsConfig {
    /// Devices to use, by name (`mlx5_0`, ...), in order: NIC `i` of the
    /// engine opens `devices[i % len]`. Empty (the default): every device
    /// with an active port, in the order libibverbs lists them.
    pub devices: Vec<String>,
    /// Port number on each device (default 1).
    pub port: u8,
    /// GID index to send from. `None` (the default): GID 0 on InfiniBand;
    /// on RoCE the IPv4-mapped RoCE v2 GID, then another RoCE v2 GID, then
    /// RoCE v1.
    pub gid_index: Option<u8>,
    /// Upper bound on the path MTU in bytes (256..=4096). The path MTU is
    /// the smallest of this, the local port's and the peer port's active
    /// MTU. `None` (the default): no bound of our own.
    pub max_mtu: Option<u32>,
    /// Local ACK timeout exponent: 4.096 µs × 2^timeout per try (default
    /// 16, about 268 ms; 0 means wait forever, which strait refuses).
    pub ack_timeout: u8,
    /// Transport retries before a work request fails with "retry exceeded"
    /// (0..=7, default 7). With the default timeout a dead peer is detected
    /// after about 2 s.
    pub retry_count: u8,
    /// Retries when the peer has no receive buffer posted (0..=7; 7, the
    /// default, retries forever).
    ///
    /// Unlimited is deliberate: an RNR NAK means the peer is alive but has
    /// not restocked its receives yet (it stalled, or is busy between
    /// polls). Immediates have their own receive queue of thousands of
    /// entries, so that happens only to a stalled target, and a finite
    /// count would turn a pause of a few milliseconds (at most 6 retries
    /// at the default 0.64 ms timer) into a broken connection with every
    /// request on it failed. The bound comes from the engine instead:
    /// requests that make no progress expire after their timeout, and the
    /// engine then resets the peer, which moves the queue pairs to the
    /// error state so the stuck work flushes. pplx-garden's fabric-lib uses
    /// 7 as well (verbs_qp.rs, RTS attributes).
    pub rnr_retry: u8,
    /// Receive-not-ready timer we ask peers to wait (verbs code 0..=31,
    /// default 12: 0.64 ms).
    pub min_rnr_timer: u8,
    /// Traffic class (RoCE: DSCP << 2 | ECN) of our packets (default 0).
    pub traffic_class: u8,
    /// Service level (InfiniBand; RoCE priority through the SL-to-PCP
    /// mapping) (default 0).
    pub service_level: u8,
    /// Payload bytes written inline in the work request, when the device
    /// allows that many (default 64; 0 disables inline sends).
    pub max_inline: u32,
    /// Register memory with `IBV_ACCESS_RELAXED_ORDERING` where the device
    /// and library support it (default true; PCIe relaxed ordering helps
    /// GPU memory on ConnectX-6 and later, and is ignored where
    /// unsupported).
    pub relaxed_ordering: bool,
    /// Work requests in flight per peer queue pair (default 1024, capped by
    /// the device).
    pub send_queue_depth: u32,
    /// How long a connection handshake may go unanswered before the
    /// requests waiting on it fail with `PeerUnreachable` (default 10 s).
    /// Handshake messages are resent after 50 ms, doubling up to 1 s.
    pub connect_timeout: Duration,
}

impl Default for VerbsConfig {
    fn default() -> Self {
        VerbsConfig {
            devices: Vec::new(),
            port: 1,
            gid_index: None,
            max_mtu: None,
            ack_timeout: 16,
            retry_count: 7,
            rnr_retry: 7,
            min_rnr_timer: 12,
            traffic_class: 0,
            service_level: 0,
            max_inline: 64,
            relaxed_ordering: true,
            send_queue_depth: 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl VerbsConfig {
    /// Checks ranges the verbs API would reject later, with a clear message.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.port == 0 {
            return Err("verbs port numbers start at 1".into());
        }
        if let Some(mtu) = self.max_mtu {
            if mtu_code(mtu).is_none() {
                return Err(format!("max_mtu {mtu} is not one of 256, 512, 1024, 2048, 4096"));
            }
        }
        if self.ack_timeout == 0 || self.ack_timeout > 31 {
            return Err(format!("ack_timeout {} is outside 1..=31", self.ack_timeout));
        }
        if self.retry_count > 7 || self.rnr_retry > 7 {
            return Err("retry_count and rnr_retry are 3-bit values (0..=7)".into());
        }
        if self.min_rnr_timer > 31 {
            return Err(format!("min_rnr_timer {} is outside 0..=31", self.min_rnr_timer));
        }
        if self.send_queue_depth < 16 {
            return Err("send_queue_depth must be at least 16".into());
        }
        Ok(())
    }
}

/// The verbs code of an MTU in bytes (256 → 1 ... 4096 → 5).
pub(crate) fn mtu_code(bytes: u32) -> Option<u8> {
    (1..=5u8).find(|&c| 128u32 << c == bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_ranges_checked() {
        assert_eq!(VerbsConfig::default().validate(), Ok(()));
        let bad = [
            VerbsConfig { port: 0, ..Default::default() },
            VerbsConfig { max_mtu: Some(1500), ..Default::default() },
            VerbsConfig { ack_timeout: 0, ..Default::default() },
            VerbsConfig { retry_count: 8, ..Default::default() },
            VerbsConfig { min_rnr_timer: 32, ..Default::default() },
            VerbsConfig { send_queue_depth: 4, ..Default::default() },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
        assert_eq!(mtu_code(4096), Some(5));
        assert_eq!(mtu_code(256), Some(1));
        assert_eq!(mtu_code(9000), None);
    }
}
