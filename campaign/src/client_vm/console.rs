//! The client VM's console (its kernel log): the lines that mean the client saw an I/O
//! error, or the filesystem or block layer complained.

/// Text that marks a kernel line as a client-visible failure. Block layer: `I/O error,
/// dev vda` (6.1's `blk_print_req_error`), `blk_update_request` (older kernels),
/// `Buffer I/O error`; ext4 and its journal: `EXT4-fs error`, `EXT4-fs warning`, `Aborting
/// journal`, `JBD2: ` errors, a remount read-only; a task stuck on I/O for the kernel's
/// hung-task limit; a panic; and the errors of the workload and of the client's /init.
const PATTERNS: [&str; 12] = [
    "I/O error",
    "blk_update_request",
    "Buffer I/O error",
    "EXT4-fs error",
    "EXT4-fs warning",
    "Aborting journal",
    "JBD2: ",
    "Remounting filesystem read-only",
    "blocked for more than",
    "Kernel panic",
    "ivha-client-load: error",
    "ivha-client-init: error",
];

/// The lines of `text` that report a failure, as they are (without line ends).
pub fn error_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| PATTERNS.iter().any(|pattern| line.contains(pattern)))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_and_filesystem_complaints_are_found() {
        let console = "\
[    3.135599] EXT4-fs (vda): mounted filesystem with ordered data mode. Quota mode: none.\r
ivha-client-init: mounted device=/dev/vda
[   12.000001] I/O error, dev vda, sector 2048 op 0x1:(WRITE) flags 0x800 phys_seg 1 prio class 2
[   12.000002] Buffer I/O error on dev vda, logical block 256, lost async page write
[   12.000003] EXT4-fs error (device vda): ext4_journal_check_start:83: comm kworker: Detected aborted journal
[   12.000004] EXT4-fs (vda): Remounting filesystem read-only
[   24.265588] EXT4-fs (vda): unmounting filesystem.
ivha-client-init: error cannot unmount /mnt
";
        let found = error_lines(console);
        assert_eq!(found.len(), 5, "{found:#?}");
        assert!(found[0].contains("I/O error, dev vda"));
        assert!(found[3].ends_with("Remounting filesystem read-only"));
        assert_eq!(found[4], "ivha-client-init: error cannot unmount /mnt");
        assert!(error_lines("[ 2.7] Run /init as init process\n").is_empty());
    }
}
