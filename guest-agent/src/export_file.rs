//! [`FileExport`]: an [`Export`] backed by a plain file (or block device), without a log.
//!
//! Writes go straight to the file with `pwrite`; `FUA` and flush are `fdatasync`. Zeroing
//! and trimming punch holes (`fallocate(PUNCH_HOLE | KEEP_SIZE)`) where allowed, else use
//! `fallocate(ZERO_RANGE)`, else write zeroes, so a trimmed range always reads back as zeroes.
//! Used by tests and benchmarks, and as the reference the logged exports are measured against.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};

use crate::export::Export;

/// Default largest request: 32 MiB, the usual NBD maximum block size.
pub const DEFAULT_MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// Zeroes written when the file system cannot zero a range itself.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// A file served as an export. Its size is the file's size when opened.
#[derive(Debug)]
pub struct FileExport {
    name: String,
    file: File,
    size: u64,
    read_only: bool,
    max_request: u32,
}

impl FileExport {
    /// Opens `path` read-write as export `name`.
    pub fn open(path: &Path, name: &str) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Self::from_file(file, name, false)
    }

    /// Opens `path` read-only as export `name` (writes get `EPERM`).
    pub fn open_read_only(path: &Path, name: &str) -> io::Result<Self> {
        let file = File::open(path)?;
        Self::from_file(file, name, true)
    }

    /// Serves an open file; its size is taken now (a block device's size is found by
    /// seeking to its end).
    pub fn from_file(file: File, name: &str, read_only: bool) -> io::Result<Self> {
        let size = file_size(&file)?;
        Ok(Self {
            name: name.to_owned(),
            file,
            size,
            read_only,
            max_request: DEFAULT_MAX_REQUEST,
        })
    }

    /// Sets the largest request (the advertised maximum block size).
    pub fn with_max_request(mut self, max_request: u32) -> Self {
        self.max_request = max_request;
        self
    }

    /// Zeroes a range, deallocating it if `may_trim`.
    fn zero(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        let (Ok(off), Ok(length)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        if may_trim {
            let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match fallocate(&self.file, punch, off, length) {
                Ok(()) => return Ok(()),
                Err(errno) if unsupported(errno) => {}
                Err(errno) => return Err(errno.into()),
            }
        }
        match fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_ZERO_RANGE,
            off,
            length,
        ) {
            Ok(()) => return Ok(()),
            Err(errno) if unsupported(errno) => {}
            Err(errno) => return Err(errno.into()),
        }
        write_zeroes_at(&self.file, offset, len)
    }
}

/// Writes `len` zero bytes at `offset`.
pub(crate) fn write_zeroes_at(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        let chunk = (end - offset).min(ZEROES.len() as u64) as usize;
        file.write_all_at(&ZEROES[..chunk], offset)?;
        offset += chunk as u64;
    }
    Ok(())
}

/// Errors that mean "this file system cannot do that": fall back to something simpler.
fn unsupported(errno: Errno) -> bool {
    matches!(errno, Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL)
}

/// A file's size, or a block device's (found by seeking to its end).
pub(crate) fn file_size(file: &File) -> io::Result<u64> {
    let metadata = file.metadata()?;
    if metadata.is_file() {
        return Ok(metadata.len());
    }
    // Block devices report length 0 in their metadata.
    use std::io::Seek;
    let mut handle = file;
    handle.seek(io::SeekFrom::End(0))
}

impl Export for FileExport {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn max_request(&self) -> u32 {
        self.max_request
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, may_trim: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        self.zero(offset, len, may_trim)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        self.zero(offset, len, true)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(size: u64) -> (tempfile::NamedTempFile, FileExport) {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(size).unwrap();
        let export = FileExport::open(file.path(), "t").unwrap();
        (file, export)
    }

    #[test]
    fn write_read_zero_trim() {
        let (_file, export) = export(1 << 20);
        assert_eq!(export.size(), 1 << 20);
        assert_eq!(export.max_request(), DEFAULT_MAX_REQUEST);
        let data = vec![0xab; 300_000];
        export.write(1000, &data, true).unwrap();
        let mut back = vec![0; 300_000];
        export.read(1000, &mut back).unwrap();
        assert_eq!(back, data);

        // Zero an unaligned range without holes, and trim another (holes where possible).
        export.write_zeroes(2000, 5000, false, false).unwrap();
        export.write_zeroes(100_000, 150_000, true, true).unwrap();
        export.trim(260_000, 1000).unwrap();
        export.flush().unwrap();
        export.read(1000, &mut back).unwrap();
        for (i, byte) in back.iter().enumerate() {
            let offset = 1000 + i as u64;
            let zero = (2000..7000).contains(&offset)
                || (100_000..250_000).contains(&offset)
                || (260_000..261_000).contains(&offset);
            assert_eq!(*byte, if zero { 0 } else { 0xab }, "offset {offset}");
        }
    }

    #[test]
    fn fallback_zeroing_writes_zeroes() {
        let (_file, export) = export(200_000);
        export.write(0, &[7; 200_000], false).unwrap();
        write_zeroes_at(&export.file, 10, 150_000).unwrap();
        let mut back = vec![0; 200_000];
        export.read(0, &mut back).unwrap();
        assert!(back[..10].iter().all(|&b| b == 7));
        assert!(back[10..150_010].iter().all(|&b| b == 0));
        assert!(back[150_010..].iter().all(|&b| b == 7));
    }

    #[test]
    fn read_only_refuses() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(4096).unwrap();
        let export = FileExport::open_read_only(file.path(), "ro")
            .unwrap()
            .with_max_request(8192);
        assert!(export.read_only());
        assert_eq!(export.max_request(), 8192);
        let kind = export.write(0, b"x", false).unwrap_err().kind();
        assert_eq!(kind, io::ErrorKind::PermissionDenied);
        assert!(export.trim(0, 1).is_err());
        assert!(export.write_zeroes(0, 1, false, true).is_err());
        export.flush().unwrap();
        let mut buf = [1u8; 16];
        export.read(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 16]);
    }

    #[test]
    fn huge_ranges_are_invalid_input() {
        let (_file, export) = export(4096);
        let kind = export.zero(u64::MAX - 1, 1, true).unwrap_err().kind();
        assert_eq!(kind, io::ErrorKind::InvalidInput);
    }
}
