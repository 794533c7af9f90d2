//! A link's frames: a 56-byte header, little-endian, then the payload.
//!
//! ```text
//!  0  magic "IVIC"          4  version u16 (2)  6  kind u8    7  flags u8 (0)
//!  8  from node u16        10  to node u16     12  link u16  14  channel u16
//! 16  session u64: the sender's, larger at each start of its agent
//! 24  to_session u64: the receiver's session as the sender knows it (0: not known yet)
//! 32  seq u64 (Data: the message's number in its channel; Hello/HelloAck: the sender's
//!     capabilities; 0 otherwise)
//! 40  ack u64 (Data, Ack: every message of the channel up to this number arrived)
//! 48  payload length u32   52  crc32c u32 of the header (this field zero) and the payload
//! ```
//!
//! Version 2: version 1 had no `to_session` (a 48-byte header). The two sessions bind a
//! frame to one start of each node, so neither side takes the other's frames meant for an
//! earlier start.
//!
//! Decoding checks every field it can before trusting any: the length against the bytes
//! there and the limit, the crc, the kind. A frame of another version decodes far enough to
//! say which version (so a session can refuse the peer with a reason) and no further: the
//! version is read from the first six bytes, before the length, since another version's
//! header may be shorter.

/// "IVIC": ivha interconnect.
pub const MAGIC: [u8; 4] = *b"IVIC";
/// The version this build speaks.
pub const VERSION: u16 = 2;
/// Bytes of the header.
pub const HEADER_LEN: usize = 56;
/// Where the payload length is.
const LEN_AT: usize = 48;
/// Where the crc is.
const CRC_AT: usize = 52;
/// Bytes that say magic and version: enough to refuse another version.
const VERSION_END: usize = 6;
/// The largest payload a frame carries (fits a 64 KiB datagram with the header).
pub const MAX_PAYLOAD: usize = 65_000;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Opens a session on a link: the sender's version, node and capabilities.
    Hello,
    /// Accepts the peer's Hello.
    HelloAck,
    /// Refuses the peer's Hello; the payload says why, in words.
    Refuse,
    /// The link is alive; the payload carries clock stamps for the round trip.
    Heartbeat,
    /// A channel's message number `seq`, carrying `ack` for the other direction.
    Data,
    /// Acknowledges a channel's messages up to `ack`.
    Ack,
}

impl Kind {
    /// Whether `bytes`, a frame of any version, says it is a Refuse: every version so far
    /// keeps the kind at byte 6, and a Refuse must never be answered with one (two builds
    /// of different versions would refuse each other forever).
    pub fn is_refuse(bytes: &[u8]) -> bool {
        bytes.get(6) == Some(&Kind::Refuse.code())
    }

    fn code(self) -> u8 {
        match self {
            Kind::Hello => 1,
            Kind::HelloAck => 2,
            Kind::Refuse => 3,
            Kind::Heartbeat => 4,
            Kind::Data => 5,
            Kind::Ack => 6,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Refuse,
            4 => Kind::Heartbeat,
            5 => Kind::Data,
            6 => Kind::Ack,
            _ => return None,
        })
    }
}

/// A frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub from: u16,
    pub to: u16,
    pub link: u16,
    pub channel: u16,
    /// The sender's session.
    pub session: u64,
    /// The receiver's session as the sender knows it; 0 when it knows none yet.
    pub to_session: u64,
    pub seq: u64,
    pub ack: u64,
    pub payload: Vec<u8>,
}

/// Why bytes are not a frame this build reads. Each is dropped and counted by its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{len} bytes are shorter than a frame header")]
    Short { len: usize },
    #[error("the bytes do not start with the interconnect's magic")]
    Magic,
    #[error("the peer speaks interconnect version {version}; this node speaks {VERSION}")]
    Version { version: u16 },
    #[error("the frame says {said} payload bytes, but {there} follow its header")]
    Length { said: usize, there: usize },
    #[error("the payload length {len} is over the limit of {MAX_PAYLOAD}")]
    TooLong { len: usize },
    #[error("the frame's crc32c does not match its bytes")]
    Crc,
    #[error("frame kind {code} is not one this node knows")]
    Kind { code: u8 },
    #[error("the frame sets flags {flags:#04x}, which this version leaves zero")]
    Flags { flags: u8 },
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a payload of {len} bytes is over the frame limit of {MAX_PAYLOAD}")]
pub struct TooLong {
    pub len: usize,
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    let mut word = [0u8; 2];
    word.copy_from_slice(&bytes[at..at + 2]);
    u16::from_le_bytes(word)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

impl Frame {
    /// A frame of `kind` from `from` (of `session`) to `to` on `link`, every other field
    /// zero.
    pub fn new(kind: Kind, from: u16, to: u16, link: u16, session: u64) -> Self {
        Self {
            kind,
            from,
            to,
            link,
            channel: 0,
            session,
            to_session: 0,
            seq: 0,
            ack: 0,
            payload: Vec::new(),
        }
    }

    /// The frame's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, TooLong> {
        let len = self.payload.len();
        if len > MAX_PAYLOAD {
            return Err(TooLong { len });
        }
        let mut bytes = Vec::with_capacity(HEADER_LEN + len);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.push(self.kind.code());
        bytes.push(0);
        for word in [self.from, self.to, self.link, self.channel] {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        for word in [self.session, self.to_session, self.seq, self.ack] {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        // The length was checked against MAX_PAYLOAD, which fits a u32.
        bytes.extend_from_slice(&(len as u32).to_le_bytes());
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&self.payload);
        let crc = crc32c::crc32c(&bytes);
        bytes[CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        Ok(bytes)
    }

    /// Reads one frame that is exactly `bytes` (a datagram, or a record a stream reader cut).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() < VERSION_END {
            return Err(DecodeError::Short { len: bytes.len() });
        }
        if bytes[0..4] != MAGIC {
            return Err(DecodeError::Magic);
        }
        let version = u16_at(bytes, 4);
        if version != VERSION {
            return Err(DecodeError::Version { version });
        }
        if bytes.len() < HEADER_LEN {
            return Err(DecodeError::Short { len: bytes.len() });
        }
        let said = u32_at(bytes, LEN_AT) as usize;
        if said > MAX_PAYLOAD {
            return Err(DecodeError::TooLong { len: said });
        }
        let there = bytes.len() - HEADER_LEN;
        if said != there {
            return Err(DecodeError::Length { said, there });
        }
        let mut sealed = bytes.to_vec();
        sealed[CRC_AT..HEADER_LEN].copy_from_slice(&[0; 4]);
        if crc32c::crc32c(&sealed) != u32_at(bytes, CRC_AT) {
            return Err(DecodeError::Crc);
        }
        let code = bytes[6];
        let kind = Kind::from_code(code).ok_or(DecodeError::Kind { code })?;
        if bytes[7] != 0 {
            return Err(DecodeError::Flags { flags: bytes[7] });
        }
        Ok(Self {
            kind,
            from: u16_at(bytes, 8),
            to: u16_at(bytes, 10),
            link: u16_at(bytes, 12),
            channel: u16_at(bytes, 14),
            session: u64_at(bytes, 16),
            to_session: u64_at(bytes, 24),
            seq: u64_at(bytes, 32),
            ack: u64_at(bytes, 40),
            payload: bytes[HEADER_LEN..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn data() -> Frame {
        Frame {
            kind: Kind::Data,
            from: 1,
            to: 2,
            link: 1,
            channel: 7,
            session: 0xfeed_beef,
            to_session: 0xcafe,
            seq: 42,
            ack: 41,
            payload: b"takeover a?".to_vec(),
        }
    }

    #[test]
    fn a_frame_reads_back_as_written() {
        for kind in [
            Kind::Hello,
            Kind::HelloAck,
            Kind::Refuse,
            Kind::Heartbeat,
            Kind::Data,
            Kind::Ack,
        ] {
            let frame = Frame { kind, ..data() };
            let bytes = frame.encode().unwrap();
            assert_eq!(bytes.len(), HEADER_LEN + frame.payload.len());
            assert_eq!(Frame::decode(&bytes).unwrap(), frame);
        }
    }

    #[test]
    fn bad_bytes_get_the_reason() {
        let bytes = data().encode().unwrap();
        assert_eq!(
            Frame::decode(&bytes[..20]),
            Err(DecodeError::Short { len: 20 })
        );
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert_eq!(Frame::decode(&magic), Err(DecodeError::Magic));
        let mut version = bytes.clone();
        version[4] = 9;
        assert_eq!(
            Frame::decode(&version),
            Err(DecodeError::Version { version: 9 })
        );
        assert_eq!(
            Frame::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Length {
                said: 11,
                there: 10
            })
        );
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        assert_eq!(Frame::decode(&flipped), Err(DecodeError::Crc));
        let mut long = bytes.clone();
        long[LEN_AT..CRC_AT].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(matches!(
            Frame::decode(&long),
            Err(DecodeError::TooLong { .. })
        ));
        let big = Frame {
            payload: vec![0; MAX_PAYLOAD + 1],
            ..data()
        };
        assert_eq!(
            big.encode(),
            Err(TooLong {
                len: MAX_PAYLOAD + 1
            })
        );
    }

    /// `bytes` with byte `at` set to `value` and the crc made right again.
    fn resealed(at: usize, value: u8) -> Vec<u8> {
        let mut bytes = data().encode().unwrap();
        bytes[at] = value;
        bytes[CRC_AT..HEADER_LEN].copy_from_slice(&[0; 4]);
        let crc = crc32c::crc32c(&bytes);
        bytes[CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn an_unknown_kind_or_set_flags_with_a_right_crc_are_refused() {
        assert_eq!(
            Frame::decode(&resealed(6, 99)),
            Err(DecodeError::Kind { code: 99 })
        );
        // Found by the fuzz target: flags must be zero, or the frame would not read back.
        assert_eq!(
            Frame::decode(&resealed(7, 0xd2)),
            Err(DecodeError::Flags { flags: 0xd2 })
        );
    }

    #[test]
    fn the_two_sessions_sit_where_the_layout_says() {
        let bytes = data().encode().unwrap();
        assert_eq!(u64_at(&bytes, 16), 0xfeed_beef);
        assert_eq!(u64_at(&bytes, 24), 0xcafe);
        assert_eq!(u64_at(&bytes, 32), 42);
        assert_eq!(u64_at(&bytes, 40), 41);
    }

    /// A version 1 frame has a shorter header: it is still refused for its version, so
    /// the peer hears why, not as malformed bytes.
    #[test]
    fn a_short_frame_of_another_version_says_its_version() {
        let mut old = data().encode().unwrap()[..48].to_vec();
        old[4..6].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(
            Frame::decode(&old),
            Err(DecodeError::Version { version: 1 })
        );
        assert_eq!(Frame::decode(b"IVI"), Err(DecodeError::Short { len: 3 }));
    }
}
