//! `ivha-client-load`: the workload of the client VM (see `workload`). Exits 0 when it
//! stopped as asked, 1 when a file operation or a report failed (after reporting why), 2 on
//! a bad command line.

use std::error::Error;
use std::process::ExitCode;

use client_load::control::{Reporter, StopSignal};
use client_load::options::{Options, OptionsError, USAGE};
use client_load::record::Line;
use client_load::workload;

fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(OptionsError::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("ivha-client-load: error: {error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut reporter = match Reporter::open(options.control.as_deref()) {
        Ok(reporter) => reporter,
        Err(error) => return fail(&error, None),
    };
    let outcome = StopSignal::listen(options.stop_from.as_deref())
        .map_err(workload::WorkloadError::from)
        .and_then(|stop| workload::run(&options, &mut reporter, &stop));
    match outcome {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => fail(&error, Some(&mut reporter)),
    }
}

/// Prints the error with its causes on one line, on stderr and (when it works) to the host.
fn fail(error: &dyn Error, reporter: Option<&mut Reporter>) -> ExitCode {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("ivha-client-load: error: {message}");
    if let Some(reporter) = reporter {
        let _ = reporter.send(&Line::Error { message });
    }
    ExitCode::FAILURE
}
