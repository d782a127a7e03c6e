//! KV descriptors and requests (`KvCacheDesc::from_bytes`,
//! `KvRequest::from_bytes`): any input is rejected with an error or decodes
//! into a value whose encoding is the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(desc) = strait::kv::KvCacheDesc::from_bytes(data) {
        assert_eq!(desc.to_bytes(), data, "a KV descriptor has one encoding");
        assert_eq!(desc.tensors.len(), desc.layout.tensor_count());
    }
    if let Ok(request) = strait::kv::KvRequest::from_bytes(data) {
        assert_eq!(request.to_bytes(), data, "a KV request has one encoding");
    }
});
