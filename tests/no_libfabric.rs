//! Without libfabric the crate still builds, and opening an engine fails with
//! a typed error that says what was searched and how to install it. (Its own
//! test binary, so that the process-wide library handle is not yet loaded.)

use strait::{Error, Provider, TransferEngine};

#[test]
fn missing_library_is_a_clear_error() {
    std::env::set_var("STRAIT_LIBFABRIC", "/nonexistent/libfabric.so.1");
    std::env::set_var("STRAIT_LIBIBVERBS", "/nonexistent/libibverbs.so.1");
    let err = TransferEngine::builder().provider(Provider::Tcp).build().unwrap_err();
    match &err {
        Error::BackendUnavailable { backend: "libfabric", reason } => {
            assert!(reason.contains("/nonexistent/libfabric.so.1"), "{reason}");
            assert!(reason.contains("apt-get install libfabric1"), "{reason}");
        }
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
    let err = TransferEngine::builder().provider(Provider::Verbs).build().unwrap_err();
    match &err {
        Error::BackendUnavailable { backend: "verbs", reason } => {
            assert!(reason.contains("/nonexistent/libibverbs.so.1"), "{reason}");
            assert!(reason.contains("apt-get install libibverbs1"), "{reason}");
        }
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
    // Auto tries efa, verbs and tcp, and says why each failed.
    match TransferEngine::builder().build() {
        Err(Error::BackendUnavailable { backend: "auto", reason }) => {
            assert!(reason.contains("libfabric") && reason.contains("libibverbs"), "{reason}");
        }
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
}
