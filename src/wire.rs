//! The compact binary encoding shared by engine addresses and memory
//! descriptors: little-endian integers, length-prefixed byte strings, and a
//! reader that turns every shortfall into an error instead of a panic.

use crate::error::{Error, Result};

/// Most NICs a group may have (and so a descriptor may name).
pub const MAX_NICS: usize = 16;
/// Longest NIC address accepted (EFA's raw address is 32 bytes, a tcp
/// sockaddr_in6 28, shm's name about 20).
pub const MAX_NIC_ADDRESS_LEN: usize = 64;

/// Reads a byte string produced by another process, checking every step.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, what }
    }

    pub(crate) fn error(&self, reason: impl Into<String>) -> Error {
        Error::InvalidDescriptor { what: self.what, reason: reason.into() }
    }

    pub(crate) fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(self.error(format!("truncated at {field}")));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// Everything not read yet, consumed.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    pub(crate) fn u8(&mut self, field: &str) -> Result<u8> {
        Ok(self.take(1, field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &str) -> Result<u16> {
        let b = self.take(2, field)?;
        Ok(u16::from_le_bytes(b.try_into().expect("2 bytes")))
    }

    pub(crate) fn u32(&mut self, field: &str) -> Result<u32> {
        let b = self.take(4, field)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    /// A byte string with a `u32` length prefix of at most `max` bytes.
    pub(crate) fn bytes(&mut self, max: usize, field: &str) -> Result<&'a [u8]> {
        let n = self.u32(field)? as usize;
        if n > max {
            return Err(self.error(format!("{field}: {n} bytes, more than {max}")));
        }
        self.take(n, field)
    }

    /// A list of `u32`s with a `u32` count prefix of at most `max`.
    pub(crate) fn u32s(&mut self, max: usize, field: &str) -> Result<Vec<u32>> {
        let n = self.u32(field)? as usize;
        if n > max {
            return Err(self.error(format!("{field}: {n} entries, more than {max}")));
        }
        let b = self.take(n * 4, field)?;
        Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    }

    pub(crate) fn u64(&mut self, field: &str) -> Result<u64> {
        let b = self.take(8, field)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// Checks the 4-byte header: 3 magic bytes then the version.
    pub(crate) fn header(&mut self, magic: &[u8; 3], version: u8) -> Result<()> {
        let head = self.take(4, "header")?;
        if &head[..3] != magic {
            return Err(self.error("bad magic"));
        }
        if head[3] != version {
            return Err(self.error(format!("unsupported version {} (expected {version})", head[3])));
        }
        Ok(())
    }

    /// A NIC count in `1..=MAX_NICS`.
    pub(crate) fn nic_count(&mut self) -> Result<usize> {
        let n = self.u8("nic count")? as usize;
        if n == 0 || n > MAX_NICS {
            return Err(self.error(format!("nic count {n} not in 1..={MAX_NICS}")));
        }
        Ok(n)
    }

    /// A NIC address: one length byte in `1..=MAX_NIC_ADDRESS_LEN`, then bytes.
    pub(crate) fn nic_address(&mut self) -> Result<Box<[u8]>> {
        let len = self.u8("address length")? as usize;
        if len == 0 || len > MAX_NIC_ADDRESS_LEN {
            return Err(self.error(format!("address length {len} not in 1..={MAX_NIC_ADDRESS_LEN}")));
        }
        Ok(self.take(len, "address")?.into())
    }

    pub(crate) fn finish(self) -> Result<()> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(self.error(format!("{} trailing bytes", self.bytes.len())))
        }
    }
}

/// Appends a byte string with a `u32` length prefix (read by
/// [`Reader::bytes`]).
pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Appends a `u32` list with a count prefix (read by [`Reader::u32s`]).
pub(crate) fn put_u32s(out: &mut Vec<u8>, values: &[u32]) {
    out.extend_from_slice(&(values.len() as u32).to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub(crate) fn put_nic_address(out: &mut Vec<u8>, addr: &[u8]) {
    debug_assert!(!addr.is_empty() && addr.len() <= MAX_NIC_ADDRESS_LEN);
    out.push(addr.len() as u8);
    out.extend_from_slice(addr);
}

/// Lower-case hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses hex (either case); `None` on odd length or a non-hex digit.
pub(crate) fn from_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.chunks(2).map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?)).collect()
}
