//! Progress of long runs (the campaign's cycles, the measurement's trials): a bar with the
//! time left on a terminal, a plain line per step otherwise (logs, CI).
//!
//! Both go to standard error, so that standard output keeps only results. Log lines go
//! through [`LogSink`], which prints them above the bar instead of through it.

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar on screen, if any: log lines are printed above it.
static SHOWN_BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// How the bar looks; the message is the unit and the time left (see [`time_left`]).
const TEMPLATE: &str = "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}";

/// Progress through a known number of steps.
#[derive(Debug)]
pub struct Progress {
    what: &'static str,
    unit: &'static str,
    total: u64,
    done: u64,
    started: Instant,
    /// Some on a terminal.
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Progress of `what` (e.g. "campaign") through `total` steps counted in `unit`
    /// (e.g. "cycles"): a bar when standard error is a terminal, else plain lines.
    pub fn new(what: &'static str, unit: &'static str, total: u64) -> Self {
        let bar = io::stderr().is_terminal().then(|| {
            let style = ProgressStyle::with_template(TEMPLATE)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
                .with_style(style)
                .with_prefix(what)
                .with_message(unit);
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        if let Some(bar) = &bar {
            *lock_shown() = Some(bar.clone());
        }
        Progress {
            what,
            unit,
            total,
            done: 0,
            started: Instant::now(),
            bar,
        }
    }

    /// One more step done.
    pub fn step(&mut self) {
        self.done = (self.done + 1).min(self.total);
        let elapsed = self.started.elapsed();
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.done);
                let left = time_left(self.done, self.total, elapsed)
                    .map_or_else(String::new, |left| format!(", about {} left", clock(left)));
                bar.set_message(format!("{}{left}", self.unit));
            }
            None => eprintln!(
                "{}",
                plain_line(self.what, self.unit, self.done, self.total, elapsed)
            ),
        }
    }

    /// Runs `print` (which writes to the terminal) with the bar out of its way.
    pub fn suspend<R>(&self, print: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            *lock_shown() = None;
        }
    }
}

fn lock_shown() -> std::sync::MutexGuard<'static, Option<ProgressBar>> {
    // A bar handle stays valid whatever a panicking holder did.
    SHOWN_BAR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `campaign: 3/12 cycles, 1m05s elapsed, about 3m15s left`.
fn plain_line(what: &str, unit: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let mut line = format!("{what}: {done}/{total} {unit}, {} elapsed", clock(elapsed));
    if let Some(left) = time_left(done, total, elapsed) {
        line.push_str(&format!(", about {} left", clock(left)));
    }
    line
}

/// The time per step so far times the steps left; None before the first step and after
/// the last. (The steps of a run take about the same time: a fault and its recovery, a
/// trial.)
fn time_left(done: u64, total: u64, elapsed: Duration) -> Option<Duration> {
    (done > 0 && done < total).then(|| elapsed.mul_f64((total - done) as f64 / done as f64))
}

/// `45s`, `3m05s`, `1h02m`.
fn clock(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds / 60 % 60),
    }
}

/// Standard error for log lines: while a bar is shown, each line is printed above it.
#[derive(Debug, Clone, Copy)]
pub struct LogSink;

impl Write for LogSink {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let shown = lock_shown().clone();
        match shown {
            Some(bar) => bar.suspend(|| io::stderr().write_all(line))?,
            None => io::stderr().write_all(line)?,
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Sets up `log` as `ivha-campaign` uses it: `info` unless `RUST_LOG` says otherwise,
/// through [`LogSink`], in colour on a terminal unless `RUST_LOG_STYLE` says otherwise.
pub fn init_logging() {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    builder.target(env_logger::Target::Pipe(Box::new(LogSink)));
    // A pipe target is never coloured by itself.
    if io::stderr().is_terminal() && std::env::var_os("RUST_LOG_STYLE").is_none() {
        builder.write_style(env_logger::WriteStyle::Always);
    }
    builder.init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_estimate_the_time_left() {
        let line = plain_line("campaign", "cycles", 3, 12, Duration::from_secs(65));
        assert_eq!(
            line,
            "campaign: 3/12 cycles, 1m05s elapsed, about 3m15s left"
        );
        let last = plain_line(
            "measure-takeover",
            "trials",
            5,
            5,
            Duration::from_secs(3700),
        );
        assert_eq!(last, "measure-takeover: 5/5 trials, 1h01m elapsed");
    }
}
