//! The ConnectX backend: ibverbs RC queue pairs (InfiniBand and RoCE).
//!
//! Per NIC (one device port, opened as its own context): a protection
//! domain, one completion queue (with a completion channel for adaptive
//! polling), a shared receive queue that the engine keeps stocked with its
//! message buffers, a second one of a few thousand zero-length receives
//! that RDMA writes with immediate consume (`imm_recv`), and one UD queue
//! pair that carries the connection handshake. Per peer NIC: two RC queue
//! pairs (writes and reads on the immediate SRQ; sends on the message
//! SRQ), created on first use, and retired by draining rather than
//! destroyed outright (`drain`). See [`nic`] for the connection protocol,
//! failure handling and the known limits (`delivery_complete` for GPU
//! targets).
//!
//! The engine address of a verbs NIC is its port's LID and GID, its UD QPN
//! and a nonce ([`wire::NicAddr`]); nothing besides the engine address the
//! user already exchanges is needed to connect. A verbs engine only talks to
//! verbs engines: addresses carry the provider, and a peer on EFA or tcp is
//! refused when a request names it.

mod config;
mod conn;
mod device;
mod drain;
mod events;
mod gid;
mod imm_recv;
mod nic;
mod qp;
mod sendq;
mod wire;

use verbs_sys as sys;

pub use self::config::VerbsConfig;
pub(crate) use self::device::probe;
pub(crate) use self::nic::VerbsNic;

use crate::error::Result;

/// How a group of verbs NICs is opened.
#[derive(Clone, Debug)]
pub(crate) struct VerbsOptions {
    pub config: VerbsConfig,
    /// Create a completion channel (adaptive polling) or not (busy).
    pub wait_fd: bool,
    /// Receive buffers the engine will post per NIC (the SRQ's depth).
    pub rx_slots: usize,
}

/// Opens `count` NICs on the configured (or every active) device, NIC `i`
/// on device `i % devices`.
pub(crate) fn open_group(options: &VerbsOptions, count: usize) -> Result<Vec<VerbsNic>> {
    options.config.validate().map_err(crate::Error::InvalidRequest)?;
    let lib = device::library()?;
    device::with_devices(lib, |devices| {
        let mut usable = Vec::new();
        let mut reasons = Vec::new();
        let wanted = &options.config.devices;
        for &d in devices {
            let name = device::name(lib, d);
            if !wanted.is_empty() && !wanted.contains(&name) {
                continue;
            }
            match device::Context::open(lib, d)
                .and_then(|c| c.port_attr(options.config.port).map(|a| (c, a)))
                .map(|(_, a)| a.state == sys::ibv_port_state_IBV_PORT_ACTIVE)
            {
                Ok(true) => usable.push((name, d)),
                Ok(false) => reasons.push(format!("{name}: port {} is not active", options.config.port)),
                Err(e) => reasons.push(format!("{name}: {e}")),
            }
        }
        if !wanted.is_empty() {
            // Keep the user's order.
            usable.sort_by_key(|(n, _)| wanted.iter().position(|w| w == n));
            for w in wanted {
                if !usable.iter().any(|(n, _)| n == w) && !reasons.iter().any(|r| r.starts_with(w.as_str())) {
                    reasons.push(format!("{w}: no such device"));
                }
            }
        }
        if usable.is_empty() {
            return Err(device::unavailable(format!("no usable verbs device ({})", reasons.join("; "))));
        }
        (0..count)
            .map(|i| {
                let (name, d) = &usable[i % usable.len()];
                tracing::debug!(nic = i, device = %name, "opening verbs NIC");
                VerbsNic::open(lib, *d, options, i)
            })
            .collect()
    })
}
