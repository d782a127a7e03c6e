//! Which transport an engine runs on.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// The provider an engine is asked to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Provider {
    /// The best available: `efa`, then `verbs` (ConnectX), then `tcp`.
    #[default]
    Auto,
    /// AWS EFA through libfabric's `efa` provider (SRD: reliable, unordered).
    Efa,
    /// libfabric `tcp` (as `tcp;ofi_rxm`): any Ethernet, and loopback.
    Tcp,
    /// libfabric `shm`: processes on one host.
    Shm,
    /// NVIDIA ConnectX (InfiniBand or RoCE) through libibverbs, RC queue
    /// pairs; tuned with [`VerbsConfig`](crate::VerbsConfig).
    Verbs,
}

/// Which of the efa provider's two fabrics an EFA engine opens
/// ([`EngineBuilder::efa_fabric`](crate::EngineBuilder::efa_fabric)).
///
/// libfabric 2.1 and later list both for every EFA device, `efa-direct`
/// first, under the same domain names: strait names the one it wants in its
/// `fi_getinfo` hints (`fabric_attr->name`) instead of taking whichever comes
/// first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EfaFabric {
    /// `efa` (the default): the provider's RDM protocol over the device.
    /// Peers find each other through its handshake (a target need not know
    /// the initiator beforehand), messages of any size up to the receive
    /// buffers, RMA by the device where it has RDMA (with API 1.18, which
    /// strait asks for where the library has it) and emulated where it
    /// has not. What Perplexity's fabric-lib and NCCL's plugin run on.
    #[default]
    Efa,
    /// `efa-direct` (libfabric 2.1+): work requests straight to the device,
    /// no protocol layer, progress in hardware; needs RDMA-write hardware
    /// (p5 and later). Its constraints, which the engine handles: an RMA
    /// target must know the initiator (the engine introduces itself with a
    /// hello message, answered, before its first write or read to a peer),
    /// and a message must fit the device's MTU (about 8 KiB: larger sends
    /// are refused with [`Error::InvalidRequest`](crate::Error)).
    EfaDirect,
}

impl EfaFabric {
    /// The fabric's name in libfabric (`fabric_attr->name`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Efa => "efa",
            Self::EfaDirect => "efa-direct",
        }
    }
}

impl FromStr for EfaFabric {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "efa" => Ok(Self::Efa),
            "efa-direct" | "efa_direct" => Ok(Self::EfaDirect),
            other => Err(Error::InvalidRequest(format!("unknown EFA fabric {other:?} (efa, efa-direct)"))),
        }
    }
}

/// The provider family an engine actually runs on, carried in addresses and
/// descriptors so that mismatched peers are refused up front.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum ProviderKind {
    /// libfabric `efa`.
    Efa = 1,
    /// libfabric `tcp;ofi_rxm`.
    Tcp = 2,
    /// libfabric `shm`.
    Shm = 3,
    /// ibverbs RC (ConnectX).
    Verbs = 4,
}

impl ProviderKind {
    pub(crate) fn from_wire(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Efa),
            2 => Some(Self::Tcp),
            3 => Some(Self::Shm),
            4 => Some(Self::Verbs),
            _ => None,
        }
    }

    /// The libfabric provider name asked for in `fi_getinfo` hints (for
    /// verbs, which is not a libfabric provider here, its own name).
    pub(crate) fn fabric_name(self) -> &'static str {
        match self {
            Self::Efa => "efa",
            Self::Tcp => "tcp",
            Self::Shm => "shm",
            Self::Verbs => "verbs",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Auto => "auto",
            Provider::Efa => "efa",
            Provider::Tcp => "tcp",
            Provider::Shm => "shm",
            Provider::Verbs => "verbs",
        })
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.fabric_name())
    }
}

impl FromStr for Provider {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "efa" => Ok(Self::Efa),
            "tcp" => Ok(Self::Tcp),
            "shm" => Ok(Self::Shm),
            "verbs" => Ok(Self::Verbs),
            other => Err(Error::InvalidRequest(format!("unknown provider {other:?} (auto, efa, verbs, tcp, shm)"))),
        }
    }
}
