//! Weights rank descriptors (`WeightsRankDesc::from_bytes`): any input is
//! rejected with an error or decodes into a value whose encoding is the
//! input, whose specs are well formed and (a destination's) fit in its
//! regions.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(desc) = strait::weights::WeightsRankDesc::from_bytes(data) {
        assert_eq!(desc.to_bytes(), data, "a weights rank descriptor has one encoding");
        assert!(desc.control.access().remote_write);
        for t in &desc.tensors {
            assert!(t.spec.validate().is_ok());
        }
    }
});
