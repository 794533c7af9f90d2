//! The event-log reader of `hostd events`: its file reader (whole lines, then the partial
//! last one) and the rendering of every line, known event or not, as text and as JSON, in
//! UTC and in a zone with daylight saving time (`hostd::cli::render_log_for_fuzzing`).
//! Property: no line is shown twice per rendering: at most as many lines come out as the
//! file has lines, for each of the four renderings.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// One file per fuzzing process, rewritten for every input (the reader reads a file).
fn log_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir().join(format!("ivha-fuzz-events-{}.jsonl", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = log_path();
    std::fs::write(path, data).expect("the fuzz input can be written to a temporary file");
    let shown = hostd::cli::render_log_for_fuzzing(path).expect("a readable file reads");
    let lines = data.split(|&b| b == b'\n').count();
    assert!(
        shown.len() <= 4 * lines,
        "{} shown of {lines} lines",
        shown.len()
    );
});
