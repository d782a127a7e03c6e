//! Gives libstrait.so its soname: the major version of the C ABI.

fn main() {
    let target = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target == "linux" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libstrait.so.{}", env!("CARGO_PKG_VERSION_MAJOR"));
    }
}
