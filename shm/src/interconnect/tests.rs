//! The interconnect area: layout, link table, mailbox.

use std::sync::atomic::Ordering;

use super::*;
use crate::header::{HeaderError, StaticHeader};
use crate::layout::{FORMAT_VERSION, NODE_MAGIC, node_header};
use crate::log::{BackPressure, Entry, Geometry};
use crate::mapping::Access;
use crate::node::{NodeError, NodeRegion};

/// A region formatted at `size`, and the same file mapped read-only as a peer maps it.
fn regions(size: u64) -> (tempfile::TempDir, NodeRegion, NodeRegion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.region");
    let own = NodeRegion::format(Mapping::create_file(&path, size).unwrap(), 0, "a").unwrap();
    let peer = NodeRegion::open(Mapping::open(&path, Access::ReadOnly).unwrap()).unwrap();
    (dir, own, peer)
}

fn writer(region: &NodeRegion, boot_id: u64) -> InterconnectWriter {
    region.writer(boot_id).unwrap().interconnect.unwrap()
}

fn read(reader: &mut MailboxReader, me: u16) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let n = reader.read(me, &mut out);
    assert_eq!(n, out.len());
    out
}

#[test]
fn the_area_sits_between_the_header_page_and_the_ring() {
    for (size, slots, ring_offset) in [
        (1u64 << 20, 8u32, 80u64 << 10),
        (2 << 20, 16, 144 << 10),
        (64 << 20, 64, 528 << 10),
        (4 << 30, 64, 528 << 10),
    ] {
        let ic = InterconnectGeometry::for_region(size).unwrap();
        assert_eq!(ic.offset, HEADER_PAGE);
        assert_eq!(ic.mailbox_slots, slots, "{size}");
        assert_eq!(ic.end(), ring_offset, "{size}");
        assert!(ring_offset * 10 <= size, "the ring keeps 90% of {size}");
        assert_eq!(ic.max_frame(), 8192 - 16);
    }
    assert_eq!(InterconnectGeometry::for_region(512 << 10), None);
    let (_dir, own, peer) = regions(64 << 20);
    assert_eq!(own.header(), peer.header());
    assert_eq!(own.geometry().ring_offset, 528 << 10);
    assert_eq!(own.geometry().ring_size, (64 << 20) - (528 << 10));
}

#[test]
fn small_regions_have_no_area() {
    let (_dir, own, peer) = regions(64 << 10);
    assert_eq!(own.header().interconnect, None);
    assert_eq!(own.geometry().ring_offset, HEADER_PAGE);
    assert_eq!(peer.interconnect_config(), None);
    assert_eq!(peer.link_status(0, 0), None);
    assert_eq!(peer.mailbox_head(), None);
    assert!(MailboxReader::new(&peer).is_none());
    assert!(own.writer(1).unwrap().interconnect.is_none());
}

/// The static header the build before the interconnect area wrote: ring right after the
/// header page, bytes 80-119 zero.
fn format_old_layout(mapping: &Mapping) {
    let size = mapping.len();
    let ring_size = size - HEADER_PAGE;
    let mut h = StaticHeader::new(NODE_MAGIC);
    h.put_u32(node_header::VERSION, FORMAT_VERSION);
    h.put_u32(node_header::HEADER_LEN, HEADER_PAGE as u32);
    h.put_u64(node_header::REGION_SIZE, size);
    h.put_u64(node_header::RING_OFFSET, HEADER_PAGE);
    h.put_u64(node_header::RING_SIZE, ring_size);
    h.put_u64(
        node_header::MAX_PAYLOAD,
        Geometry::default_max_payload(ring_size),
    );
    h.put_name(node_header::NAME, "old");
    crate::header::clear_header_page(mapping);
    h.store(mapping);
}

#[test]
fn regions_of_the_previous_layout_open_without_an_area() {
    let mapping = Mapping::create_memfd("old", 1 << 20).unwrap();
    format_old_layout(&mapping);
    let region = NodeRegion::open(mapping).unwrap();
    assert_eq!(region.header().interconnect, None);
    assert_eq!(region.geometry().ring_offset, HEADER_PAGE);
    assert_eq!(region.interconnect_config(), None);
    assert!(MailboxReader::new(&region).is_none());
    let mut w = region.writer(1).unwrap();
    assert!(w.interconnect.is_none());
    let data = [7u8; 100];
    let entry = Entry::Write {
        export: 0,
        offset: 0,
        data: &data,
    };
    w.appender.append(&entry, BackPressure::default()).unwrap();
    assert_eq!(region.unflushed().unwrap().count(), 1);
}

/// Rewrites the interconnect fields of `mapping`'s static header and seals it again.
fn rewrite_area(mapping: &Mapping, offset: u64, size: u64, slots: u32, slot_size: u32) {
    let mut h = StaticHeader::load(mapping, NODE_MAGIC).unwrap();
    h.put_u64(node_header::IC_OFFSET, offset);
    h.put_u64(node_header::IC_SIZE, size);
    h.put_u32(node_header::MAILBOX_SLOTS, slots);
    h.put_u32(node_header::MAILBOX_SLOT_SIZE, slot_size);
    h.store(mapping);
}

#[test]
fn an_area_that_does_not_fit_is_refused() {
    let ring = 80 << 10;
    for (offset, size, slots, slot_size) in [
        (4096, 77 << 10, 8, 8192),            // into the ring
        (4096, 76 << 10, 9, 8192),            // more slots than the area holds
        (0, 76 << 10, 8, 8192),               // over the header page
        (4100, 72 << 10, 8, 8192),            // not on a page
        (4096, 76 << 10, 0, 8192),            // no slots
        (4096, 76 << 10, 8, 12),              // slot smaller than its header
        (4096, 76 << 10, 1, 8191),            // slot not in words
        (u64::MAX, 4096, 8, 8192),            // past everything
        (4096, u64::MAX, u32::MAX, u32::MAX), // hostile sizes
        (4096, 76 << 10, 2000, 24),           // more slots than any reader scans
    ] {
        let mapping = Mapping::create_memfd("bad", 1 << 20).unwrap();
        format_old_layout(&mapping);
        let mut h = StaticHeader::load(&mapping, NODE_MAGIC).unwrap();
        h.put_u64(node_header::RING_OFFSET, ring);
        h.put_u64(node_header::RING_SIZE, (1 << 20) - ring);
        h.store(&mapping);
        rewrite_area(&mapping, offset, size, slots, slot_size);
        let err = NodeRegion::open(mapping).unwrap_err();
        assert!(
            matches!(
                err,
                NodeError::Header {
                    source: HeaderError::Geometry(_),
                    ..
                }
            ),
            "{offset} {size} {slots} {slot_size}: {err}"
        );
    }
}

#[test]
fn link_statuses_round_trip_through_a_read_only_mapping() {
    let (_dir, own, peer) = regions(1 << 20);
    assert_eq!(
        peer.interconnect_config(),
        Some(InterconnectConfig::default())
    );
    assert_eq!(peer.link_status(1, 0).unwrap().state, LinkStateCode::Absent);
    let mut w = writer(&own, 1);
    w.links.publish_config(3, 50, 0xfeed);
    let config = peer.interconnect_config().unwrap();
    assert_eq!(
        (config.links, config.heartbeat_ms, config.session),
        (3, 50, 0xfeed)
    );
    assert!(config.published_unix_ms > 0);
    let states = [
        LinkStateCode::Opening,
        LinkStateCode::Up,
        LinkStateCode::Degraded,
        LinkStateCode::Down,
        LinkStateCode::Refused,
        LinkStateCode::Cut,
        LinkStateCode::Unknown(77),
    ];
    for (i, state) in states.into_iter().enumerate() {
        let i = i as u64;
        let status = LinkStatus {
            state,
            rtt_us: 100 + i,
            bytes_out: 200 + i,
            bytes_in: 300 + i,
            dropped: i,
            retransmissions: 2 * i,
            channels: 3,
            since_unix_ms: 1_700_000_000_000 + i,
        };
        let (node, link) = (i as usize % 8, i as usize % 4);
        w.links.publish(node, link, &status).unwrap();
        assert_eq!(peer.link_status(node, link), Some(status));
        assert_eq!(LinkStateCode::from_word(state.to_word()), state);
    }
    // The last peer's last link has its place; one past either does not.
    w.links
        .publish(MAX_NODES - 1, MAX_LINKS - 1, &LinkStatus::default())
        .unwrap();
    for (node, link) in [(MAX_NODES, 0), (0, MAX_LINKS), (usize::MAX, usize::MAX)] {
        assert_eq!(
            w.links.publish(node, link, &LinkStatus::default()),
            Err(LinkTableError::NoSuchLink { peer: node, link })
        );
        assert_eq!(peer.link_status(node, link), None);
    }
    // A restarted agent keeps the statuses and the configuration until it says otherwise.
    drop(w);
    let mut w = writer(&own, 2);
    assert_eq!(
        peer.link_status(0, 0).unwrap().state,
        LinkStateCode::Opening
    );
    w.links
        .publish(
            0,
            0,
            &LinkStatus {
                state: LinkStateCode::Up,
                ..LinkStatus::default()
            },
        )
        .unwrap();
    assert_eq!(peer.link_status(0, 0).unwrap().state, LinkStateCode::Up);
    assert_eq!(peer.interconnect_config().unwrap().session, 0xfeed);
    // The test clients' statistics, one value per peer.
    assert_eq!(peer.link_clients(2), Some(LinkClients::default()));
    let clients = LinkClients {
        stream_received: 1,
        stream_errors: 2,
        stream_max_gap_us: 3,
        pings: 4,
        ping_p50_us: 5,
        ping_p99_us: 6,
        bulk_bytes_in: 7,
        stream_recent_gap_us: 8,
    };
    w.links.publish_clients(2, &clients).unwrap();
    assert_eq!(peer.link_clients(2), Some(clients));
    assert_eq!(peer.link_clients(1), Some(LinkClients::default()));
    assert_eq!(
        w.links.publish_clients(MAX_NODES, &clients),
        Err(LinkTableError::NoSuchPeer { peer: MAX_NODES })
    );
    assert_eq!(peer.link_clients(MAX_NODES), None);
    // Nothing above moved a link status.
    assert_eq!(peer.link_status(0, 0).unwrap().state, LinkStateCode::Up);
    let json = serde_json::to_value(peer.link_status(6, 2).unwrap()).unwrap();
    assert_eq!(json["state"]["unknown"], 77);
    assert_eq!(json["rtt_us"], 106);
}

#[test]
fn a_reader_gets_the_messages_for_it_and_for_everyone_in_order() {
    let (_dir, own, peer) = regions(1 << 20);
    let mut w = writer(&own, 1);
    assert_eq!(w.mailbox.post(1, b"before the reader").unwrap(), 1);
    let mut to_one = MailboxReader::new(&peer).unwrap();
    let mut to_two = MailboxReader::new(&peer).unwrap();
    assert_eq!(
        read(&mut to_one, 1),
        Vec::<Vec<u8>>::new(),
        "history is not news"
    );
    assert_eq!(w.mailbox.post(1, b"one").unwrap(), 2);
    assert_eq!(w.mailbox.post(2, b"two").unwrap(), 3);
    assert_eq!(w.mailbox.post(BROADCAST, b"all").unwrap(), 4);
    assert_eq!(w.mailbox.post(1, b"").unwrap(), 5);
    assert_eq!(read(&mut to_one, 1), [&b"one"[..], b"all", b""]);
    assert_eq!(read(&mut to_two, 2), [&b"two"[..], b"all"]);
    assert_eq!(read(&mut to_one, 1), Vec::<Vec<u8>>::new(), "nothing new");
    assert_eq!((to_one.lost, to_one.corrupt, to_one.resyncs), (0, 0, 0));
    assert_eq!(peer.mailbox_head(), Some(5));
    let max = w.mailbox.max_frame();
    let big = vec![0xab; max];
    w.mailbox.post(1, &big).unwrap();
    assert_eq!(read(&mut to_one, 1), [big]);
    assert_eq!(
        w.mailbox.post(1, &vec![0; max + 1]),
        Err(MailboxError::TooLong { len: max + 1, max })
    );
}

#[test]
fn a_reader_that_falls_behind_counts_what_it_lost_and_gets_no_stale_message() {
    let (_dir, own, peer) = regions(1 << 20);
    let mut w = writer(&own, 1);
    let mut reader = MailboxReader::new(&peer).unwrap();
    let slots = u64::from(own.header().interconnect.unwrap().mailbox_slots);
    let posted = 3 * slots + 5;
    for n in 1..=posted {
        w.mailbox.post(1, &n.to_le_bytes()).unwrap();
    }
    let got = read(&mut reader, 1);
    let numbers: Vec<u64> = got
        .iter()
        .map(|m| u64::from_le_bytes(m[..].try_into().unwrap()))
        .collect();
    assert_eq!(numbers, ((posted - slots + 1)..=posted).collect::<Vec<_>>());
    assert_eq!(reader.lost, posted - slots);

    // A slot being overwritten as the reader gets to it is lost, not returned.
    w.mailbox.post(1, b"next").unwrap();
    let slot = own.header().interconnect.unwrap().slot(posted + 1);
    let number = own.mapping().word(slot).unwrap();
    number.store(0, Ordering::Release);
    assert!(read(&mut reader, 1).is_empty());
    assert_eq!(reader.lost, posted - slots + 1);
    // ... and so is one already overwritten by a later message.
    w.mailbox.post(1, b"later").unwrap();
    let slot = own.header().interconnect.unwrap().slot(posted + 2);
    own.mapping()
        .word(slot)
        .unwrap()
        .store(posted + 2 + slots, Ordering::Release);
    assert!(read(&mut reader, 1).is_empty());
    assert_eq!(reader.lost, posted - slots + 2);
}

#[test]
fn a_restarted_writer_numbers_on_and_a_reformatted_region_resynchronises() {
    let (dir, own, peer) = regions(1 << 20);
    let mut reader = MailboxReader::new(&peer).unwrap();
    let mut w = writer(&own, 1);
    w.mailbox.post(1, b"a").unwrap();
    assert_eq!(read(&mut reader, 1), [b"a"]);
    w.mailbox.post(1, b"b").unwrap();
    drop(w);
    // The new agent goes on from the head: what the old one posted after the reader's last
    // read is still news, nothing is repeated.
    let mut w = writer(&own, 2);
    assert_eq!(w.mailbox.head(), 2);
    assert_eq!(w.mailbox.post(1, b"c").unwrap(), 3);
    assert_eq!(read(&mut reader, 1), [b"b", b"c"]);
    for _ in 0..5 {
        w.mailbox.post(1, b"old").unwrap();
    }
    drop(w);

    // Formatted again (numbers start over): the reader jumps to the new head.
    let path = dir.path().join("a.region");
    let again =
        NodeRegion::format(Mapping::open(&path, Access::ReadWrite).unwrap(), 0, "a").unwrap();
    let mut w = writer(&again, 3);
    for frame in [b"x", b"y", b"z"] {
        w.mailbox.post(1, frame).unwrap();
    }
    assert!(read(&mut reader, 1).is_empty());
    assert_eq!(reader.resyncs, 1);
    w.mailbox.post(1, b"new").unwrap();
    assert_eq!(read(&mut reader, 1), [b"new"]);
    assert_eq!(reader.lost, 0);
}

#[test]
fn hostile_mailbox_contents_are_skipped_and_counted() {
    let (_dir, own, peer) = regions(1 << 20);
    let ic = own.header().interconnect.unwrap();
    let m = own.mapping();
    let mut reader = MailboxReader::new(&peer).unwrap();
    let mut w = writer(&own, 1);
    // A length past the slot.
    w.mailbox.post(1, b"hello").unwrap();
    m.word(ic.slot(1) + 8)
        .unwrap()
        .store(1 | u64::from(u32::MAX) << 32, Ordering::Release);
    assert!(read(&mut reader, 1).is_empty());
    assert_eq!(reader.corrupt, 1);
    // An older number than the head allows.
    w.mailbox.post(1, b"hello").unwrap();
    m.word(ic.slot(2)).unwrap().store(1, Ordering::Release);
    assert!(read(&mut reader, 1).is_empty());
    assert_eq!(reader.corrupt, 2);
    // A head far ahead: everything it skips is lost, nothing panics.
    let head = m.word(ic.mailbox_head()).unwrap();
    head.store(u64::MAX, Ordering::Release);
    assert!(read(&mut reader, 1).is_empty());
    assert_eq!(reader.cursor(), u64::MAX);
    // Then back: a resync.
    head.store(7, Ordering::Release);
    assert!(read(&mut reader, 1).is_empty());
    assert_eq!((reader.cursor(), reader.resyncs), (7, 1));
    // Garbage everywhere in the area.
    let junk: Vec<u8> = (0..ic.size).map(|i| (i * 31 + 7) as u8).collect();
    assert!(m.write_bytes(ic.offset, &junk));
    let mut fresh = MailboxReader::new(&peer).unwrap();
    let mut out = Vec::new();
    for _ in 0..3 {
        reader.read(1, &mut out);
        fresh.read(1, &mut out);
    }
    let _ = (peer.interconnect_config(), peer.link_status(3, 3));
    // A writer taking over a garbage head posts or refuses, and does not panic either.
    let mut w = writer(&own, 2);
    assert_eq!(w.mailbox.head(), m.load(ic.mailbox_head()));
    let _ = w.mailbox.post(1, b"after");
    head.store(u64::MAX, Ordering::Release);
    let mut w = writer(&own, 3);
    assert_eq!(w.mailbox.post(1, b"x"), Err(MailboxError::Exhausted));
}

#[test]
fn concurrent_readers_get_whole_messages_and_account_for_every_one() {
    const POSTED: u64 = 20_000;
    let (_dir, own, peer) = regions(1 << 20);
    let mut mailbox = writer(&own, 1).mailbox;
    let mut reader = MailboxReader::new(&peer).unwrap();
    let max = mailbox.max_frame() as u64;
    // Frame n: n, then bytes derived from n, of a length derived from n.
    let frame = |n: u64| -> Vec<u8> {
        let len = (n.wrapping_mul(2_654_435_761) % (max - 8)) as usize;
        let mut f = n.to_le_bytes().to_vec();
        f.extend((0..len).map(|i| (n as usize ^ i) as u8));
        f
    };
    let mut delivered = 0u64;
    std::thread::scope(|s| {
        s.spawn(|| {
            for n in 1..=POSTED {
                assert_eq!(mailbox.post(1, &frame(n)).unwrap(), n);
                if n % 64 == 0 {
                    std::thread::yield_now();
                }
            }
        });
        let mut last = 0;
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while reader.cursor() < POSTED {
            assert!(
                std::time::Instant::now() < deadline,
                "the reader never caught up"
            );
            out.clear();
            reader.read(1, &mut out);
            for message in &out {
                let n = u64::from_le_bytes(message[..8].try_into().unwrap());
                assert!(n > last, "message {n} after {last}");
                assert!(*message == frame(n), "message {n} is torn");
                last = n;
                delivered += 1;
            }
        }
    });
    assert_eq!(reader.corrupt, 0);
    assert_eq!(delivered + reader.lost, POSTED);
    assert!(delivered > 0);
}

#[test]
fn inspect_shows_the_area() {
    let (dir, own, _peer) = regions(1 << 20);
    let mut w = writer(&own, 1);
    w.links.publish_config(2, 50, 9);
    let up = LinkStatus {
        state: LinkStateCode::Up,
        rtt_us: 40,
        ..LinkStatus::default()
    };
    w.links.publish(1, 1, &up).unwrap();
    w.mailbox.post(1, b"hi").unwrap();
    let mapping = Mapping::open(&dir.path().join("a.region"), Access::ReadOnly).unwrap();
    let report = crate::inspect::inspect_node(mapping, Default::default());
    let json = serde_json::to_value(&report).unwrap();
    let ic = &json["interconnect"];
    assert_eq!(ic["config"]["links"], 2);
    assert_eq!(ic["mailbox_head"], 1);
    assert_eq!(ic["links"].as_array().unwrap().len(), 1, "{ic}");
    assert_eq!(ic["links"][0]["peer"], 1);
    assert_eq!(ic["links"][0]["state"], "up");
    assert_eq!(json["header"]["interconnect"]["mailbox_slots"], 8);

    let (dir, _own, _peer) = regions(64 << 10);
    let mapping = Mapping::open(&dir.path().join("a.region"), Access::ReadOnly).unwrap();
    let report = crate::inspect::inspect_node(mapping, Default::default());
    assert!(report.interconnect.is_none());
}
