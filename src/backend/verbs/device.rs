//! Finding verbs devices and reading what a port offers.

use std::ffi::CStr;
use std::ptr;

use verbs_sys as sys;

use super::gid::{select_gid, GidEntry, GidType};
use super::wire::{format_gid, mtu_bytes};
use crate::error::{Error, Result};

/// The library, or why the verbs backend is unavailable.
pub(crate) fn library() -> Result<&'static sys::Library> {
    sys::Library::get().map_err(|e| unavailable(e.to_string()))
}

pub(crate) fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable { backend: "verbs", reason: reason.into() }
}

/// An errno-style failure of a verbs call.
pub(crate) fn verbs_error(call: &'static str, errno: i32) -> Error {
    Error::Verbs { call, errno }
}

/// The last OS error number (verbs calls that return null set errno).
pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Runs `f` over the device list, freeing it afterwards.
pub(crate) fn with_devices<T>(lib: &sys::Library, f: impl FnOnce(&[*mut sys::ibv_device]) -> Result<T>) -> Result<T> {
    let mut count = 0;
    // SAFETY: count is a valid out-pointer; the list is freed below.
    let list = unsafe { (lib.ibv_get_device_list)(&mut count) };
    if list.is_null() {
        let e = errno();
        return Err(unavailable(if e == libc::ENOSYS {
            "no verbs devices: this kernel has no RDMA support (ibv_get_device_list: ENOSYS)".to_string()
        } else {
            format!("no verbs devices: ibv_get_device_list failed: {}", std::io::Error::from_raw_os_error(e))
        }));
    }
    // SAFETY: libibverbs returned `count` device pointers at `list`.
    let devices = unsafe { std::slice::from_raw_parts(list, count.max(0) as usize) };
    let result = if devices.is_empty() {
        Err(unavailable("no verbs devices found (no ConnectX, EFA or SoftRoCE device under /sys/class/infiniband)"))
    } else {
        f(devices)
    };
    // SAFETY: list came from ibv_get_device_list and is freed once; devices
    // opened from it stay valid after the list is freed.
    unsafe { (lib.ibv_free_device_list)(list) };
    result
}

pub(crate) fn name(lib: &sys::Library, device: *mut sys::ibv_device) -> String {
    // SAFETY: device is from the live list; the name is a NUL-terminated
    // string inside the device structure.
    unsafe {
        let s = (lib.ibv_get_device_name)(device);
        if s.is_null() {
            "?".into()
        } else {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        }
    }
}

/// An open device context, closed on drop.
pub(crate) struct Context {
    pub lib: &'static sys::Library,
    pub ptr: *mut sys::ibv_context,
    pub name: String,
}

impl Context {
    pub(crate) fn open(lib: &'static sys::Library, device: *mut sys::ibv_device) -> Result<Self> {
        let name = name(lib, device);
        // SAFETY: device is from a live device list.
        let ptr = unsafe { (lib.ibv_open_device)(device) };
        if ptr.is_null() {
            return Err(verbs_error("ibv_open_device", errno()));
        }
        Ok(Context { lib, ptr, name })
    }

    pub(crate) fn device_attr(&self) -> Result<sys::ibv_device_attr> {
        // SAFETY: plain data; all-zero valid.
        let mut attr: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open; attr is a valid out-buffer.
        let rc = unsafe { (self.lib.ibv_query_device)(self.ptr, &mut attr) };
        if rc != 0 {
            return Err(verbs_error("ibv_query_device", rc));
        }
        Ok(attr)
    }

    pub(crate) fn port_attr(&self, port: u8) -> Result<sys::ibv_port_attr> {
        // Room past the end, in case a library's compat prefix is longer
        // than this crate's `ibv_port_attr` (none is today).
        #[repr(C)]
        struct Padded {
            attr: sys::ibv_port_attr,
            _spare: [u8; 256],
        }
        // SAFETY: plain data; all-zero valid.
        let mut padded: Padded = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open; the exported call writes the compat
        // layout only (rdma-core verbs.c copies that prefix), which is a
        // prefix of the zeroed full structure we pass, so the fields after
        // it stay zero (strait reads none of them).
        let rc = unsafe { (self.lib.ibv_query_port)(self.ptr, port, ptr::from_mut(&mut padded.attr).cast()) };
        if rc != 0 {
            return Err(verbs_error("ibv_query_port", rc));
        }
        Ok(padded.attr)
    }

    /// The port's GID table (non-empty entries), with each entry's type.
    pub(crate) fn gid_table(&self, port: u8, attr: &sys::ibv_port_attr, roce: bool) -> Vec<GidEntry> {
        let len = attr.gid_tbl_len.clamp(0, 256);
        let mut table = Vec::new();
        for index in 0..len {
            // SAFETY: plain data; all-zero valid.
            let mut entry: sys::ibv_gid_entry = unsafe { std::mem::zeroed() };
            // SAFETY: the context is open; entry is a valid out-buffer.
            let rc =
                unsafe { sys::ops::ibv_query_gid_ex(self.lib, self.ptr, port.into(), index as u32, &mut entry, 0) };
            let (gid, kind) = if rc == 0 {
                // SAFETY: the library wrote the GID.
                let gid = unsafe { entry.gid.raw };
                let kind = match entry.gid_type {
                    sys::ibv_gid_type_IBV_GID_TYPE_ROCE_V2 => GidType::RoceV2,
                    sys::ibv_gid_type_IBV_GID_TYPE_ROCE_V1 => GidType::RoceV1,
                    _ => GidType::Ib,
                };
                (gid, kind)
            } else if rc == libc::EOPNOTSUPP {
                // libibverbs before rdma-core 32: the GID, with its type
                // from sysfs.
                // SAFETY: plain data; all-zero valid.
                let mut gid: sys::ibv_gid = unsafe { std::mem::zeroed() };
                // SAFETY: the context is open; gid is a valid out-buffer.
                if unsafe { (self.lib.ibv_query_gid)(self.ptr, port, index, &mut gid) } != 0 {
                    continue;
                }
                // SAFETY: the library wrote the GID.
                (unsafe { gid.raw }, self.sysfs_gid_type(port, index, roce))
            } else {
                continue; // empty entry (ENODATA) or unreadable
            };
            table.push(GidEntry { index: index as u8, gid, kind });
        }
        table
    }

    fn sysfs_gid_type(&self, port: u8, index: i32, roce: bool) -> GidType {
        let path = format!("/sys/class/infiniband/{}/ports/{port}/gid_attrs/types/{index}", self.name);
        match std::fs::read_to_string(path) {
            Ok(s) if s.trim().eq_ignore_ascii_case("RoCE v2") => GidType::RoceV2,
            _ if roce => GidType::RoceV1,
            _ => GidType::Ib,
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: opened in `open`, closed once, after everything created
        // from it (the owner drops those first).
        unsafe { (self.lib.ibv_close_device)(self.ptr) };
    }
}

/// What `strait-bench info` shows for one device's port.
pub(crate) fn describe_port(ctx: &Context, port: u8, gid_index: Option<u8>) -> std::result::Result<String, String> {
    let attr = ctx.port_attr(port).map_err(|e| e.to_string())?;
    if attr.state != sys::ibv_port_state_IBV_PORT_ACTIVE {
        return Err(format!("port {port} is not active (state {})", attr.state));
    }
    let roce = u32::from(attr.link_layer) == sys::IBV_LINK_LAYER_ETHERNET;
    let table = ctx.gid_table(port, &attr, roce);
    let gid = select_gid(&table, roce, gid_index)?;
    Ok(format!(
        "{} port {port}: {}, gid {} {} ({:?}), lid {}, mtu {}",
        ctx.name,
        if roce { "RoCE" } else { "InfiniBand" },
        gid.index,
        format_gid(&gid.gid),
        gid.kind,
        attr.lid,
        mtu_bytes(attr.active_mtu as u8).unwrap_or(0)
    ))
}

/// Every port of every device, or why the backend is unavailable.
pub(crate) fn probe() -> std::result::Result<Vec<(String, String)>, String> {
    let lib = library().map_err(|e| e.to_string())?;
    with_devices(lib, |devices| {
        let mut out = Vec::new();
        for &d in devices {
            let unusable = |why: String| ("verbs".to_string(), format!("{} unusable: {why}", name(lib, d)));
            let ctx = match Context::open(lib, d) {
                Ok(c) => c,
                Err(e) => {
                    out.push(unusable(e.to_string()));
                    continue;
                }
            };
            let ports = ctx.device_attr().map_or(1, |a| a.phys_port_cnt.max(1));
            for port in 1..=ports {
                out.push(describe_port(&ctx, port, None).map_or_else(unusable, |s| ("verbs".to_string(), s)));
            }
        }
        Ok(out)
    })
    .map_err(|e| match e {
        Error::BackendUnavailable { reason, .. } => reason,
        other => other.to_string(),
    })
}
