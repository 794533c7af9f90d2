//! Fixed newstyle negotiation ("option haggling").
//!
//! The server greets, checks the client's flags, then answers options until the client picks
//! an export (`NBD_OPT_EXPORT_NAME` or a successful `NBD_OPT_GO`), aborts, or hangs up.
//! Option data is bounded by [`MAX_OPTION_DATA`]: longer options are skipped and refused with
//! `NBD_REP_ERR_TOO_BIG` (or `NBD_REP_ERR_UNSUP` if the option is unknown anyway).

use std::io::{BufReader, Read, Write};
use std::sync::Arc;

use crate::export::{Export, ExportRegistry};

use super::protocol::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_CAN_MULTI_CONN, FLAG_FIXED_NEWSTYLE,
    FLAG_HAS_FLAGS, FLAG_NO_ZEROES, FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES, IHAVEOPT, INFO_NAME, InfoRequest, KNOWN_CLIENT_FLAGS, MAX_OPTION_DATA,
    MAX_STRING_LEN, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST, OPT_STRUCTURED_REPLY,
    OPTION_HEADER_LEN, OptionHeader, REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_SERVER, decode_name, export_name_reply, greeting,
    info_block_size, info_export, option_reply_header,
};
use super::{ConnectionError, IoContext, MAX_PAYLOAD, discard, read_exact_or_eof};

/// The preferred block size advertised (when the maximum allows it).
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// How a negotiation ended without error.
#[derive(Debug)]
pub enum Negotiated {
    /// The client chose this export: enter transmission.
    Transmission(Arc<dyn Export>),
    /// The client sent `NBD_OPT_ABORT` (acknowledged) or hung up between options.
    Ended,
}

/// The transmission flags for an export.
///
/// Always `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA` and `CAN_MULTI_CONN`; a writable export adds
/// `SEND_TRIM` and `SEND_WRITE_ZEROES`, a read-only one `READ_ONLY`.
pub fn transmission_flags(export: &dyn Export) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
    if export.read_only() {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    }
    flags
}

/// The largest READ or WRITE payload accepted on an export: its `max_request()`, capped at
/// [`MAX_PAYLOAD`] and at least 1.
pub fn max_payload(export: &dyn Export) -> u32 {
    export.max_request().clamp(1, MAX_PAYLOAD)
}

/// Block sizes advertised for an export: minimum 1, preferred 4096 (or the largest power of
/// two not above the maximum), maximum [`max_payload`].
pub fn block_sizes(export: &dyn Export) -> (u32, u32, u32) {
    let maximum = max_payload(export);
    let preferred = if maximum >= PREFERRED_BLOCK_SIZE {
        PREFERRED_BLOCK_SIZE
    } else {
        1 << (31 - maximum.leading_zeros())
    };
    (1, preferred, maximum)
}

/// Whether a connection may use the export it chose: `Err` carries the reason it may not,
/// in words the client is told.
pub type Admit<'a> = dyn FnMut(&Arc<dyn Export>) -> Result<(), String> + 'a;

/// Runs the negotiation on a fresh connection, admitting every choice of export.
///
/// `reader` must be the reader the transmission phase goes on with: requests the client sent
/// right after `NBD_OPT_GO` may already sit in its buffer.
pub fn negotiate<R: Read, W: Write>(
    reader: &mut BufReader<R>,
    writer: &mut W,
    registry: &ExportRegistry,
) -> Result<Negotiated, ConnectionError> {
    negotiate_admitting(reader, writer, registry, &mut |_| Ok(()))
}

/// Runs the negotiation, asking `admit` before the connection enters transmission with the
/// export it chose. A refused `NBD_OPT_GO` is answered with `NBD_REP_ERR_POLICY` and the
/// reason, and the client may go on negotiating; a refused `NBD_OPT_EXPORT_NAME`, which has
/// no error reply, ends the connection.
pub fn negotiate_admitting<R: Read, W: Write>(
    reader: &mut BufReader<R>,
    writer: &mut W,
    registry: &ExportRegistry,
    admit: &mut Admit<'_>,
) -> Result<Negotiated, ConnectionError> {
    writer
        .write_all(&greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        .context("sending the greeting")?;
    writer.flush().context("sending the greeting")?;

    let mut flags = [0u8; 4];
    if !read_exact_or_eof(reader, &mut flags).context("reading the client's flags")? {
        return Ok(Negotiated::Ended);
    }
    let client_flags = u32::from_be_bytes(flags);
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 || client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(ConnectionError::ClientFlags(client_flags));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut data = Vec::new();
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        if !read_exact_or_eof(reader, &mut header).context("reading an option header")? {
            return Ok(Negotiated::Ended);
        }
        let header = OptionHeader::decode(&header);
        if header.magic != IHAVEOPT {
            return Err(ConnectionError::OptionMagic(header.magic));
        }
        let outcome = option(
            reader, writer, registry, admit, header, no_zeroes, &mut data,
        )?;
        writer.flush().context("sending an option reply")?;
        match outcome {
            Some(negotiated) => return Ok(negotiated),
            None => continue,
        }
    }
}

/// Answers one option; `Some` ends the negotiation.
fn option<R: Read, W: Write>(
    reader: &mut BufReader<R>,
    writer: &mut W,
    registry: &ExportRegistry,
    admit: &mut Admit<'_>,
    header: OptionHeader,
    no_zeroes: bool,
    data: &mut Vec<u8>,
) -> Result<Option<Negotiated>, ConnectionError> {
    let known = matches!(
        header.option,
        OPT_EXPORT_NAME | OPT_ABORT | OPT_LIST | OPT_INFO | OPT_GO
    );
    if header.option == OPT_EXPORT_NAME && header.length as usize > MAX_STRING_LEN {
        // No error reply exists for NBD_OPT_EXPORT_NAME.
        return Err(ConnectionError::ExportName(
            super::protocol::OptionDataError::NameTooLong(header.length as usize),
        ));
    }
    if !known || header.length > MAX_OPTION_DATA {
        discard(reader, u64::from(header.length)).context("skipping option data")?;
        let (reply, message) = if !known {
            let message = if header.option == OPT_STRUCTURED_REPLY {
                "structured replies are not supported"
            } else {
                "option not supported"
            };
            (REP_ERR_UNSUP, message)
        } else {
            (REP_ERR_TOO_BIG, "option data too long")
        };
        log::debug!(
            "nbd: refusing option {} ({} bytes): {message}",
            header.option,
            header.length
        );
        send_reply(writer, header.option, reply, &[message.as_bytes()])?;
        return Ok(None);
    }
    data.clear();
    data.resize(header.length as usize, 0);
    reader.read_exact(data).context("reading option data")?;

    match header.option {
        OPT_EXPORT_NAME => {
            let name = decode_name(data).map_err(ConnectionError::ExportName)?;
            let Some(export) = registry.get(&name) else {
                return Err(ConnectionError::UnknownExport(name));
            };
            admit(&export).map_err(|reason| ConnectionError::Refused { name, reason })?;
            let flags = transmission_flags(export.as_ref());
            writer
                .write_all(&export_name_reply(export.size(), flags))
                .context("answering NBD_OPT_EXPORT_NAME")?;
            if !no_zeroes {
                writer
                    .write_all(&[0u8; 124])
                    .context("answering NBD_OPT_EXPORT_NAME")?;
            }
            Ok(Some(Negotiated::Transmission(export)))
        }
        OPT_ABORT => {
            // The client may already have closed: that is fine too.
            let _ = send_reply(writer, OPT_ABORT, REP_ACK, &[]);
            let _ = writer.flush();
            Ok(Some(Negotiated::Ended))
        }
        OPT_LIST => {
            if !data.is_empty() {
                send_reply(
                    writer,
                    OPT_LIST,
                    REP_ERR_INVALID,
                    &[b"NBD_OPT_LIST takes no data"],
                )?;
                return Ok(None);
            }
            for name in registry.names() {
                let len = (name.len() as u32).to_be_bytes();
                send_reply(writer, OPT_LIST, REP_SERVER, &[&len, name.as_bytes()])?;
            }
            send_reply(writer, OPT_LIST, REP_ACK, &[])?;
            Ok(None)
        }
        OPT_INFO | OPT_GO => info_or_go(writer, registry, admit, header.option, data),
        _ => {
            send_reply(writer, header.option, REP_ERR_UNSUP, &[])?;
            Ok(None)
        }
    }
}

/// Answers `NBD_OPT_INFO` or `NBD_OPT_GO`.
fn info_or_go<W: Write>(
    writer: &mut W,
    registry: &ExportRegistry,
    admit: &mut Admit<'_>,
    option: u32,
    data: &[u8],
) -> Result<Option<Negotiated>, ConnectionError> {
    let request = match InfoRequest::decode(data) {
        Ok(request) => request,
        Err(error) => {
            log::debug!("nbd: refusing option {option}: {error}");
            let message = error.to_string();
            send_reply(writer, option, REP_ERR_INVALID, &[message.as_bytes()])?;
            return Ok(None);
        }
    };
    let Some(export) = registry.get(&request.name) else {
        let message = format!("export {:?} is not served here", request.name);
        log::debug!("nbd: {message}");
        send_reply(writer, option, REP_ERR_UNKNOWN, &[message.as_bytes()])?;
        return Ok(None);
    };
    if option == OPT_GO
        && let Err(reason) = admit(&export)
    {
        log::debug!("nbd: refusing export {:?}: {reason}", request.name);
        send_reply(writer, option, REP_ERR_POLICY, &[reason.as_bytes()])?;
        return Ok(None);
    }
    let flags = transmission_flags(export.as_ref());
    send_reply(
        writer,
        option,
        REP_INFO,
        &[&info_export(export.size(), flags)],
    )?;
    if request.items.contains(&INFO_NAME) {
        send_reply(
            writer,
            option,
            REP_INFO,
            &[&INFO_NAME.to_be_bytes(), export.name().as_bytes()],
        )?;
    }
    let (minimum, preferred, maximum) = block_sizes(export.as_ref());
    send_reply(
        writer,
        option,
        REP_INFO,
        &[&info_block_size(minimum, preferred, maximum)],
    )?;
    send_reply(writer, option, REP_ACK, &[])?;
    if option == OPT_GO {
        Ok(Some(Negotiated::Transmission(export)))
    } else {
        Ok(None)
    }
}

/// Sends one option reply whose data is the concatenation of `parts`.
fn send_reply<W: Write>(
    writer: &mut W,
    option: u32,
    reply: u32,
    parts: &[&[u8]],
) -> Result<(), ConnectionError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    writer
        .write_all(&option_reply_header(option, reply, len as u32))
        .context("sending an option reply")?;
    for part in parts {
        writer.write_all(part).context("sending an option reply")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::nbd::protocol::{
        GREETING_LEN, OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC, OptionReplyHeader,
    };

    #[derive(Debug)]
    struct Fake {
        name: &'static str,
        read_only: bool,
        max_request: u32,
    }

    impl Export for Fake {
        fn name(&self) -> &str {
            self.name
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn max_request(&self) -> u32 {
            self.max_request
        }
        fn read(&self, _: u64, _: &mut [u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8], _: bool) -> std::io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> std::io::Result<()> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn registry() -> ExportRegistry {
        let registry = ExportRegistry::new();
        registry.insert(Arc::new(Fake {
            name: "a",
            read_only: false,
            max_request: 1 << 20,
        }));
        registry.insert(Arc::new(Fake {
            name: "ro",
            read_only: true,
            max_request: 1 << 20,
        }));
        registry
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut out = OptionHeader::new(option, data.len() as u32)
            .encode()
            .to_vec();
        out.extend_from_slice(data);
        out
    }

    fn run(client: &[u8]) -> (Result<Negotiated, ConnectionError>, Vec<u8>) {
        let mut reader = BufReader::new(Cursor::new(client.to_vec()));
        let mut out = Vec::new();
        let result = negotiate(&mut reader, &mut out, &registry());
        (result, out)
    }

    /// Splits the server's option replies into (option, reply type, data).
    fn replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while bytes.len() >= OPTION_REPLY_HEADER_LEN {
            let header =
                OptionReplyHeader::decode(bytes[..OPTION_REPLY_HEADER_LEN].try_into().unwrap());
            assert_eq!(header.magic, OPTION_REPLY_MAGIC);
            let end = OPTION_REPLY_HEADER_LEN + header.length as usize;
            out.push((
                header.option,
                header.reply,
                bytes[OPTION_REPLY_HEADER_LEN..end].to_vec(),
            ));
            bytes = &bytes[end..];
        }
        assert!(bytes.is_empty(), "trailing bytes {bytes:?}");
        out
    }

    const FIXED: [u8; 4] = [0, 0, 0, 1];
    const FIXED_NO_ZEROES: [u8; 4] = [0, 0, 0, 3];

    #[test]
    fn greeting_then_hang_up() {
        let (result, out) = run(b"");
        assert!(matches!(result, Ok(Negotiated::Ended)));
        assert_eq!(out, greeting(3));
    }

    #[test]
    fn client_flags_are_checked() {
        for flags in [[0, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 5], [0x80, 0, 0, 1]] {
            let (result, _) = run(&flags);
            assert!(
                matches!(result, Err(ConnectionError::ClientFlags(_))),
                "{flags:?}"
            );
        }
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        let mut client = FIXED.to_vec();
        client.extend(opt(OPT_EXPORT_NAME, b"a"));
        let (result, out) = run(&client);
        let Ok(Negotiated::Transmission(export)) = result else {
            panic!("{result:?}")
        };
        assert_eq!(export.name(), "a");
        assert_eq!(out.len(), GREETING_LEN + 10 + 124);
        assert_eq!(
            &out[GREETING_LEN..GREETING_LEN + 10],
            &export_name_reply(1 << 20, 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100)
        );

        let mut client = FIXED_NO_ZEROES.to_vec();
        client.extend(opt(OPT_EXPORT_NAME, b""));
        let (result, out) = run(&client);
        let Ok(Negotiated::Transmission(export)) = result else {
            panic!("{result:?}")
        };
        assert_eq!(export.name(), "a", "empty name is the default export");
        assert_eq!(out.len(), GREETING_LEN + 10);
    }

    #[test]
    fn export_name_unknown_or_too_long_closes() {
        let mut client = FIXED.to_vec();
        client.extend(opt(OPT_EXPORT_NAME, b"nope"));
        assert!(matches!(
            run(&client).0,
            Err(ConnectionError::UnknownExport(name)) if name == "nope"
        ));
        let mut client = FIXED.to_vec();
        client.extend(opt(OPT_EXPORT_NAME, &[b'x'; 5000]));
        assert!(matches!(
            run(&client).0,
            Err(ConnectionError::ExportName(_))
        ));
    }

    #[test]
    fn list_then_abort() {
        let mut client = FIXED.to_vec();
        client.extend(opt(OPT_LIST, b""));
        client.extend(opt(OPT_LIST, b"junk"));
        client.extend(opt(OPT_ABORT, b""));
        let (result, out) = run(&client);
        assert!(matches!(result, Ok(Negotiated::Ended)));
        let replies = replies(&out[GREETING_LEN..]);
        assert_eq!(
            replies,
            vec![
                (OPT_LIST, REP_SERVER, b"\0\0\0\x01a".to_vec()),
                (OPT_LIST, REP_SERVER, b"\0\0\0\x02ro".to_vec()),
                (OPT_LIST, REP_ACK, vec![]),
                (
                    OPT_LIST,
                    REP_ERR_INVALID,
                    b"NBD_OPT_LIST takes no data".to_vec()
                ),
                (OPT_ABORT, REP_ACK, vec![]),
            ]
        );
    }

    #[test]
    fn info_then_go() {
        let info = InfoRequest {
            name: "ro".to_owned(),
            items: vec![INFO_NAME, 0x7777],
        }
        .encode();
        let mut client = FIXED_NO_ZEROES.to_vec();
        client.extend(opt(OPT_INFO, &info));
        client.extend(opt(OPT_GO, &info));
        let (result, out) = run(&client);
        let Ok(Negotiated::Transmission(export)) = result else {
            panic!("{result:?}")
        };
        assert_eq!(export.name(), "ro");
        let ro_flags = 0x0001 | 0x0002 | 0x0004 | 0x0008 | 0x0100;
        let mut name = INFO_NAME.to_be_bytes().to_vec();
        name.extend_from_slice(b"ro");
        let expect = |option| {
            vec![
                (option, REP_INFO, info_export(1 << 20, ro_flags).to_vec()),
                (option, REP_INFO, name.clone()),
                (option, REP_INFO, info_block_size(1, 4096, 1 << 20).to_vec()),
                (option, REP_ACK, vec![]),
            ]
        };
        let mut expected = expect(OPT_INFO);
        expected.extend(expect(OPT_GO));
        assert_eq!(replies(&out[GREETING_LEN..]), expected);
    }

    #[test]
    fn go_unknown_export_keeps_haggling() {
        let mut client = FIXED.to_vec();
        client.extend(opt(
            OPT_GO,
            &InfoRequest {
                name: "nope".to_owned(),
                items: vec![],
            }
            .encode(),
        ));
        client.extend(opt(
            OPT_GO,
            &InfoRequest {
                name: String::new(),
                items: vec![],
            }
            .encode(),
        ));
        let (result, out) = run(&client);
        let Ok(Negotiated::Transmission(export)) = result else {
            panic!("{result:?}")
        };
        assert_eq!(export.name(), "a");
        let replies = replies(&out[GREETING_LEN..]);
        assert_eq!(replies[0].1, REP_ERR_UNKNOWN);
        assert_eq!(replies.last().unwrap().1, REP_ACK);
        assert_eq!(replies.len(), 4);
    }

    #[test]
    fn bad_options_are_refused_and_skipped() {
        let mut client = FIXED.to_vec();
        client.extend(opt(OPT_STRUCTURED_REPLY, b""));
        client.extend(opt(99, b"some data"));
        client.extend(opt(OPT_INFO, &[0, 0, 0, 9, 0, 0]));
        client.extend(opt(OPT_INFO, &[0u8; MAX_OPTION_DATA as usize + 1]));
        let long_name = InfoRequest {
            name: "x".repeat(MAX_STRING_LEN + 1),
            items: vec![],
        }
        .encode();
        client.extend(opt(OPT_GO, &long_name));
        let (result, out) = run(&client);
        assert!(matches!(result, Ok(Negotiated::Ended)));
        let kinds: Vec<_> = replies(&out[GREETING_LEN..])
            .into_iter()
            .map(|(o, r, _)| (o, r))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (OPT_STRUCTURED_REPLY, REP_ERR_UNSUP),
                (99, REP_ERR_UNSUP),
                (OPT_INFO, REP_ERR_INVALID),
                (OPT_INFO, REP_ERR_TOO_BIG),
                (OPT_GO, REP_ERR_INVALID),
            ]
        );
    }

    #[test]
    fn bad_option_magic_and_truncation() {
        let mut client = FIXED.to_vec();
        client.extend_from_slice(&[0u8; 16]);
        assert!(matches!(
            run(&client).0,
            Err(ConnectionError::OptionMagic(0))
        ));

        let mut client = FIXED.to_vec();
        client.extend_from_slice(&opt(OPT_LIST, b"")[..10]);
        let err = run(&client).0.unwrap_err();
        assert!(err.is_hang_up(), "{err}");

        let mut client = FIXED.to_vec();
        client.extend_from_slice(&opt(OPT_GO, b"\0\0\0\0\0\0")[..18]);
        let err = run(&client).0.unwrap_err();
        assert!(err.is_hang_up(), "{err}");
    }

    #[test]
    fn a_refused_choice_is_answered_and_negotiation_goes_on() {
        let go = |name: &str| {
            InfoRequest {
                name: name.to_owned(),
                items: vec![],
            }
            .encode()
        };
        let mut client = FIXED_NO_ZEROES.to_vec();
        client.extend(opt(OPT_INFO, &go("a")));
        client.extend(opt(OPT_GO, &go("a")));
        client.extend(opt(OPT_GO, &go("ro")));
        let mut reader = BufReader::new(Cursor::new(client));
        let mut out = Vec::new();
        let mut asked = Vec::new();
        let mut admit = |export: &Arc<dyn Export>| {
            asked.push(export.name().to_owned());
            match export.name() {
                "a" => Err("export \"a\" has 1 connections, its limit".to_owned()),
                _ => Ok(()),
            }
        };
        let result = negotiate_admitting(&mut reader, &mut out, &registry(), &mut admit);
        let Ok(Negotiated::Transmission(export)) = result else {
            panic!("{result:?}")
        };
        assert_eq!(export.name(), "ro");
        // INFO is not a choice: only the two GOs were put to `admit`.
        assert_eq!(asked, ["a", "ro"]);
        let replies = replies(&out[GREETING_LEN..]);
        let refusal = replies
            .iter()
            .find(|(option, reply, _)| *option == OPT_GO && *reply == REP_ERR_POLICY)
            .expect("a policy error for the refused GO");
        assert!(String::from_utf8_lossy(&refusal.2).contains("its limit"));

        let mut client = FIXED.to_vec();
        client.extend(opt(OPT_EXPORT_NAME, b"a"));
        let mut reader = BufReader::new(Cursor::new(client));
        let result = negotiate_admitting(&mut reader, &mut Vec::new(), &registry(), &mut |_| {
            Err("full".to_owned())
        });
        assert!(
            matches!(&result, Err(ConnectionError::Refused { name, reason }) if name == "a" && reason == "full"),
            "{result:?}"
        );
    }

    #[test]
    fn block_sizes_follow_the_export() {
        let small = |max_request| Fake {
            name: "s",
            read_only: false,
            max_request,
        };
        assert_eq!(block_sizes(&small(1 << 25)), (1, 4096, 1 << 25));
        assert_eq!(block_sizes(&small(3000)), (1, 2048, 3000));
        assert_eq!(block_sizes(&small(0)), (1, 1, 1));
        assert_eq!(block_sizes(&small(u32::MAX)), (1, 4096, MAX_PAYLOAD));
    }
}
