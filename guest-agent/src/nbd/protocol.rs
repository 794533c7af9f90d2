//! NBD wire format: fixed-size messages and their encoding (the constants are `wire::nbd`).
//!
//! Everything on the wire is big-endian ("network byte order"). Names follow the NBD
//! specification (`doc/proto.md` in the NetworkBlockDevice/nbd repository) so they can be
//! looked up there. Only what this server speaks is here: fixed newstyle negotiation,
//! `NBD_OPT_INFO`/`NBD_OPT_GO`, and simple replies.

use std::io;

pub use wire::nbd::*;

/// The server's opening message.
pub fn greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// An option header sent by the client during negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Must be [`IHAVEOPT`].
    pub magic: u64,
    /// `NBD_OPT_*`.
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// The header a client sends for `option` with `length` bytes of data.
    pub fn new(option: u32, length: u32) -> Self {
        Self {
            magic: IHAVEOPT,
            option,
            length,
        }
    }

    /// Decodes an option header.
    pub fn decode(bytes: &[u8; OPTION_HEADER_LEN]) -> Self {
        Self {
            magic: be_u64(bytes, 0),
            option: be_u32(bytes, 8),
            length: be_u32(bytes, 12),
        }
    }

    /// Encodes an option header (what a client sends).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[0..8].copy_from_slice(&self.magic.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// The header of an option reply; `length` bytes of data follow it.
pub fn option_reply_header(option: u32, reply: u32, length: u32) -> [u8; OPTION_REPLY_HEADER_LEN] {
    let mut out = [0u8; OPTION_REPLY_HEADER_LEN];
    out[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out[8..12].copy_from_slice(&option.to_be_bytes());
    out[12..16].copy_from_slice(&reply.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// A decoded option reply header (what a client reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// Must be [`OPTION_REPLY_MAGIC`].
    pub magic: u64,
    /// The option this answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Decodes an option reply header.
    pub fn decode(bytes: &[u8; OPTION_REPLY_HEADER_LEN]) -> Self {
        Self {
            magic: be_u64(bytes, 0),
            option: be_u32(bytes, 8),
            reply: be_u32(bytes, 12),
            length: be_u32(bytes, 16),
        }
    }
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, transmission_flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&minimum.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..14].copy_from_slice(&maximum.to_be_bytes());
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME` without its optional 124 zero bytes.
pub fn export_name_reply(size: u64, transmission_flags: u16) -> [u8; 10] {
    let mut out = [0u8; 10];
    out[0..8].copy_from_slice(&size.to_be_bytes());
    out[8..10].copy_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// Why the data of an `NBD_OPT_INFO`/`NBD_OPT_GO` option cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionDataError {
    /// The lengths inside the option do not add up to the option's length.
    #[error("option data of {len} bytes is malformed: {what}")]
    Malformed {
        /// Length of the option data.
        len: usize,
        /// What does not add up.
        what: &'static str,
    },
    /// The export name is longer than the specification allows.
    #[error("export name of {0} bytes is longer than the {MAX_STRING_LEN} bytes allowed")]
    NameTooLong(usize),
    /// The export name is not UTF-8 or contains NUL.
    #[error("export name is not a valid NBD string (UTF-8 without NUL)")]
    NameInvalid,
}

/// The decoded data of `NBD_OPT_INFO` or `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export asked for ("" is the default export).
    pub name: String,
    /// The `NBD_INFO_*` items asked for (unknown ones are allowed and ignored).
    pub items: Vec<u16>,
}

impl InfoRequest {
    /// Decodes `NBD_OPT_INFO`/`NBD_OPT_GO` data: u32 name length, name, u16 count,
    /// count × u16 info types.
    pub fn decode(data: &[u8]) -> Result<Self, OptionDataError> {
        let malformed = |what| OptionDataError::Malformed {
            len: data.len(),
            what,
        };
        let name_len_bytes: [u8; 4] = data
            .get(0..4)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| malformed("no room for the name length"))?;
        let name_len = u32::from_be_bytes(name_len_bytes) as usize;
        let rest = &data[4..];
        if name_len > rest.len() {
            return Err(malformed("the name length runs past the end"));
        }
        let (name_bytes, rest) = rest.split_at(name_len);
        let count_bytes: [u8; 2] = rest
            .get(0..2)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| malformed("no room for the number of info requests"))?;
        let count = usize::from(u16::from_be_bytes(count_bytes));
        let rest = &rest[2..];
        if rest.len() != count * 2 {
            return Err(malformed(
                "the number of info requests does not match the length",
            ));
        }
        let name = decode_name(name_bytes)?;
        let items = rest
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Ok(Self { name, items })
    }

    /// Encodes the option data (what a client sends).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.name.len() + 2 * self.items.len());
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(&(self.items.len() as u16).to_be_bytes());
        for item in &self.items {
            out.extend_from_slice(&item.to_be_bytes());
        }
        out
    }
}

/// Checks an export name: at most [`MAX_STRING_LEN`] bytes of UTF-8 without NUL.
pub fn decode_name(bytes: &[u8]) -> Result<String, OptionDataError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(OptionDataError::NameTooLong(bytes.len()));
    }
    match std::str::from_utf8(bytes) {
        Ok(name) if !name.contains('\0') => Ok(name.to_owned()),
        _ => Err(OptionDataError::NameInvalid),
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Must be [`REQUEST_MAGIC`].
    pub magic: u32,
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub command: u16,
    /// Opaque value echoed in the reply (the spec's "handle" or "cookie").
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (of the payload, for a write).
    pub length: u32,
}

impl Request {
    /// The request a client sends.
    pub fn new(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Self {
        Self {
            magic: REQUEST_MAGIC,
            flags,
            command,
            cookie,
            offset,
            length,
        }
    }

    /// Decodes a request header (the magic is not checked here).
    pub fn decode(bytes: &[u8; REQUEST_LEN]) -> Self {
        Self {
            magic: be_u32(bytes, 0),
            flags: be_u16(bytes, 4),
            command: be_u16(bytes, 6),
            cookie: be_u64(bytes, 8),
            offset: be_u64(bytes, 16),
            length: be_u32(bytes, 24),
        }
    }

    /// Encodes a request header (what a client sends).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&self.magic.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A simple reply header; a successful read's data follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// Must be [`SIMPLE_REPLY_MAGIC`].
    pub magic: u32,
    /// 0 or an NBD error value.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// A reply with the right magic.
    pub fn new(error: u32, cookie: u64) -> Self {
        Self {
            magic: SIMPLE_REPLY_MAGIC,
            error,
            cookie,
        }
    }

    /// Encodes the reply header.
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut out = [0u8; SIMPLE_REPLY_LEN];
        out[0..4].copy_from_slice(&self.magic.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }

    /// Decodes a reply header (what a client reads).
    pub fn decode(bytes: &[u8; SIMPLE_REPLY_LEN]) -> Self {
        Self {
            magic: be_u32(bytes, 0),
            error: be_u32(bytes, 4),
            cookie: be_u64(bytes, 8),
        }
    }
}

/// Maps an export's I/O error to the NBD error value sent to the client.
///
/// `InvalidInput` → `EINVAL`; `PermissionDenied` and `ReadOnlyFilesystem` → `EPERM`;
/// `StorageFull`, `QuotaExceeded` and `FileTooLarge` (ENOSPC, EDQUOT, EFBIG: the spec asks
/// for the last two to be reported as ENOSPC) → `ENOSPC`; anything else → `EIO`.
pub fn errno_for(error: &io::Error) -> u32 {
    match error.kind() {
        io::ErrorKind::InvalidInput => EINVAL,
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => EPERM,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            ENOSPC
        }
        _ => EIO,
    }
}

fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(b)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn greeting_layout() {
        let g = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn request_decodes_big_endian() {
        let bytes: [u8; REQUEST_LEN] = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // command: WRITE
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0x00, // offset 4096
            0, 0, 0x02, 0x00, // length 512
        ];
        let request = Request::decode(&bytes);
        assert_eq!(
            request,
            Request {
                magic: REQUEST_MAGIC,
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 512,
            }
        );
        assert_eq!(request.encode(), bytes);
    }

    #[test]
    fn simple_reply_layout() {
        let reply = SimpleReply::new(EINVAL, 0xdead_beef_0000_0001);
        let bytes = reply.encode();
        assert_eq!(
            bytes,
            [
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1
            ]
        );
        assert_eq!(SimpleReply::decode(&bytes), reply);
    }

    #[test]
    fn option_header_round_trip() {
        let header = OptionHeader {
            magic: IHAVEOPT,
            option: OPT_GO,
            length: 0x0102_0304,
        };
        let bytes = header.encode();
        assert_eq!(&bytes[..8], b"IHAVEOPT");
        assert_eq!(&bytes[8..], &[0, 0, 0, 7, 1, 2, 3, 4]);
        assert_eq!(OptionHeader::decode(&bytes), header);
    }

    #[test]
    fn option_reply_header_layout() {
        let bytes = option_reply_header(OPT_LIST, REP_ERR_UNSUP, 5);
        assert_eq!(
            bytes,
            [
                0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 3, 0x80, 0, 0, 1, 0, 0, 0, 5
            ]
        );
        let decoded = OptionReplyHeader::decode(&bytes);
        assert_eq!(decoded.magic, OPTION_REPLY_MAGIC);
        assert_eq!(decoded.reply, REP_ERR_UNSUP);
        assert_eq!(decoded.length, 5);
    }

    #[test]
    fn info_items_layout() {
        assert_eq!(
            info_export(0x1_0000_0000, 0x0143),
            [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0x01, 0x43]
        );
        assert_eq!(
            info_block_size(1, 4096, 32 << 20),
            [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]
        );
        assert_eq!(
            export_name_reply(512, 0x0001),
            [0, 0, 0, 0, 0, 0, 2, 0, 0, 1]
        );
    }

    #[test]
    fn info_request_round_trip() {
        let request = InfoRequest {
            name: "a".to_owned(),
            items: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let bytes = request.encode();
        assert_eq!(bytes, [0, 0, 0, 1, b'a', 0, 2, 0, 3, 0, 1]);
        assert_eq!(InfoRequest::decode(&bytes), Ok(request));
    }

    #[test]
    fn info_request_rejects_bad_lengths() {
        // Too short for the name length.
        assert!(matches!(
            InfoRequest::decode(&[0, 0, 0]),
            Err(OptionDataError::Malformed { .. })
        ));
        // Name runs past the end.
        assert!(matches!(
            InfoRequest::decode(&[0, 0, 0, 9, b'a', 0, 0]),
            Err(OptionDataError::Malformed { .. })
        ));
        // No room for the count.
        assert!(matches!(
            InfoRequest::decode(&[0, 0, 0, 1, b'a', 0]),
            Err(OptionDataError::Malformed { .. })
        ));
        // Count says 2, one item present.
        assert!(matches!(
            InfoRequest::decode(&[0, 0, 0, 0, 0, 2, 0, 3]),
            Err(OptionDataError::Malformed { .. })
        ));
        // Trailing garbage.
        assert!(matches!(
            InfoRequest::decode(&[0, 0, 0, 0, 0, 0, 0xff]),
            Err(OptionDataError::Malformed { .. })
        ));
        // Empty name, no items: fine.
        assert_eq!(
            InfoRequest::decode(&[0, 0, 0, 0, 0, 0]),
            Ok(InfoRequest {
                name: String::new(),
                items: vec![]
            })
        );
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(decode_name(b"disk"), Ok("disk".to_owned()));
        assert_eq!(decode_name(b"a\0b"), Err(OptionDataError::NameInvalid));
        assert_eq!(
            decode_name(&[0xff, 0xfe]),
            Err(OptionDataError::NameInvalid)
        );
        assert_eq!(
            decode_name(&[b'x'; MAX_STRING_LEN + 1]),
            Err(OptionDataError::NameTooLong(MAX_STRING_LEN + 1))
        );
        assert!(decode_name(&[b'x'; MAX_STRING_LEN]).is_ok());
    }

    #[test]
    fn errno_mapping() {
        let kind = |k: io::ErrorKind| errno_for(&io::Error::from(k));
        assert_eq!(kind(io::ErrorKind::InvalidInput), EINVAL);
        assert_eq!(kind(io::ErrorKind::PermissionDenied), EPERM);
        assert_eq!(kind(io::ErrorKind::StorageFull), ENOSPC);
        assert_eq!(kind(io::ErrorKind::UnexpectedEof), EIO);
        assert_eq!(kind(io::ErrorKind::Other), EIO);
        assert_eq!(errno_for(&io::Error::from_raw_os_error(28)), ENOSPC);
        assert_eq!(errno_for(&io::Error::from_raw_os_error(122)), ENOSPC); // EDQUOT
        assert_eq!(errno_for(&io::Error::from_raw_os_error(27)), ENOSPC); // EFBIG
        assert_eq!(errno_for(&io::Error::from_raw_os_error(1)), EPERM);
        assert_eq!(errno_for(&io::Error::from_raw_os_error(13)), EPERM); // EACCES
        assert_eq!(errno_for(&io::Error::from_raw_os_error(22)), EINVAL);
        assert_eq!(errno_for(&io::Error::from_raw_os_error(5)), EIO);
    }
}
