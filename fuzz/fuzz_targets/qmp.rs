//! The QMP reader (`qemu::qmp`: the reader loop's line reading and message parsing, run
//! without its thread by `read_all_for_fuzzing`): the fuzz input is everything QEMU sends
//! (greeting, replies, events).
//! Property: the reader always stops with a reason; each event it passes on has a name.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (events, messages, ended) = qemu::qmp::read_all_for_fuzzing(data);
    assert!(!ended.is_empty(), "the reader stopped without saying why");
    assert!(
        events.len() + messages <= data.len(),
        "more messages than bytes"
    );
    for event in &events {
        let _ = format!("{} {:?} {}", event.name, event.timestamp, event.data);
    }
});
