//! The event-log reader: `wire::events::parse_log` on a whole `events.jsonl`, and
//! `EventLine::parse` on each of its lines (what `hostd events` and the campaign's checker
//! read).
//! Properties: every line is either an event or a bad line, numbered in order; an event
//! that parses writes back (`to_json`) to a line that parses to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::events::{EventLine, parse_log};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (events, bad) = parse_log(text);
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(events.len() + bad.len(), lines);
    assert!(bad.windows(2).all(|w| w[0].number < w[1].number));
    for event in &events {
        let _ = (event.time_us(), event.event.node());
        let line = event.to_json();
        let again = EventLine::parse(&line).expect("an event's own line parses");
        assert_eq!(&again, event, "round trip through {line}");
    }
});
