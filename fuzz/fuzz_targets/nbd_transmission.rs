//! The NBD server's transmission phase (`guest_agent::nbd::transmission::serve`): the
//! fuzz input's first byte picks the export (bit 0 read-only, bit 1 every call fails);
//! the rest is the client's request stream.
//! Properties: the export only sees ranges inside it and lengths within its maximum (checked
//! by the export); when the stream ends cleanly, the output is exactly one 16-byte reply per
//! request (not DISC) plus the data of the successful reads; bytes written never exceed
//! what the client sent.
#![no_main]

use std::io::BufReader;

use guest_agent::nbd::transmission::{End, Stats, serve};
use ivha_fuzz::{MemExport, Pipe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let mut export = MemExport::new("t", 1 << 16, mode & 1 != 0, 4096);
    if mode & 2 != 0 {
        export.fail = Some(std::io::ErrorKind::Other);
    }
    let mut reader = BufReader::new(stream);
    let mut out = Pipe::new(&[]);
    let mut stats = Stats::default();
    let result = serve(&mut reader, &mut out, &export, &mut stats);
    assert!(stats.bytes_written <= stream.len() as u64);
    assert!(stats.errors <= stats.requests);
    let replies = match result {
        Ok(End::HangUp) => Some(stats.requests),
        Ok(End::Disconnect) => Some(stats.requests - 1),
        Err(_) => None,
    };
    if let Some(replies) = replies {
        assert_eq!(
            out.output.len() as u64,
            16 * replies + stats.bytes_read,
            "{stats:?}"
        );
    }
});
