//! Node region decoding: `shm::NodeRegion::open` and its readers (heartbeat, cursors, ack,
//! peer, the unflushed log's scan), and `shm::inspect` on a read-only view of the same
//! region, as hostd and the partner read it. Input: a mode byte (bit 0: seal the static
//! header's crc as a writer would), then the region's bytes (16 KiB, zero padded).
//! Properties: an opened region's geometry is valid for it; `inspect` and `open` agree on
//! whether it is a node region.
#![no_main]

use ivha_fuzz::{REGION_SIZE, read_only_view, region_with, seal_static_header};
use libfuzzer_sys::fuzz_target;
use shm::{InspectOptions, NodeRegion, RegionReport};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let mut bytes = bytes[..bytes.len().min(REGION_SIZE as usize)].to_vec();
    if mode & 1 != 0 {
        seal_static_header(&mut bytes);
    }
    let mapping = region_with(&bytes);
    let view = read_only_view(&mapping);
    let opened = match NodeRegion::open(mapping) {
        Ok(region) => {
            let geometry = region.geometry();
            assert!(geometry.validate(REGION_SIZE).is_ok());
            assert!(region.header().name.len() <= shm::layout::NAME_LEN);
            let _ = (
                region.boot_id(),
                region.heartbeat(),
                region.synced(),
                region.ack(),
            );
            let _ = (region.peer(), region.stats(), region.write_probe());
            let mut buf = [0u8; 64];
            let _ = region.read_log(u64::MAX - 8, &mut buf);
            if let Ok(scan) = region.unflushed() {
                for record in scan {
                    if record.is_err() {
                        break;
                    }
                }
            }
            true
        }
        Err(_) => false,
    };
    let report = shm::inspect(
        view,
        InspectOptions {
            max_records: Some(4),
        },
    );
    let _ = format!("{report:?}");
    if opened {
        assert!(
            matches!(report, RegionReport::Node(_)),
            "open accepted it, inspect did not"
        );
    }
});
