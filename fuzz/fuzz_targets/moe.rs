//! MoE rank descriptors (`MoeRankDesc::from_bytes`): any input is rejected
//! with an error or decodes into a value whose encoding is the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(desc) = strait::moe::MoeRankDesc::from_bytes(data) {
        assert_eq!(desc.to_bytes(), data, "a MoE rank descriptor has one encoding");
        assert!(desc.counts.access().remote_write && desc.pool.access().remote_write);
    }
});
