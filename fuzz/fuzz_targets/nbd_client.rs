//! The fault campaign's NBD client (`campaign::nbd_client::NbdClient`): the fuzz input is
//! everything the server sends. The client negotiates export "a", then reads, writes,
//! flushes and reads again.
//! Properties: a successful read returns exactly the length asked for; the client's first
//! bytes are the flags and NBD_OPT_GO it always sends.
#![no_main]

use campaign::nbd_client::NbdClient;
use ivha_fuzz::Pipe;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut client) = NbdClient::negotiate(Pipe::new(data), "a", "fuzz") else {
        return;
    };
    let _ = client.size();
    if let Ok(block) = client.read(0, 512) {
        assert_eq!(block.len(), 512);
    }
    let _ = client.write(4096, &[0xab; 512], true);
    let _ = client.flush();
    if let Ok(block) = client.read(1 << 20, 4096) {
        assert_eq!(block.len(), 4096);
    }
    let _ = client.write(0, &[1; 8], false);
});
