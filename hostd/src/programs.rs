//! Where hostd finds the programs it starts besides QEMU.

use std::path::PathBuf;

/// The program `name`: the path in the environment variable `env` when set, else the file
/// beside hostd's own binary (cargo and the release layout put them together), else `name`
/// for a `PATH` lookup.
pub fn beside_hostd(env: &str, name: &str) -> PathBuf {
    match std::env::var_os(env) {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join(name)))
            .unwrap_or_else(|| PathBuf::from(name)),
    }
}
