//! `include/strait.h` is what cbindgen generates from the crate now.
//! `STRAIT_BLESS=1 cargo test -p strait-ffi --test header` rewrites it.

use std::path::Path;

#[test]
fn header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("ffi/cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header")
        .write(&mut generated);
    let path = dir.join("include/strait.h");
    if std::env::var_os("STRAIT_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "ffi/include/strait.h is stale: regenerate it with `STRAIT_BLESS=1 cargo test -p strait-ffi --test header` and commit it"
    );
}
