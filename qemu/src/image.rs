//! Where ivha's guest image (kernel and initramfs) is found when nothing names it.

use std::path::PathBuf;

/// `IVHA_GUEST_DIR`, then `guest` in the cargo target directory of the running binary
/// (`<target>/{debug,release}/BINARY`), then `$CARGO_TARGET_DIR/guest`, then `target/guest`
/// under the current directory.
pub fn default_image_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IVHA_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let beside_binary = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("guest")));
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map(|dir| PathBuf::from(dir).join("guest"));
    [beside_binary, target_dir]
        .into_iter()
        .flatten()
        .find(|dir| dir.join("vmlinuz").exists())
        .unwrap_or_else(|| PathBuf::from("target/guest"))
}
