//! Errors as text, with every cause once: how the binaries print them, and how the control
//! socket and the event log carry them. Each error's message names only its own step
//! (thiserror's `#[source]` keeps the cause), so walking the chain says everything once.

use std::error::Error;

/// `message: cause: cause of the cause`, for one-line carriers (socket replies, events,
/// log lines).
pub fn one_line(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The chain as a binary prints it on standard error:
///
/// ```text
/// hostd: error: cannot start QEMU for node a
///   caused by: ...
/// ```
pub fn render(program: &str, error: &dyn Error) -> String {
    let mut text = format!("{program}: error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    text
}

/// Prints [`render`] to standard error.
pub fn print(program: &str, error: &dyn Error) {
    eprintln!("{}", render(program, error));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start node a")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_cause_once() {
        let error = Outer(std::io::Error::other("no such file"));
        assert_eq!(one_line(&error), "cannot start node a: no such file");
        assert_eq!(
            render("hostd", &error),
            "hostd: error: cannot start node a\n  caused by: no such file"
        );
    }
}
