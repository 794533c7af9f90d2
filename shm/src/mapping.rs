//! Mapping a shared region into this process.
//!
//! A region lives in one of three places: a named file on tmpfs (survives a crash of any
//! process that maps it), a sealed memfd (dies with its last holder, cannot be resized under
//! a mapper), or, inside a guest, the BAR2 of an `ivshmem-plain` PCI device exposed by sysfs
//! as `/sys/bus/pci/devices/*/resource2`. All three end up as a `MAP_SHARED` mapping held by
//! a vm-memory [`MmapRegion`]; everything above this module sees only [`Mapping`].
//!
//! A read-only mapping is `PROT_READ`: a store through it would fault, so the types above
//! never hand out writers for a read-only mapping.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, VolatileMemory};

/// Smallest region this crate maps: one header page and one page of payload.
pub const MIN_REGION_SIZE: u64 = 8192;

/// Whether a mapping may be written through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `PROT_READ`: the mapping of a partner's region or of the control region.
    ReadOnly,
    /// `PROT_READ | PROT_WRITE`: the mapping of a region this process is the writer of.
    ReadWrite,
}

/// Errors from creating, opening and mapping regions.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("cannot create region file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open region file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot size region file {path} to {size} bytes")]
    Resize {
        path: PathBuf,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("region {path} is {actual} bytes, but at least {min} bytes are needed")]
    TooSmall {
        path: PathBuf,
        actual: u64,
        min: u64,
    },
    #[error("region size {size} is not a multiple of the page size 4096")]
    Unaligned { size: u64 },
    #[error("region {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("cannot create memfd {name}")]
    Memfd {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map region {path} ({size} bytes)")]
    Map {
        path: PathBuf,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot list PCI devices under {path}")]
    PciScan {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why a probe store was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the mapping is read-only: a store would fault")]
    ReadOnlyMapping,
    #[error("offset {offset} is outside the region or not 8-byte aligned")]
    Offset { offset: u64 },
}

/// A shared mapping of a whole region.
#[derive(Debug)]
pub struct Mapping {
    region: MmapRegion<()>,
    access: Access,
    source: PathBuf,
    // Keeps the memfd or file open for as long as the mapping lives, so `/proc/self/fd/N`
    // stays valid for QEMU and the memfd is not freed under us.
    file: File,
}

impl Mapping {
    /// Creates a new region file (it must not exist yet), sizes it and maps it read-write.
    ///
    /// The file is created with mode 0600: the regions carry client data.
    pub fn create_file(path: &Path, size: u64) -> Result<Self, MappingError> {
        check_size(size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| MappingError::Create {
                path: path.to_owned(),
                source,
            })?;
        // The size must be set before mapping: touching a page past EOF is SIGBUS.
        file.set_len(size).map_err(|source| MappingError::Resize {
            path: path.to_owned(),
            size,
            source,
        })?;
        Self::map(file, path.to_owned(), size, Access::ReadWrite)
    }

    /// Opens an existing region file or PCI resource and maps all of it.
    pub fn open(path: &Path, access: Access) -> Result<Self, MappingError> {
        let file = OpenOptions::new()
            .read(true)
            .write(access == Access::ReadWrite)
            .open(path)
            .map_err(|source| MappingError::Open {
                path: path.to_owned(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| MappingError::Open {
            path: path.to_owned(),
            source,
        })?;
        // sysfs PCI resources are regular files too; anything else (a directory, a device
        // node) is a mistake we refuse before mapping it.
        if !meta.file_type().is_file() {
            return Err(MappingError::NotAFile {
                path: path.to_owned(),
            });
        }
        let size = meta.len();
        if size < MIN_REGION_SIZE {
            return Err(MappingError::TooSmall {
                path: path.to_owned(),
                actual: size,
                min: MIN_REGION_SIZE,
            });
        }
        Self::map(file, path.to_owned(), size, access)
    }

    /// Creates an anonymous region in a memfd, sealed so that nobody can shrink or grow it
    /// while it is mapped, and maps it read-write. Another process reaches it by path as
    /// `/proc/<this pid>/fd/<fd of [`Mapping::file`]>` (QEMU: `mem-path=` that path), for as
    /// long as this process holds it open.
    pub fn create_memfd(name: &str, size: u64) -> Result<Self, MappingError> {
        check_size(size)?;
        let memfd_error = |source: std::io::Error| MappingError::Memfd {
            name: name.to_owned(),
            source,
        };
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create(name)
            .map_err(|e| memfd_error(memfd_to_io(e)))?;
        memfd.as_file().set_len(size).map_err(memfd_error)?;
        memfd
            .add_seals(&[
                memfd::FileSeal::SealShrink,
                memfd::FileSeal::SealGrow,
                memfd::FileSeal::SealSeal,
            ])
            .map_err(|e| memfd_error(memfd_to_io(e)))?;
        let path = PathBuf::from(format!("memfd:{name}"));
        Self::map(memfd.into_file(), path, size, Access::ReadWrite)
    }

    fn map(file: File, path: PathBuf, size: u64, access: Access) -> Result<Self, MappingError> {
        let len = usize::try_from(size).map_err(|_| MappingError::TooSmall {
            path: path.clone(),
            actual: size,
            min: MIN_REGION_SIZE,
        })?;
        let prot = match access {
            Access::ReadOnly => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        let cloned = file.try_clone().map_err(|source| MappingError::Open {
            path: path.clone(),
            source,
        })?;
        let region = MmapRegion::build(
            Some(FileOffset::new(cloned, 0)),
            len,
            prot,
            libc::MAP_SHARED,
        )
        .map_err(|source| MappingError::Map {
            path: path.clone(),
            size,
            source,
        })?;
        Ok(Self {
            region,
            access,
            source: path,
            file,
        })
    }

    /// Size of the mapping in bytes.
    pub fn len(&self) -> u64 {
        self.region.size() as u64
    }

    /// Whether the mapping is empty (never true for a mapped region).
    pub fn is_empty(&self) -> bool {
        self.region.size() == 0
    }

    /// How the region is mapped.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Where the region came from: a path, or `memfd:NAME`.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The file or memfd behind the mapping.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The 64-bit word at `offset`, for atomic loads and (on a read-write mapping) stores.
    ///
    /// Returns `None` when `offset` is out of bounds or not 8-byte aligned; callers use
    /// offsets from the validated layout, so `None` means a bug or a corrupt geometry.
    pub(crate) fn word(&self, offset: u64) -> Option<&AtomicU64> {
        let offset = usize::try_from(offset).ok()?;
        self.region.get_atomic_ref::<AtomicU64>(offset).ok()
    }

    /// Stores `value` at word `offset`, for the write-protection self-test only: it lets a
    /// test try to write where it must not be able to (a partner's region, mapped
    /// read-write from the guest's side while QEMU maps it `readonly=on`). Refused on a
    /// read-only mapping, where the store would fault.
    pub fn probe_store(&self, offset: u64, value: u64) -> Result<(), ProbeError> {
        if self.access != Access::ReadWrite {
            return Err(ProbeError::ReadOnlyMapping);
        }
        let word = self.word(offset).ok_or(ProbeError::Offset { offset })?;
        word.store(value, Ordering::Release);
        Ok(())
    }

    /// Loads the word at `offset` with acquire ordering (0 when out of bounds).
    pub(crate) fn load(&self, offset: u64) -> u64 {
        self.word(offset).map_or(0, |w| w.load(Ordering::Acquire))
    }

    /// Copies `buf.len()` bytes starting at `offset` out of the region.
    /// Returns false (and copies nothing) when the range is out of bounds.
    pub(crate) fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> bool {
        let Ok(offset) = usize::try_from(offset) else {
            return false;
        };
        match self.region.get_slice(offset, buf.len()) {
            Ok(slice) => slice.copy_to(buf) == buf.len(),
            Err(_) => false,
        }
    }

    /// Copies `buf` into the region at `offset`. Only writers call this, and writers exist
    /// only for read-write mappings.
    pub(crate) fn write_bytes(&self, offset: u64, buf: &[u8]) -> bool {
        debug_assert_eq!(self.access, Access::ReadWrite);
        let Ok(offset) = usize::try_from(offset) else {
            return false;
        };
        match self.region.get_slice(offset, buf.len()) {
            Ok(slice) => {
                slice.copy_from(buf);
                true
            }
            Err(_) => false,
        }
    }
}

fn check_size(size: u64) -> Result<(), MappingError> {
    if size % 4096 != 0 {
        return Err(MappingError::Unaligned { size });
    }
    if size < MIN_REGION_SIZE {
        return Err(MappingError::TooSmall {
            path: PathBuf::new(),
            actual: size,
            min: MIN_REGION_SIZE,
        });
    }
    Ok(())
}

fn memfd_to_io(error: memfd::Error) -> std::io::Error {
    match error {
        memfd::Error::Create(e) | memfd::Error::AddSeals(e) | memfd::Error::GetSeals(e) => e,
    }
}

/// PCI vendor and device id of QEMU's `ivshmem-plain`.
pub const IVSHMEM_VENDOR: u16 = 0x1af4;
/// PCI device id of QEMU's `ivshmem` devices.
pub const IVSHMEM_DEVICE: u16 = 0x1110;

/// Lists the `resource2` files (the shared-memory BAR) of every ivshmem device under
/// `pci_root` (normally `/sys/bus/pci/devices`), sorted by PCI address.
///
/// PCI slot order says nothing about which region is which: identify each one by its header
/// (see [`crate::inspect::identify`]).
pub fn ivshmem_resources(pci_root: &Path) -> Result<Vec<PathBuf>, MappingError> {
    let scan_error = |source| MappingError::PciScan {
        path: pci_root.to_owned(),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(pci_root).map_err(scan_error)? {
        let dir = entry.map_err(scan_error)?.path();
        let id = |name: &str| -> Option<u16> {
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            u16::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
        };
        if id("vendor") == Some(IVSHMEM_VENDOR) && id("device") == Some(IVSHMEM_DEVICE) {
            let resource = dir.join("resource2");
            if resource.exists() {
                found.push(resource);
            }
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_mapping_is_shared_between_two_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        let writer = Mapping::create_file(&path, MIN_REGION_SIZE).unwrap();
        let reader = Mapping::open(&path, Access::ReadOnly).unwrap();
        writer.word(64).unwrap().store(0xfeed, Ordering::Release);
        assert_eq!(reader.load(64), 0xfeed);
        assert!(writer.write_bytes(100, b"hello"));
        let mut buf = [0u8; 5];
        assert!(reader.read_bytes(100, &mut buf));
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn out_of_bounds_and_misaligned_accesses_are_refused() {
        let m = Mapping::create_memfd("t", MIN_REGION_SIZE).unwrap();
        assert!(m.word(MIN_REGION_SIZE).is_none());
        assert!(m.word(3).is_none());
        assert!(m.word(u64::MAX).is_none());
        let mut buf = [0u8; 16];
        assert!(!m.read_bytes(MIN_REGION_SIZE - 8, &mut buf));
        assert!(!m.write_bytes(u64::MAX - 4, &buf));
    }

    #[test]
    fn create_refuses_existing_files_and_bad_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r");
        Mapping::create_file(&path, MIN_REGION_SIZE).unwrap();
        let err = Mapping::create_file(&path, MIN_REGION_SIZE).unwrap_err();
        assert!(matches!(err, MappingError::Create { .. }), "{err}");
        assert!(matches!(
            Mapping::create_file(&dir.path().join("x"), 5000),
            Err(MappingError::Unaligned { .. })
        ));
        assert!(matches!(
            Mapping::create_memfd("small", 4096),
            Err(MappingError::TooSmall { .. })
        ));
    }

    #[test]
    fn open_refuses_small_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, [0u8; 100]).unwrap();
        assert!(matches!(
            Mapping::open(&small, Access::ReadOnly),
            Err(MappingError::TooSmall { .. })
        ));
        assert!(matches!(
            Mapping::open(dir.path(), Access::ReadOnly),
            Err(MappingError::NotAFile { .. })
        ));
        assert!(matches!(
            Mapping::open(&dir.path().join("missing"), Access::ReadOnly),
            Err(MappingError::Open { .. })
        ));
    }

    #[test]
    fn memfd_is_sealed_against_resizing() {
        let m = Mapping::create_memfd("sealed", MIN_REGION_SIZE).unwrap();
        assert!(m.file().set_len(4096).is_err());
        assert!(m.file().set_len(MIN_REGION_SIZE * 2).is_err());
        assert_eq!(m.len(), MIN_REGION_SIZE);
    }

    #[test]
    fn finds_ivshmem_resources_in_a_sysfs_tree() {
        let root = tempfile::tempdir().unwrap();
        let device = |slot: &str, vendor: &str, dev: &str| {
            let d = root.path().join(slot);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("vendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(d.join("device"), format!("{dev}\n")).unwrap();
            std::fs::write(d.join("resource2"), vec![0u8; MIN_REGION_SIZE as usize]).unwrap();
        };
        device("0000:00:05.0", "0x1af4", "0x1110");
        device("0000:00:03.0", "0x1af4", "0x1110");
        device("0000:00:04.0", "0x1af4", "0x1001"); // virtio-blk: not ours
        let found = ivshmem_resources(root.path()).unwrap();
        let names: Vec<_> = found
            .iter()
            .map(|p| p.parent().unwrap().file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["0000:00:03.0", "0000:00:05.0"]);
        let m = Mapping::open(&found[0], Access::ReadOnly).unwrap();
        assert_eq!(m.len(), MIN_REGION_SIZE);
    }
}
