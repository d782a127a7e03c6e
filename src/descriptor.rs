//! `MrDesc`: the remote view of a registered region.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::address::EngineAddress;
use crate::error::{Error, Result};
use crate::provider::ProviderKind;
use crate::wire::{self, Reader};

const MAGIC: &[u8; 3] = b"STD";
const VERSION: u8 = 1;

const FLAG_REMOTE_WRITE: u8 = 1;
const FLAG_REMOTE_READ: u8 = 2;
/// Device memory its owner stages through host buffers (see
/// [`MrDesc::is_staged`]).
const FLAG_STAGED: u8 = 4;
/// Host memory whose owner serves packed transfers of small runs (see
/// [`MrDesc::is_packed`]).
const FLAG_PACKED: u8 = 8;
const KNOWN_FLAGS: u8 = FLAG_REMOTE_WRITE | FLAG_REMOTE_READ | FLAG_STAGED | FLAG_PACKED;

/// What a region lets peers do. Local use (source of writes and sends,
/// destination of reads and receives) is always allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Access {
    /// Peers may write into the region (and deliver immediates through it).
    pub remote_write: bool,
    /// Peers may read from the region.
    pub remote_read: bool,
}

impl Access {
    /// Local use only: no peer can touch the region.
    pub const LOCAL: Access = Access { remote_write: false, remote_read: false };
    /// Peers may write.
    pub const REMOTE_WRITE: Access = Access { remote_write: true, remote_read: false };
    /// Peers may read.
    pub const REMOTE_READ: Access = Access { remote_write: false, remote_read: true };
    /// Peers may read and write.
    pub const REMOTE_READ_WRITE: Access = Access { remote_write: true, remote_read: true };

    fn flags(self) -> u8 {
        (self.remote_write as u8 * FLAG_REMOTE_WRITE) | (self.remote_read as u8 * FLAG_REMOTE_READ)
    }
}

/// The remote view of a [`MemoryRegion`](crate::MemoryRegion): who owns it
/// (the owner's [`EngineAddress`]), where it starts, how long it is, and the
/// key of each of the owner's NICs.
///
/// Send it to peers as bytes ([`to_bytes`](Self::to_bytes)); a peer decodes it
/// with [`from_bytes`](Self::from_bytes), which validates everything, and then
/// writes into or reads from it. Cheap to clone.
///
/// Holding a descriptor grants what the region's [`Access`] says to anyone
/// who can reach the owner's NICs, until the owner drops the region.
///
/// Encoding (version 1): `"STD" 1`, flags byte (bit 0 remote write, bit 1
/// remote read, bit 2 staged device memory, bit 3 packed transfers
/// served: new with packing, and refused by the decoders of earlier
/// releases, like every unknown bit; the engines of a job run one strait
/// release), base address (u64 LE; the owner's virtual address when its
/// provider addresses regions by virtual address, else 0), length (u64 LE),
/// then the owner's engine address (as [`EngineAddress`] encodes it) and one
/// key (u64 LE) per NIC of that address.
#[derive(Clone, PartialEq, Eq)]
pub struct MrDesc {
    inner: Arc<Inner>,
}

#[derive(PartialEq, Eq)]
struct Inner {
    access: Access,
    staged: bool,
    packed: bool,
    base: u64,
    len: u64,
    owner: EngineAddress,
    keys: Vec<u64>,
}

impl MrDesc {
    pub(crate) fn new(owner: EngineAddress, base: u64, len: u64, access: Access, keys: Vec<u64>) -> Self {
        Self::with_staging(owner, base, len, access, keys, false)
    }

    /// A descriptor of host memory whose owner's packer serves packed
    /// transfers of small runs into and out of it (`packed`).
    pub(crate) fn with_packing(
        owner: EngineAddress,
        base: u64,
        len: u64,
        access: Access,
        keys: Vec<u64>,
        packed: bool,
    ) -> Self {
        let mut d = Self::new(owner, base, len, access, keys);
        Arc::get_mut(&mut d.inner).expect("just made").packed = packed;
        d
    }

    /// A descriptor of device memory the owner stages (`staged`), or of
    /// memory its NICs reach.
    pub(crate) fn with_staging(
        owner: EngineAddress,
        base: u64,
        len: u64,
        access: Access,
        keys: Vec<u64>,
        staged: bool,
    ) -> Self {
        debug_assert_eq!(keys.len(), owner.nic_count());
        MrDesc { inner: Arc::new(Inner { access, staged, packed: false, base, len, owner, keys }) }
    }

    /// Device memory that the owner's NICs cannot reach (a transport
    /// without GPUDirect, such as libfabric tcp and shm): writes into it and
    /// reads from it go through the owner's staging buffers (see
    /// [`TransferEngine::register_device`](crate::TransferEngine::register_device)).
    /// Only contiguous writes and reads (`write`, `write_imm`, `read`) take
    /// such a descriptor.
    pub fn is_staged(&self) -> bool {
        self.inner.staged
    }

    /// Host memory whose owner takes packed transfers: on transports whose
    /// cost is per operation (libfabric tcp and shm), strided copies and
    /// paged writes of short runs into (or reads out of) this region are
    /// gathered into the writer's staging buffers and moved in one
    /// operation per chunk, and the owner scatters them (see
    /// [`EngineBuilder::packing`](crate::EngineBuilder::packing)). The
    /// owner's engine sets it on regions with remote access when its NICs
    /// gain from packing.
    pub fn is_packed(&self) -> bool {
        self.inner.packed
    }

    /// Decodes a descriptor received from another process. Every field is
    /// checked: header, flags, address, that `base + len` does not overflow,
    /// one key per NIC, and no trailing bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "memory descriptor");
        r.header(MAGIC, VERSION)?;
        let flags = r.u8("flags")?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(r.error(format!("unknown flags {flags:#x}")));
        }
        if flags & FLAG_STAGED != 0 && flags & FLAG_PACKED != 0 {
            return Err(r.error("staged and packed at once"));
        }
        let base = r.u64("base")?;
        let len = r.u64("length")?;
        if base.checked_add(len).is_none() {
            return Err(r.error("base + length overflows"));
        }
        let (provider, nics) = EngineAddress::read(&mut r)?;
        let keys = (0..nics.len()).map(|_| r.u64("key")).collect::<Result<Vec<_>>>()?;
        r.finish()?;
        let access =
            Access { remote_write: flags & FLAG_REMOTE_WRITE != 0, remote_read: flags & FLAG_REMOTE_READ != 0 };
        let (staged, packed) = (flags & FLAG_STAGED != 0, flags & FLAG_PACKED != 0);
        let mut d = Self::with_staging(EngineAddress::new(provider, nics), base, len, access, keys, staged);
        Arc::get_mut(&mut d.inner).expect("just made").packed = packed;
        Ok(d)
    }

    /// The canonical byte encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let owner = self.inner.owner.encoded();
        let mut out = Vec::with_capacity(4 + 1 + 16 + owner.len() + 8 * self.inner.keys.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        let mode = if self.inner.staged {
            FLAG_STAGED
        } else if self.inner.packed {
            FLAG_PACKED
        } else {
            0
        };
        out.push(self.inner.access.flags() | mode);
        out.extend_from_slice(&self.inner.base.to_le_bytes());
        out.extend_from_slice(&self.inner.len.to_le_bytes());
        out.extend_from_slice(owner);
        for key in &self.inner.keys {
            out.extend_from_slice(&key.to_le_bytes());
        }
        out
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// True for a zero-length region (never produced by registration).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// What the owner allows.
    pub fn access(&self) -> Access {
        self.inner.access
    }

    /// The engine that owns the region.
    pub fn owner(&self) -> &EngineAddress {
        &self.inner.owner
    }

    /// The provider family of the owner.
    pub fn provider(&self) -> ProviderKind {
        self.inner.owner.provider()
    }

    /// Remote address of byte `offset` of the region (as the provider wants
    /// it: virtual address or offset).
    pub(crate) fn remote_addr(&self, offset: u64) -> u64 {
        self.inner.base + offset
    }

    /// The key for the owner's NIC `nic`.
    pub(crate) fn key(&self, nic: usize) -> u64 {
        self.inner.keys[nic]
    }

    /// Checks that `offset..offset+len` lies inside the region.
    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        check_range("destination", offset, len, self.inner.len)
    }
}

/// Checks that `offset..offset+len` lies inside a region of `region_len`.
pub(crate) fn check_range(side: &'static str, offset: u64, len: u64, region_len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= region_len => Ok(()),
        _ => Err(Error::OutOfBounds { side, offset, len, region_len }),
    }
}

impl fmt::Debug for MrDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MrDesc")
            .field("len", &self.inner.len)
            .field("access", &self.inner.access)
            .field("owner", &self.inner.owner)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for MrDesc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&wire::to_hex(&self.to_bytes()))
    }
}

/// Parses the hex form that `Display` prints, validating as
/// [`MrDesc::from_bytes`] does.
impl FromStr for MrDesc {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bytes = wire::from_hex(s)
            .ok_or_else(|| Error::InvalidDescriptor { what: "memory descriptor", reason: "not a hex string".into() })?;
        Self::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(nics: usize, addr_len: usize) -> MrDesc {
        let owner =
            EngineAddress::new(ProviderKind::Efa, (0..nics).map(|i| vec![i as u8 + 1; addr_len].into()).collect());
        MrDesc::new(
            owner,
            0x7f00_0000_1000,
            6 << 30,
            Access::REMOTE_READ_WRITE,
            (0..nics as u64).map(|k| k * 1000 + 7).collect(),
        )
    }

    #[test]
    fn round_trip() {
        for nics in [1, 2, 4, 16] {
            let d = sample(nics, 32);
            let back = MrDesc::from_bytes(&d.to_bytes()).unwrap();
            assert_eq!(back, d);
            assert_eq!(d.to_string().parse::<MrDesc>().unwrap(), d, "hex form round-trips");
            assert_eq!(back.len(), 6 << 30, "lengths above 4 GiB survive");
            assert_eq!(back.key(nics - 1), (nics as u64 - 1) * 1000 + 7);
            assert_eq!(back.remote_addr(10), 0x7f00_0000_1000 + 10);
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = sample(4, 19).to_bytes();
        for cut in 0..bytes.len() {
            assert!(
                matches!(MrDesc::from_bytes(&bytes[..cut]), Err(Error::InvalidDescriptor { .. })),
                "prefix of {cut} bytes accepted"
            );
        }
    }

    #[test]
    fn corrupt_fields_are_rejected() {
        let good = sample(2, 16).to_bytes();
        let reject = |mutate: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            mutate(&mut b);
            assert!(matches!(MrDesc::from_bytes(&b), Err(Error::InvalidDescriptor { .. })));
        };
        reject(&|b| b[0] = b'X'); // magic
        reject(&|b| b[3] = 2); // version
        reject(&|b| b[4] = 0x80); // unknown flag
        reject(&|b| b[5..13].copy_from_slice(&u64::MAX.to_le_bytes())); // base + len overflows
        reject(&|b| b.push(0)); // trailing byte
        reject(&|b| b[21] = b'Z'); // owner magic
        reject(&|b| b[25] = 99); // unknown provider
        reject(&|b| b[26] = 0); // zero NICs
        reject(&|b| b[26] = 17); // too many NICs
        reject(&|b| b[26] = 3); // more NICs than addresses and keys
        reject(&|b| b[27] = 0); // empty address
        reject(&|b| b[27] = 65); // oversized address
    }

    #[test]
    fn range_checks() {
        let d = sample(1, 16);
        assert!(d.check_range(0, 6 << 30).is_ok());
        assert!(d.check_range(1, 6 << 30).is_err());
        assert!(d.check_range(u64::MAX, 2).is_err());
        assert!(d.check_range(6 << 30, 0).is_ok());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = MrDesc::from_bytes(&bytes);
            let _ = EngineAddress::from_bytes(&bytes);
        }

        #[test]
        fn mutated_descriptors_never_panic_and_valid_ones_round_trip(
            nics in 1usize..=16, addr_len in 1usize..=64, flip in any::<(usize, u8)>()
        ) {
            let d = sample(nics, addr_len);
            let mut bytes = d.to_bytes();
            prop_assert_eq!(&MrDesc::from_bytes(&bytes).unwrap(), &d);
            let i = flip.0 % bytes.len();
            bytes[i] ^= flip.1 | 1;
            if let Ok(other) = MrDesc::from_bytes(&bytes) {
                // A change that still decodes must re-encode to itself.
                prop_assert_eq!(other.to_bytes(), bytes);
            }
        }
    }
}
