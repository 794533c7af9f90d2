//! The host tools the client VM run needs: `mke2fs` and `qemu-img` to put a fresh ext4 on
//! the export and to copy it back, `dumpe2fs`, `e2fsck` and `debugfs` to check it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Errors running a host tool.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run {program} (install e2fsprogs and qemu-utils: scripts/install-deps.sh)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed (exit code {code}): {stderr}")]
    Failed {
        command: String,
        code: i32,
        stderr: String,
    },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `program args`; its output, whatever its exit status.
pub fn output(program: &str, args: &[&str]) -> Result<Output, ToolError> {
    Command::new(program)
        .args(args)
        .output()
        .map_err(|source| ToolError::Spawn {
            program: program.to_owned(),
            source,
        })
}

/// Runs `program args`; an error unless it exits 0.
pub fn run(program: &str, args: &[&str]) -> Result<Output, ToolError> {
    let out = output(program, args)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(ToolError::Failed {
            command: format!("{program} {}", args.join(" ")),
            code: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The tools a run needs that are missing, each with its package.
pub fn missing() -> Vec<String> {
    [
        ("mke2fs", "-V", "e2fsprogs"),
        ("e2fsck", "-V", "e2fsprogs"),
        ("debugfs", "-V", "e2fsprogs"),
        ("dumpe2fs", "-V", "e2fsprogs"),
        ("qemu-img", "--version", "qemu-utils"),
        ("qemu-system-x86_64", "--version", "qemu-system-x86"),
    ]
    .into_iter()
    .filter(|(program, flag, _)| !output(program, &[flag]).is_ok_and(|o| o.status.success()))
    .map(|(program, _, package)| format!("{program} ({package})"))
    .collect()
}

/// Makes an ext4 filesystem of `size_mib` in `scratch` and writes it to the export at
/// `uri`, which must read as zeros (a fresh disk): only the filesystem's blocks are sent.
/// Inode tables and the journal are written now rather than lazily by the client's kernel,
/// so that the client's I/O is its workload's.
pub fn format_export(size_mib: u64, uri: &str, scratch: &Path) -> Result<(), ToolError> {
    std::fs::File::create(scratch)
        .and_then(|file| file.set_len(size_mib << 20))
        .map_err(|source| ToolError::Create {
            path: scratch.to_owned(),
            source,
        })?;
    let scratch_text = scratch.display().to_string();
    let made = run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-L",
            "ivha-client",
            &scratch_text,
        ],
    )
    .and_then(|_| {
        run(
            "qemu-img",
            &[
                "convert",
                "-n",
                "--target-is-zero",
                "-f",
                "raw",
                "-O",
                "raw",
                &scratch_text,
                uri,
            ],
        )
    });
    let _ = std::fs::remove_file(scratch);
    made.map(|_| ())
}

/// Copies the export at `uri` into the raw image `dest`.
pub fn copy_export(uri: &str, dest: &Path) -> Result<(), ToolError> {
    let dest = dest.display().to_string();
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", uri, &dest],
    )
    .map(|_| ())
}
