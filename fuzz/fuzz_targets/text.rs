//! The hex text forms (`str::parse` of `MrDesc` and `EngineAddress`, as
//! printed by `Display` and passed on command lines): never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(desc) = text.parse::<strait::MrDesc>() {
            assert_eq!(desc.to_string().parse::<strait::MrDesc>().unwrap(), desc);
        }
        if let Ok(address) = text.parse::<strait::EngineAddress>() {
            assert_eq!(address.to_string().parse::<strait::EngineAddress>().unwrap(), address);
        }
    }
});
