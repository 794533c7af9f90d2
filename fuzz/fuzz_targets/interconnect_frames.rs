//! The interconnect's frame decoder (`interconnect::frame::Frame::decode`) and a connection
//! manager fed what a peer, or anyone on its links, sends (`Manager::receive`, `poll`).
//! Input: records of a byte (the link the frame arrives on: 0, 1, or 2, a link that does
//! not exist; and how far the clock moves), a little-endian u16 length, and that many bytes.
//! Properties: a decoded frame encodes back to the same bytes; the manager never panics,
//! only delivers messages of the channels open here, sends only frames of its own session
//! that decode, and after `poll` has nothing left due (`next_wakeup` is in the future).
#![no_main]

use std::time::{Duration, Instant};

use interconnect::frame::Frame;
use interconnect::manager::{Class, Manager, ManagerConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut manager = Manager::new(1, 0, 7, 2, ManagerConfig::default(), start);
    manager.open(1, Class::Control, start);
    manager.open(2, Class::Bulk, start);
    let mut now = start;
    let mut rest = data;
    while let [pick, lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (bytes, after) = tail.split_at(len);
        rest = after;
        if let Ok(frame) = Frame::decode(bytes) {
            assert_eq!(frame.encode().ok().as_deref(), Some(bytes));
        }
        now += Duration::from_millis(u64::from(pick >> 2));
        for (channel, _) in manager.receive(usize::from(pick % 3), bytes, now) {
            assert!(
                channel == 1 || channel == 2,
                "channel {channel} is not open"
            );
        }
        assert!(manager.next_wakeup(now) >= now);
        for (link, bytes) in manager.poll(now) {
            let frame = Frame::decode(&bytes).ok();
            assert!(link < 2, "frame for link {link}");
            assert!(frame.is_some_and(|f| f.from == 1 && f.session == 7));
        }
        assert!(manager.next_wakeup(now) > now, "poll left work due");
    }
});
