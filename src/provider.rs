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
