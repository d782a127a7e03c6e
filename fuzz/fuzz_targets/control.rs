//! Engine control messages (key queries and their answers, which peers send
//! when a write or read fails): any input is rejected or decodes into a
//! message whose encoding is the input itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(encoded) = strait::fuzzing::control_message(data) {
        assert_eq!(encoded, data, "a control message has one encoding");
    }
});
