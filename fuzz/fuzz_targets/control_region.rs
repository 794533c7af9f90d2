//! Control region decoding: `shm::ControlRegion::open` and its readers (epoch, owners,
//! commands), and `shm::inspect` on a read-only view, as every agent reads hostd's region.
//! Input: a mode byte (bit 0: seal the static header's crc, bit 1: seal the name tables'
//! crc, as hostd would), then the region's bytes (16 KiB, zero padded).
//! Properties: an opened region has 1 to 8 nodes and identities with names of at most 16
//! bytes; readers answer `None` past the counts; `inspect` agrees it is a control region.
#![no_main]

use ivha_fuzz::{REGION_SIZE, read_only_view, region_with, seal_name_tables, seal_static_header};
use libfuzzer_sys::fuzz_target;
use shm::layout::{MAX_IDENTITIES, MAX_NODES, NAME_LEN};
use shm::{ControlRegion, InspectOptions, RegionReport};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let mut bytes = bytes[..bytes.len().min(REGION_SIZE as usize)].to_vec();
    if mode & 2 != 0 {
        seal_name_tables(&mut bytes);
    }
    if mode & 1 != 0 {
        seal_static_header(&mut bytes);
    }
    let mapping = region_with(&bytes);
    let view = read_only_view(&mapping);
    let opened = match ControlRegion::open(mapping) {
        Ok(region) => {
            let header = region.header();
            assert!((1..=MAX_NODES).contains(&header.nodes.len()));
            assert!((1..=MAX_IDENTITIES).contains(&header.identities.len()));
            assert!(
                header
                    .nodes
                    .iter()
                    .chain(&header.identities)
                    .all(|n| n.len() <= NAME_LEN)
            );
            let _ = region.epoch();
            for i in 0..=MAX_NODES.max(MAX_IDENTITIES) {
                let owner = region.owner(i);
                assert!(i < header.identities.len() || owner.is_none());
                let command = region.command(i);
                assert!(i < header.nodes.len() || command.is_none());
                let _ = format!("{owner:?} {command:?}");
            }
            true
        }
        Err(_) => false,
    };
    let report = shm::inspect(view, InspectOptions::default());
    let _ = format!("{report:?}");
    if opened {
        assert!(
            matches!(report, RegionReport::Control(_)),
            "open accepted it, inspect did not"
        );
    }
});
