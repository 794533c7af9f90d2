//! The disk images behind the devices: a raw image file ([`RawFile`]) and an in-memory
//! double for tests ([`MemoryDisk`]), both through the [`BlockFile`] trait the request path
//! uses.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};

/// The largest buffer of zeroes written at once when a file system cannot zero a range
/// itself.
const ZERO_CHUNK: u64 = 1 << 20;

/// A disk image the request path reads and writes. Offsets and lengths are in bytes.
pub trait BlockFile: Send + Sync + std::fmt::Debug {
    /// The image's size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset` (all of it, or an error).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> io::Result<()>;
    /// Tells the image that `len` bytes at `offset` are no longer needed; they read back as
    /// zeroes afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read back as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// Errors opening an image.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open {} for reading and writing", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find the size of {}", path.display())]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A raw image (a regular file or a block device), opened read-write.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    /// Read once: the device's capacity is fixed for the life of a connection anyway.
    size: u64,
}

impl RawFile {
    /// Opens the image at `path`; it must exist.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| OpenError::Open {
                path: path.to_owned(),
                source,
            })?;
        // Seeking to the end works for block devices too, whose metadata says 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| OpenError::Size {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self { file, size })
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> Result<(), Errno> {
        let offset = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let len = i64::try_from(len).map_err(|_| Errno::EINVAL)?;
        fallocate(&self.file, mode, offset, len)
    }

    /// Writes zero buffers over the range: for file systems that cannot punch or zero.
    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; usize::try_from(len.min(ZERO_CHUNK)).unwrap_or(0)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            let chunk = zeroes
                .get(..usize::try_from(n).map_err(io::Error::other)?)
                .ok_or_else(|| io::Error::other("zero chunk larger than its buffer"))?;
            let at = offset
                .checked_add(done)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            self.file.write_all_at(chunk, at)?;
            done += n;
        }
        Ok(())
    }
}

/// Whether an fallocate error means "this file system cannot do that" (so fall back).
fn unsupported(errno: Errno) -> bool {
    matches!(errno, Errno::EOPNOTSUPP | Errno::ENOSYS)
}

impl BlockFile for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            Err(errno) if unsupported(errno) => self.write_zeroes(offset, len),
            Err(errno) => Err(errno.into()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            Err(errno) if unsupported(errno) => self.write_zero_buffers(offset, len),
            Err(errno) => Err(errno.into()),
        }
    }
}

/// An image in memory, for tests: it counts flushes and can be made to fail every
/// operation.
#[derive(Debug, Default)]
pub struct MemoryDisk {
    bytes: Mutex<Vec<u8>>,
    size: u64,
    failing: AtomicBool,
    flushes: AtomicU64,
}

impl MemoryDisk {
    /// A disk of `size` zero bytes.
    pub fn new(size: usize) -> Self {
        Self::from_bytes(vec![0; size])
    }

    /// A disk holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            size: bytes.len() as u64,
            bytes: Mutex::new(bytes),
            failing: AtomicBool::new(false),
            flushes: AtomicU64::new(0),
        }
    }

    /// A copy of the disk's contents.
    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// Makes every later operation fail with an I/O error (`true`) or work again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// How many flushes have succeeded.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Runs `f` on the bytes `offset..offset + len`, after the failure and bounds checks.
    fn with_range<T>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&mut [u8]) -> T,
    ) -> io::Result<T> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected I/O error"));
        }
        let mut bytes = self
            .bytes
            .lock()
            .map_err(|_| io::Error::other("memory disk lock poisoned"))?;
        let range = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(start, len)| Some(start..start.checked_add(len)?))
            .and_then(|range| bytes.get_mut(range))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        Ok(f(range))
    }
}

impl BlockFile for MemoryDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with_range(offset, buf.len() as u64, |range| buf.copy_from_slice(range))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with_range(offset, buf.len() as u64, |range| range.copy_from_slice(buf))
    }

    fn flush(&self) -> io::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected I/O error"));
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.with_range(offset, len, |range| range.fill(0))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn image(bytes: &[u8]) -> (tempfile::NamedTempFile, RawFile) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        file.flush().unwrap();
        let raw = RawFile::open(file.path()).unwrap();
        (file, raw)
    }

    #[test]
    fn a_raw_file_reads_writes_discards_and_zeroes() {
        let (_file, raw) = image(&[0xaa; 64 * 1024]);
        assert_eq!(raw.size(), 64 * 1024);
        raw.write_at(&[1, 2, 3], 10).unwrap();
        let mut buf = [0u8; 5];
        raw.read_at(&mut buf, 9).unwrap();
        assert_eq!(buf, [0xaa, 1, 2, 3, 0xaa]);
        raw.flush().unwrap();

        raw.discard(4096, 8192).unwrap();
        raw.write_zeroes(100, 50).unwrap();
        let mut all = vec![0u8; 64 * 1024];
        raw.read_at(&mut all, 0).unwrap();
        assert!(all[4096..12288].iter().all(|&b| b == 0));
        assert!(all[100..150].iter().all(|&b| b == 0));
        assert_eq!(all[99], 0xaa);
        assert_eq!(all[150], 0xaa);
        assert_eq!(all[4095], 0xaa);
        assert_eq!(all[12288], 0xaa);
        // KEEP_SIZE: the image does not shrink or grow.
        assert_eq!(RawFile::open(_file.path()).unwrap().size(), 64 * 1024);
    }

    #[test]
    fn zero_buffers_cover_ranges_longer_than_a_chunk() {
        let len = (2 * ZERO_CHUNK + 3) as usize;
        let (_file, raw) = image(&vec![0x55; len + 10]);
        raw.write_zero_buffers(5, len as u64).unwrap();
        let mut all = vec![0u8; len + 10];
        raw.read_at(&mut all, 0).unwrap();
        assert!(all[..5].iter().all(|&b| b == 0x55));
        assert!(all[5..5 + len].iter().all(|&b| b == 0));
        assert!(all[5 + len..].iter().all(|&b| b == 0x55));
    }

    #[test]
    fn zeroing_falls_back_to_writing_where_the_file_system_cannot_zero_ranges() {
        // tmpfs punches holes but answers ZERO_RANGE with EOPNOTSUPP.
        let Ok(mut file) = tempfile::NamedTempFile::new_in("/dev/shm") else {
            eprintln!("SKIPPED: no /dev/shm");
            return;
        };
        file.write_all(&[0x33; 16384]).unwrap();
        let raw = RawFile::open(file.path()).unwrap();
        assert_eq!(
            raw.fallocate(
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                0,
                512
            ),
            Err(Errno::EOPNOTSUPP)
        );
        raw.write_zeroes(1000, 5000).unwrap();
        let mut all = vec![0u8; 16384];
        raw.read_at(&mut all, 0).unwrap();
        assert!(all[..1000].iter().all(|&b| b == 0x33));
        assert!(all[1000..6000].iter().all(|&b| b == 0));
        assert!(all[6000..].iter().all(|&b| b == 0x33));
    }

    #[test]
    fn reading_past_the_end_of_a_raw_file_fails() {
        let (_file, raw) = image(&[0; 512]);
        let mut buf = [0u8; 16];
        assert!(raw.read_at(&mut buf, 500).is_err());
    }

    #[test]
    fn a_missing_image_is_an_open_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            RawFile::open(&dir.path().join("none.img")),
            Err(OpenError::Open { .. })
        ));
    }

    #[test]
    fn the_memory_disk_checks_bounds_and_injects_errors() {
        let disk = MemoryDisk::from_bytes(vec![7; 16]);
        disk.write_at(&[1, 2], 14).unwrap();
        assert!(disk.write_at(&[1, 2], 15).is_err());
        assert!(disk.write_zeroes(u64::MAX, 2).is_err());
        disk.discard(0, 2).unwrap();
        assert_eq!(&disk.contents()[..3], &[0, 0, 7]);
        disk.flush().unwrap();
        assert_eq!(disk.flush_count(), 1);
        disk.set_failing(true);
        let mut buf = [0u8; 1];
        assert!(disk.read_at(&mut buf, 0).is_err());
        assert!(disk.flush().is_err());
        assert_eq!(disk.flush_count(), 1);
        disk.set_failing(false);
        disk.read_at(&mut buf, 15).unwrap();
        assert_eq!(buf, [2]);
    }
}
