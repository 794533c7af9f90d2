//! Random blocks written through one address and verified through another.

#![allow(clippy::unwrap_used)]

use campaign::nbd_client::NbdClient;

const BLOCK: usize = 4096;

/// `count` distinct random 4 KiB-aligned blocks with random contents, from `seed`.
pub fn random_blocks(count: usize, seed: u64, disk: u64) -> Vec<(u64, Vec<u8>)> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
    while blocks.len() < count {
        let offset = (next() % (disk / BLOCK as u64)) * BLOCK as u64;
        if blocks.iter().all(|(o, _)| *o != offset) {
            let data = (0..BLOCK / 8).flat_map(|_| next().to_le_bytes()).collect();
            blocks.push((offset, data));
        }
    }
    blocks
}

pub fn write_blocks(client: &mut NbdClient, blocks: &[(u64, Vec<u8>)]) {
    for (offset, data) in blocks {
        client.write(*offset, data, false).unwrap();
    }
}

/// Reads each block back (its whole length) and compares.
pub fn verify_blocks(client: &mut NbdClient, blocks: &[(u64, Vec<u8>)], what: &str) {
    for (index, (offset, data)) in blocks.iter().enumerate() {
        let read = client.read(*offset, data.len() as u32).unwrap();
        assert!(
            read == *data,
            "{what}: block {index} at offset {offset} differs after the takeover"
        );
    }
}
