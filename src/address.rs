//! `EngineAddress`: how a peer reaches every NIC of an engine.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::provider::ProviderKind;
use crate::wire::{self, Reader};

const MAGIC: &[u8; 3] = b"STA";
const VERSION: u8 = 1;

/// The addresses of all NICs of one engine, as one value.
///
/// Exchange it out of band (a side channel, `torch.distributed`, a config
/// service) as bytes ([`to_bytes`](Self::to_bytes) /
/// [`from_bytes`](Self::from_bytes)) or as a printable hex string
/// (`Display` / `FromStr`). Cheap to clone.
///
/// Encoding (version 1): `"STA" 1`, provider byte, NIC count (1..=16), then
/// per NIC a length byte (1..=64) and the provider's raw address.
#[derive(Clone)]
pub struct EngineAddress {
    inner: Arc<Inner>,
}

struct Inner {
    /// The canonical encoding: it determines everything else, so equality
    /// and hashing use it alone.
    encoded: Box<[u8]>,
    /// FNV-1a of `encoded`, computed once: the worker looks peers up by
    /// address for every request, and hashing the whole encoding each time
    /// showed in the submit profile.
    hash: u64,
    provider: ProviderKind,
    nics: Vec<Box<[u8]>>,
}

impl PartialEq for EngineAddress {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
            || (self.inner.hash == other.inner.hash && self.inner.encoded == other.inner.encoded)
    }
}

impl Eq for EngineAddress {}

impl std::hash::Hash for EngineAddress {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.inner.hash);
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

impl EngineAddress {
    pub(crate) fn new(provider: ProviderKind, nics: Vec<Box<[u8]>>) -> Self {
        let mut encoded = Vec::with_capacity(6 + nics.iter().map(|n| n.len() + 1).sum::<usize>());
        encoded.extend_from_slice(MAGIC);
        encoded.push(VERSION);
        encoded.push(provider as u8);
        encoded.push(nics.len() as u8);
        for nic in &nics {
            wire::put_nic_address(&mut encoded, nic);
        }
        let hash = fnv1a(&encoded);
        EngineAddress { inner: Arc::new(Inner { encoded: encoded.into(), hash, provider, nics }) }
    }

    /// Decodes and validates an address received from another process.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "engine address");
        let (provider, nics) = Self::read(&mut r)?;
        r.finish()?;
        Ok(Self::new(provider, nics))
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<(ProviderKind, Vec<Box<[u8]>>)> {
        r.header(MAGIC, VERSION)?;
        let provider = ProviderKind::from_wire(r.u8("provider")?).ok_or_else(|| r.error("unknown provider"))?;
        let count = r.nic_count()?;
        let nics = (0..count).map(|_| r.nic_address()).collect::<Result<Vec<_>>>()?;
        Ok((provider, nics))
    }

    /// The canonical byte encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.inner.encoded.to_vec()
    }

    pub(crate) fn encoded(&self) -> &[u8] {
        &self.inner.encoded
    }

    /// The provider family the engine runs on.
    pub fn provider(&self) -> ProviderKind {
        self.inner.provider
    }

    /// Number of NICs in the engine's group.
    pub fn nic_count(&self) -> usize {
        self.inner.nics.len()
    }

    /// The raw provider address of NIC `index`.
    pub fn nic(&self, index: usize) -> &[u8] {
        &self.inner.nics[index]
    }
}

impl fmt::Display for EngineAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&wire::to_hex(&self.inner.encoded))
    }
}

impl fmt::Debug for EngineAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EngineAddress({:?} x{}, {self})", self.inner.provider, self.nic_count())
    }
}

impl FromStr for EngineAddress {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bytes = wire::from_hex(s)
            .ok_or_else(|| Error::InvalidDescriptor { what: "engine address", reason: "not a hex string".into() })?;
        Self::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_string_round_trip() {
        let a = EngineAddress::new(ProviderKind::Tcp, vec![vec![1; 16].into(), vec![2; 16].into()]);
        assert_eq!(EngineAddress::from_bytes(&a.to_bytes()).unwrap(), a);
        let s = a.to_string();
        assert_eq!(s.parse::<EngineAddress>().unwrap(), a);
        assert_eq!(a.nic_count(), 2);
        assert_eq!(a.nic(1), &[2; 16]);
        assert!("zz".parse::<EngineAddress>().is_err());
        assert!("abc".parse::<EngineAddress>().is_err());
        let bytes = a.to_bytes();
        for cut in 0..bytes.len() {
            assert!(EngineAddress::from_bytes(&bytes[..cut]).is_err());
        }
    }
}
