//! Reading a growing JSON-lines file: whole lines only, remembering a partial last line,
//! starting over when the file is truncated or replaced.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::EventsError;

/// Reads a growing JSON-lines file: whole lines only, remembering a partial last line.
#[derive(Debug)]
pub(super) struct LogReader {
    path: PathBuf,
    file: File,
    inode: (u64, u64),
    /// Bytes of the file consumed so far.
    position: u64,
    /// The start of a line whose newline has not been written yet.
    partial: Vec<u8>,
    /// Number of the last complete line returned (1-based).
    line_number: usize,
}

impl LogReader {
    pub(super) fn open(path: &Path) -> Result<Self, EventsError> {
        let file = File::open(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                EventsError::NoEventLog {
                    path: path.to_owned(),
                }
            } else {
                EventsError::Read {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        let metadata = file.metadata().map_err(|source| EventsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            file,
            inode: (metadata.dev(), metadata.ino()),
            position: 0,
            partial: Vec::new(),
            line_number: 0,
        })
    }

    /// Every complete line appended since the last call, with its line number.
    pub(super) fn read_complete_lines(&mut self) -> io::Result<Vec<(usize, Vec<u8>)>> {
        let mut bytes = Vec::new();
        self.file.seek(SeekFrom::Start(self.position))?;
        let read = self.file.read_to_end(&mut bytes)?;
        self.position += read as u64;
        Ok(self.split(&bytes))
    }

    fn split(&mut self, bytes: &[u8]) -> Vec<(usize, Vec<u8>)> {
        let mut lines = Vec::new();
        let mut rest = bytes;
        while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
            let (line, after) = rest.split_at(newline);
            let mut whole = std::mem::take(&mut self.partial);
            whole.extend_from_slice(line);
            self.line_number += 1;
            lines.push((self.line_number, whole));
            rest = after.get(1..).unwrap_or_default();
        }
        self.partial.extend_from_slice(rest);
        lines
    }

    /// The partial last line, as if it were complete.
    pub(super) fn take_partial_line(&mut self) -> Option<(usize, Vec<u8>)> {
        if self.partial.is_empty() {
            return None;
        }
        self.line_number += 1;
        Some((self.line_number, std::mem::take(&mut self.partial)))
    }

    /// Starts over when the file was truncated or replaced by a new one; true if it was.
    /// A deleted file is kept open: nothing more will be appended to it, but a new one
    /// under the same name is picked up when it appears.
    pub(super) fn reopen_if_replaced(&mut self) -> io::Result<bool> {
        match std::fs::metadata(&self.path) {
            Ok(metadata) if (metadata.dev(), metadata.ino()) != self.inode => {
                match File::open(&self.path) {
                    Ok(file) => {
                        let metadata = file.metadata()?;
                        self.file = file;
                        self.inode = (metadata.dev(), metadata.ino());
                    }
                    // Replaced again, or removed, between the two looks: next poll.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            Ok(_) => {
                if self.file.metadata()?.len() >= self.position {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        self.position = 0;
        self.partial.clear();
        self.line_number = 0;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn reader_waits_for_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"b\":").unwrap();
        let mut reader = LogReader::open(&path).unwrap();
        let lines = reader.read_complete_lines().unwrap();
        assert_eq!(lines, [(1, b"{\"a\":1}".to_vec())]);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"2}\n\n{\"c\"").unwrap();
        let lines = reader.read_complete_lines().unwrap();
        assert_eq!(lines, [(2, b"{\"b\":2}".to_vec()), (3, Vec::new())]);
        assert!(!reader.reopen_if_replaced().unwrap());
        assert_eq!(reader.take_partial_line(), Some((4, b"{\"c\"".to_vec())));

        // Truncated: start over.
        std::fs::write(&path, "{}\n").unwrap();
        assert!(reader.reopen_if_replaced().unwrap());
        assert_eq!(reader.read_complete_lines().unwrap(), [(1, b"{}".to_vec())]);
        // Replaced by a new file: start over on the new one.
        let new = dir.path().join("new");
        std::fs::write(&new, "{\"n\":1}\n{\"n\":2}\n").unwrap();
        std::fs::rename(&new, &path).unwrap();
        assert!(reader.reopen_if_replaced().unwrap());
        assert_eq!(reader.read_complete_lines().unwrap().len(), 2);

        assert!(matches!(
            LogReader::open(&dir.path().join("missing")),
            Err(EventsError::NoEventLog { .. })
        ));
    }
}
