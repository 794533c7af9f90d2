//! The lines the client VM sends the host on its control port, and the journal's lines.
//!
//! One line per event, `ivha-client: KIND key=value ...`; the keys of a kind may come in any
//! order. The workload writes `started`, `fsynced`, `stopped` and `error`; the client's
//! `/init` writes `mounted`, `exit` and `unmounted` (scripts/client/init). The journal in the
//! filesystem holds one `FileRecord` per fsynced file, in the same `key=value` form.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// What every control line starts with.
pub const PREFIX: &str = "ivha-client:";

/// A file the workload wrote, fsynced (file and directory) and journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    /// The operation's number, from 1, one per file version.
    pub seq: u64,
    /// The file's name within the workload's directory.
    pub file: String,
    pub len: u64,
    pub crc32c: u32,
}

/// One fsynced file with when the operation ran, in milliseconds of the workload's
/// monotonic clock (from its start).
#[derive(Debug, Clone, PartialEq)]
pub struct Fsynced {
    pub record: FileRecord,
    pub start_ms: f64,
    pub end_ms: f64,
}

impl Fsynced {
    /// How long the operation took (write, fsync, rename, directory fsync, journal fsync).
    pub fn duration_ms(&self) -> f64 {
        self.end_ms - self.start_ms
    }
}

/// One control line.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// The filesystem is mounted (from `/init`).
    Mounted {
        device: String,
    },
    /// The workload runs with these settings.
    Started {
        seed: u64,
        slots: u64,
        max_kib: u64,
    },
    Fsynced(Fsynced),
    /// The workload stopped as asked after `ops` files.
    Stopped {
        ops: u64,
    },
    /// The workload failed; the message says why.
    Error {
        message: String,
    },
    /// The workload exited with this status (from `/init`).
    Exit {
        status: i32,
    },
    /// The filesystem was unmounted cleanly (from `/init`).
    Unmounted,
}

/// Why a line is not a control line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("the line does not start with {PREFIX:?}")]
    NoPrefix,
    #[error("{0:?} is not a kind of line")]
    UnknownKind(String),
    #[error("{0:?} is not a key=value pair")]
    NotAPair(String),
    #[error("the field {0} is missing")]
    Missing(&'static str),
    #[error("the field {field} is not a number: {value:?}")]
    BadNumber { field: &'static str, value: String },
}

impl fmt::Display for FileRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seq={} file={} len={} crc32c={:08x}",
            self.seq, self.file, self.len, self.crc32c
        )
    }
}

impl FromStr for FileRecord {
    type Err = LineError;
    fn from_str(text: &str) -> Result<Self, LineError> {
        FileRecord::from_fields(&Fields::parse(text)?)
    }
}

impl FileRecord {
    fn from_fields(fields: &Fields<'_>) -> Result<Self, LineError> {
        Ok(FileRecord {
            seq: fields.number("seq")?,
            file: fields.text("file")?.to_owned(),
            len: fields.number("len")?,
            crc32c: fields.hex("crc32c")?,
        })
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX} ")?;
        match self {
            Line::Mounted { device } => write!(f, "mounted device={device}"),
            Line::Started {
                seed,
                slots,
                max_kib,
            } => write!(f, "started seed={seed} slots={slots} max_kib={max_kib}"),
            Line::Fsynced(op) => write!(
                f,
                "fsynced {} start_ms={:.3} end_ms={:.3}",
                op.record, op.start_ms, op.end_ms
            ),
            Line::Stopped { ops } => write!(f, "stopped ops={ops}"),
            // The message is the rest of the line: it may hold spaces and '='.
            Line::Error { message } => write!(f, "error {}", one_line(message)),
            Line::Exit { status } => write!(f, "exit status={status}"),
            Line::Unmounted => write!(f, "unmounted"),
        }
    }
}

impl FromStr for Line {
    type Err = LineError;
    fn from_str(text: &str) -> Result<Self, LineError> {
        let rest = text
            .trim_end_matches(['\r', '\n'])
            .strip_prefix(PREFIX)
            .ok_or(LineError::NoPrefix)?
            .trim_start();
        let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        if kind == "error" {
            return Ok(Line::Error {
                message: rest.to_owned(),
            });
        }
        let fields = Fields::parse(rest)?;
        Ok(match kind {
            "mounted" => Line::Mounted {
                device: fields.text("device")?.to_owned(),
            },
            "started" => Line::Started {
                seed: fields.number("seed")?,
                slots: fields.number("slots")?,
                max_kib: fields.number("max_kib")?,
            },
            "fsynced" => Line::Fsynced(Fsynced {
                record: FileRecord::from_fields(&fields)?,
                start_ms: fields.number("start_ms")?,
                end_ms: fields.number("end_ms")?,
            }),
            "stopped" => Line::Stopped {
                ops: fields.number("ops")?,
            },
            "exit" => Line::Exit {
                status: fields.number("status")?,
            },
            "unmounted" => Line::Unmounted,
            other => return Err(LineError::UnknownKind(other.to_owned())),
        })
    }
}

/// A message on one line: a line break would end the control line early.
fn one_line(message: &str) -> String {
    message.replace(['\r', '\n'], " ")
}

/// The `key=value` pairs of a line.
struct Fields<'a>(BTreeMap<&'a str, &'a str>);

impl<'a> Fields<'a> {
    fn parse(text: &'a str) -> Result<Self, LineError> {
        text.split_whitespace()
            .map(|pair| {
                pair.split_once('=')
                    .ok_or_else(|| LineError::NotAPair(pair.to_owned()))
            })
            .collect::<Result<_, _>>()
            .map(Fields)
    }

    fn text(&self, field: &'static str) -> Result<&'a str, LineError> {
        self.0.get(field).copied().ok_or(LineError::Missing(field))
    }

    fn number<T: FromStr>(&self, field: &'static str) -> Result<T, LineError> {
        let value = self.text(field)?;
        value.parse().map_err(|_| LineError::BadNumber {
            field,
            value: value.to_owned(),
        })
    }

    fn hex(&self, field: &'static str) -> Result<u32, LineError> {
        let value = self.text(field)?;
        u32::from_str_radix(value, 16).map_err(|_| LineError::BadNumber {
            field,
            value: value.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op() -> Fsynced {
        Fsynced {
            record: FileRecord {
                seq: 12,
                file: "f011".into(),
                len: 40961,
                crc32c: 0x0a2b_3c4d,
            },
            start_ms: 1234.5,
            end_ms: 1250.25,
        }
    }

    #[test]
    fn every_line_reads_back_as_written() {
        let lines = [
            Line::Mounted {
                device: "/dev/vda".into(),
            },
            Line::Started {
                seed: 7,
                slots: 64,
                max_kib: 128,
            },
            Line::Fsynced(op()),
            Line::Stopped { ops: 99 },
            Line::Error {
                message: "cannot fsync f001: Input/output error (os error 5)".into(),
            },
            Line::Exit { status: -1 },
            Line::Unmounted,
        ];
        for line in lines {
            let text = line.to_string();
            assert!(text.starts_with("ivha-client: "), "{text}");
            assert_eq!(text.parse::<Line>(), Ok(line.clone()), "{text}");
            assert_eq!(format!("{text}\r\n").parse::<Line>(), Ok(line));
        }
    }

    #[test]
    fn an_fsynced_line_is_a_journal_record_plus_times() {
        let text = Line::Fsynced(op()).to_string();
        assert_eq!(
            text,
            "ivha-client: fsynced seq=12 file=f011 len=40961 crc32c=0a2b3c4d start_ms=1234.500 end_ms=1250.250"
        );
        let record: FileRecord = op().record.to_string().parse().unwrap();
        assert_eq!(record, op().record);
        assert_eq!(op().duration_ms(), 15.75);
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert_eq!("kernel: hello".parse::<Line>(), Err(LineError::NoPrefix));
        assert_eq!(
            "ivha-client: dance x=1".parse::<Line>(),
            Err(LineError::UnknownKind("dance".into()))
        );
        assert_eq!(
            "ivha-client: stopped".parse::<Line>(),
            Err(LineError::Missing("ops"))
        );
        assert_eq!(
            "ivha-client: stopped ops=many".parse::<Line>(),
            Err(LineError::BadNumber {
                field: "ops",
                value: "many".into()
            })
        );
        assert_eq!(
            "ivha-client: stopped ops".parse::<Line>(),
            Err(LineError::NotAPair("ops".into()))
        );
        let message = Line::Error {
            message: "two\nlines".into(),
        };
        assert_eq!(message.to_string(), "ivha-client: error two lines");
    }
}
