//! The static header both region kinds start with: magic, fields, crc32c.

use crate::layout::{HEADER_PAGE, NAME_LEN, STATIC_HEADER_CRC_OFFSET, STATIC_HEADER_LEN};
use crate::mapping::Mapping;

/// Why a region's header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the header could not be read (region smaller than its header?)")]
    Unreadable,
    #[error("magic is {found:?}, expected {expected:?}")]
    Magic { found: String, expected: String },
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Crc { stored: u32, computed: u32 },
    #[error("name table checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    NameTableCrc { stored: u32, computed: u32 },
    #[error(
        "format version {found} is not supported (this build reads version {supported}); a state directory made by another ivha release is refused rather than misread: flush and remove it with that release's `hostd down --purge`, or use another --state-dir"
    )]
    Version { found: u32, supported: u32 },
    #[error("header says the region is {recorded} bytes, but {mapped} bytes are mapped")]
    Size { recorded: u64, mapped: u64 },
    #[error("bad geometry: {0}")]
    Geometry(String),
    #[error("name at byte {offset} is not UTF-8 text")]
    Name { offset: usize },
}

/// The first [`STATIC_HEADER_LEN`] bytes of a region, as a byte buffer with typed accessors.
#[derive(Debug, Clone)]
pub(crate) struct StaticHeader {
    bytes: [u8; STATIC_HEADER_LEN],
}

impl StaticHeader {
    pub(crate) fn new(magic: [u8; 8]) -> Self {
        let mut bytes = [0u8; STATIC_HEADER_LEN];
        bytes[..8].copy_from_slice(&magic);
        Self { bytes }
    }

    /// Reads and checks magic and crc. Field checks are the caller's.
    pub(crate) fn load(mapping: &Mapping, magic: [u8; 8]) -> Result<Self, HeaderError> {
        let mut bytes = [0u8; STATIC_HEADER_LEN];
        if !mapping.read_bytes(0, &mut bytes) {
            return Err(HeaderError::Unreadable);
        }
        if bytes[..8] != magic {
            return Err(HeaderError::Magic {
                found: String::from_utf8_lossy(&bytes[..8]).into_owned(),
                expected: String::from_utf8_lossy(&magic).into_owned(),
            });
        }
        let h = Self { bytes };
        let stored = h.u32(STATIC_HEADER_CRC_OFFSET);
        let computed = h.crc();
        if stored != computed {
            return Err(HeaderError::Crc { stored, computed });
        }
        Ok(h)
    }

    /// The magic at the start of a mapping, whatever kind of region it is.
    pub(crate) fn peek_magic(mapping: &Mapping) -> Option<[u8; 8]> {
        let mut magic = [0u8; 8];
        mapping.read_bytes(0, &mut magic).then_some(magic)
    }

    fn crc(&self) -> u32 {
        crc32c::crc32c(&self.bytes[..STATIC_HEADER_CRC_OFFSET])
    }

    /// Seals the header with its crc and writes it at the region's start.
    pub(crate) fn store(mut self, mapping: &Mapping) {
        let crc = self.crc();
        self.put_u32(STATIC_HEADER_CRC_OFFSET, crc);
        mapping.write_bytes(0, &self.bytes);
    }

    pub(crate) fn put_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    pub(crate) fn put_u64(&mut self, offset: usize, value: u64) {
        self.bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    }

    /// Stores a name of at most [`NAME_LEN`] bytes (callers check), NUL padded.
    pub(crate) fn put_name(&mut self, offset: usize, name: &str) {
        let len = name.len().min(NAME_LEN);
        self.bytes[offset..offset + len].copy_from_slice(&name.as_bytes()[..len]);
    }

    pub(crate) fn u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    pub(crate) fn u64(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[offset..offset + 8]);
        u64::from_le_bytes(b)
    }

    pub(crate) fn name(&self, offset: usize) -> Result<String, HeaderError> {
        decode_name(&self.bytes[offset..offset + NAME_LEN]).ok_or(HeaderError::Name { offset })
    }
}

/// A NUL-padded name; `None` if it is not UTF-8.
pub(crate) fn decode_name(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    std::str::from_utf8(&bytes[..end]).ok().map(str::to_owned)
}

/// Zeroes the whole header page (used when formatting).
pub(crate) fn clear_header_page(mapping: &Mapping) {
    mapping.write_bytes(0, &[0u8; HEADER_PAGE as usize]);
}
