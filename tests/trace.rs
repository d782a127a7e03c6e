//! Each request is a `tracing` span (target `strait::request`, debug level)
//! with its id, peer and kind, and its bytes, duration and outcome recorded
//! when it ends, so a subscriber can follow one request. A subscriber that
//! wants nothing from that target costs one interest check per request.

mod common;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use common::{engine, TIMEOUT};
use strait::{Access, Provider};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

#[derive(Default)]
struct Seen {
    /// Span id -> its fields.
    spans: HashMap<u64, HashMap<String, String>>,
    /// (parent span, message) of each event.
    events: Vec<(Option<u64>, String)>,
    next: u64,
}

struct Capture(Arc<Mutex<Seen>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl Subscriber for Capture {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.target() == "strait::request"
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut seen = self.0.lock().unwrap();
        seen.next += 1;
        let id = seen.next;
        let mut fields = HashMap::new();
        span.record(&mut Fields(&mut fields));
        seen.spans.insert(id, fields);
        Id::from_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut seen = self.0.lock().unwrap();
        let fields = seen.spans.entry(span.into_u64()).or_default();
        values.record(&mut Fields(fields));
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = HashMap::new();
        event.record(&mut Fields(&mut fields));
        let parent = event.parent().map(Id::into_u64);
        self.0.lock().unwrap().events.push((parent, fields.remove("message").unwrap_or_default()));
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

#[test]
fn every_request_is_a_span_with_its_outcome() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    tracing::subscriber::set_global_default(Capture(seen.clone())).unwrap();

    let a = engine(Provider::Tcp, 1);
    let b = engine(Provider::Tcp, 1);
    let src = a.alloc(1 << 20, Access::LOCAL).unwrap();
    let dst = b.alloc(1 << 20, Access::REMOTE_READ_WRITE).unwrap();
    a.write(&src, 0, dst.descriptor(), 0, 4096, Some(3)).unwrap().wait_timeout(TIMEOUT).unwrap();
    a.write(&src, 0, dst.descriptor(), 0, 1 << 20, None).unwrap().wait_timeout(TIMEOUT).unwrap();
    a.read(&src, 0, dst.descriptor(), 0, 512).unwrap().wait_timeout(TIMEOUT).unwrap();
    let revoked = dst.descriptor().clone();
    drop(dst);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(a.write(&src, 0, &revoked, 0, 64, None).unwrap().wait_timeout(TIMEOUT).is_err());

    let seen = seen.lock().unwrap();
    let requests: Vec<_> = seen.spans.iter().filter(|(_, f)| f.contains_key("kind")).collect();
    let peer = b.address().to_string();
    let mut by_id: Vec<_> = requests.iter().map(|(span, f)| (f["id"].parse::<u64>().unwrap(), **span, *f)).collect();
    by_id.sort_by_key(|(id, _, _)| *id);
    let kinds: Vec<_> = by_id.iter().map(|(_, _, f)| f["kind"].as_str()).collect();
    // Engine b's own requests (none here) would be spans too; a's are these.
    let mine: Vec<_> = by_id.iter().filter(|(_, _, f)| f["peer"] == peer).collect();
    assert_eq!(mine.len(), 4, "{kinds:?}");
    assert_eq!(
        mine.iter().map(|(_, _, f)| f["kind"].as_str()).collect::<Vec<_>>(),
        ["write", "write", "read", "write"]
    );
    let ids: Vec<u64> = mine.iter().map(|(id, _, _)| *id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in submission order: {ids:?}");
    for (i, (_, span, f)) in mine.iter().enumerate() {
        let outcome = &f["outcome"];
        if i < 3 {
            assert_eq!(outcome, "ok", "{f:?}");
        } else {
            assert!(outcome.contains("remote access") || outcome.contains("peer"), "{f:?}");
        }
        assert!(f["us"].parse::<u64>().is_ok(), "{f:?}");
        let messages: Vec<_> = seen.events.iter().filter(|(p, _)| *p == Some(*span)).map(|(_, m)| m.as_str()).collect();
        assert_eq!(messages, ["request submitted", "request ended"], "{f:?}");
    }
    assert_eq!(mine[1].2["bytes"], (1u64 << 20).to_string());
    assert_eq!(mine[2].2["bytes"], "512");
}
