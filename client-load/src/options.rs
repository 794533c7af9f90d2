//! The command line: `ivha-client-load --dir DIR [--control PATH] [--stop-from PATH]
//! [--seed N] [--slots N] [--max-kib N] [--pause-ms N] [--max-ops N]`.
//!
//! No argument parser crate: the binary goes into a small initramfs, and these are a
//! handful of numbers.

use std::path::PathBuf;

pub const USAGE: &str = "\
usage: ivha-client-load --dir DIR [options]
Writes files with random content into DIR/load, each into a temporary file that is fsynced,
renamed over one of SLOTS names and followed by a directory fsync and a journal line
(DIR/journal.log, fsynced); then reports the file on the control output. Runs until a line
`stop` arrives on --stop-from, or --max-ops files.
  --control PATH    where the report lines go (default: standard output)
  --stop-from PATH  read `stop` from this file or tty (the host's control port)
  --seed N          fixes every length and byte (default 1)
  --slots N         file names to cycle through (default 64)
  --max-kib N       largest file in KiB; lengths are 1 byte to N KiB (default 128)
  --pause-ms N      pause between files (default 0)
  --max-ops N       stop after N files";

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub dir: PathBuf,
    pub control: Option<PathBuf>,
    pub stop_from: Option<PathBuf>,
    pub seed: u64,
    pub slots: u64,
    pub max_kib: u64,
    pub pause_ms: u64,
    pub max_ops: Option<u64>,
}

/// What is wrong with the command line.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("help wanted")]
    Help,
    #[error("unknown argument {0:?}")]
    Unknown(String),
    #[error("{0} needs a value")]
    NoValue(String),
    #[error("{flag} takes a number from {min} to {max}, not {value:?}")]
    BadNumber {
        flag: String,
        value: String,
        min: u64,
        max: u64,
    },
    #[error("--dir DIR is required")]
    NoDir,
}

impl Options {
    /// Parses the arguments after the program name.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, OptionsError> {
        let mut options = Options {
            dir: PathBuf::new(),
            control: None,
            stop_from: None,
            seed: 1,
            slots: 64,
            max_kib: 128,
            pause_ms: 0,
            max_ops: None,
        };
        let mut dir = None;
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            if matches!(flag.as_str(), "-h" | "--help") {
                return Err(OptionsError::Help);
            }
            let mut value = || {
                args.next()
                    .ok_or_else(|| OptionsError::NoValue(flag.clone()))
            };
            match flag.as_str() {
                "--dir" => dir = Some(PathBuf::from(value()?)),
                "--control" => options.control = Some(PathBuf::from(value()?)),
                "--stop-from" => options.stop_from = Some(PathBuf::from(value()?)),
                "--seed" => options.seed = number(&flag, &value()?, 0, u64::MAX)?,
                "--slots" => options.slots = number(&flag, &value()?, 1, 100_000)?,
                "--max-kib" => options.max_kib = number(&flag, &value()?, 1, 65_536)?,
                "--pause-ms" => options.pause_ms = number(&flag, &value()?, 0, 60_000)?,
                "--max-ops" => options.max_ops = Some(number(&flag, &value()?, 1, u64::MAX)?),
                _ => return Err(OptionsError::Unknown(flag)),
            }
        }
        options.dir = dir.ok_or(OptionsError::NoDir)?;
        Ok(options)
    }
}

fn number(flag: &str, value: &str, min: u64, max: u64) -> Result<u64, OptionsError> {
    value
        .parse()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| OptionsError::BadNumber {
            flag: flag.to_owned(),
            value: value.to_owned(),
            min,
            max,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, OptionsError> {
        Options::parse(args.iter().map(|a| (*a).to_owned()))
    }

    #[test]
    fn flags_set_what_they_name() {
        let line = "--dir /mnt --control /dev/ttyS1 --stop-from /dev/ttyS1 --seed 9 --slots 8 \
                    --max-kib 4 --pause-ms 5 --max-ops 100";
        let options = parse(&line.split_whitespace().collect::<Vec<_>>()).unwrap();
        assert_eq!(options.dir, PathBuf::from("/mnt"));
        assert_eq!(options.control, Some(PathBuf::from("/dev/ttyS1")));
        assert_eq!(options.stop_from, Some(PathBuf::from("/dev/ttyS1")));
        assert_eq!(
            (
                options.seed,
                options.slots,
                options.max_kib,
                options.pause_ms
            ),
            (9, 8, 4, 5)
        );
        assert_eq!(options.max_ops, Some(100));
        let defaults = parse(&["--dir", "x"]).unwrap();
        assert_eq!(
            (defaults.slots, defaults.max_kib, defaults.max_ops),
            (64, 128, None)
        );
    }

    #[test]
    fn bad_command_lines_are_refused_by_name() {
        assert_eq!(parse(&[]), Err(OptionsError::NoDir));
        assert_eq!(
            parse(&["--dir"]),
            Err(OptionsError::NoValue("--dir".into()))
        );
        assert_eq!(
            parse(&["--fast"]),
            Err(OptionsError::Unknown("--fast".into()))
        );
        assert!(matches!(
            parse(&["--dir", "x", "--slots", "0"]),
            Err(OptionsError::BadNumber { .. })
        ));
        assert_eq!(parse(&["--help"]), Err(OptionsError::Help));
    }
}
