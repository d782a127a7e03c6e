//! Engine addresses (`EngineAddress::from_bytes`): any input is rejected
//! with an error or decodes into an address that round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(address) = strait::EngineAddress::from_bytes(data) {
        let bytes = address.to_bytes();
        assert_eq!(bytes, data, "an address has one encoding");
        assert_eq!(strait::EngineAddress::from_bytes(&bytes).unwrap(), address);
        for nic in 0..address.nic_count() {
            assert!(address.nic(nic).len() <= strait::MAX_NIC_ADDRESS_LEN);
        }
    }
});
