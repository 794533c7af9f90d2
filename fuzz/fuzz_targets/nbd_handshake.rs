//! The NBD server's negotiation (`guest_agent::nbd::handshake::negotiate`): the fuzz input
//! is everything the client sends; the server's replies go to a buffer.
//! Property: the server's output is the greeting, then well-formed option replies (and, if
//! the client picked an export with NBD_OPT_EXPORT_NAME, that reply at the end).
#![no_main]

use std::io::BufReader;

use guest_agent::nbd::ConnectionError;
use guest_agent::nbd::handshake::{Negotiated, negotiate};
use guest_agent::nbd::protocol::{
    GREETING_LEN, OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC, OptionReplyHeader, greeting,
};
use ivha_fuzz::{Pipe, registry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let registry = registry();
    let mut reader = BufReader::new(data);
    let mut out = Pipe::new(&[]);
    let result = negotiate(&mut reader, &mut out, &registry);
    let out = out.output;
    assert_eq!(
        out[..GREETING_LEN],
        greeting(3)[..],
        "the greeting comes first"
    );
    let mut rest = &out[GREETING_LEN..];
    while rest.len() >= OPTION_REPLY_HEADER_LEN {
        let header = OptionReplyHeader::decode(
            rest[..OPTION_REPLY_HEADER_LEN]
                .try_into()
                .expect("header length"),
        );
        if header.magic != OPTION_REPLY_MAGIC {
            break;
        }
        let end = OPTION_REPLY_HEADER_LEN + header.length as usize;
        assert!(end <= rest.len(), "option reply longer than what was sent");
        rest = &rest[end..];
    }
    match result {
        // NBD_OPT_EXPORT_NAME's reply: size, flags, and 124 zeroes unless NO_ZEROES.
        Ok(Negotiated::Transmission(_)) if !rest.is_empty() => {
            assert!(
                rest.len() == 10 || rest.len() == 134,
                "{} stray bytes",
                rest.len()
            );
        }
        _ => assert!(
            rest.is_empty(),
            "{} stray bytes after the replies",
            rest.len()
        ),
    }
    if let Err(ConnectionError::Io { source, .. }) = &result {
        assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof, "{source}");
    }
});
