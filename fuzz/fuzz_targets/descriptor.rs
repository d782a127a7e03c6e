//! Memory descriptors (`MrDesc::from_bytes`): any input is rejected with an
//! error or decodes into a descriptor whose encoding decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(desc) = strait::MrDesc::from_bytes(data) {
        let bytes = desc.to_bytes();
        assert_eq!(bytes, data, "a descriptor has one encoding");
        assert_eq!(strait::MrDesc::from_bytes(&bytes).unwrap(), desc);
        assert!(desc.owner().nic_count() > 0);
    }
});
