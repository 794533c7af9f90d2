//! A warning that repeats at most once a second.
//!
//! Some conditions recur for every client or every accept attempt while they last (out of
//! descriptors, a connection limit reached). One line a second, with how many were left
//! out, tells the operator as much as thousands would, and keeps the console usable. (A few
//! lines of our own: the `log` ecosystem's rate limiters come with their own logger or
//! macros, and this is one call site's worth.)

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a throttled warning is written at most.
const INTERVAL: Duration = Duration::from_secs(1);

/// One kind of warning, throttled.
#[derive(Debug, Default)]
pub struct ThrottledLog {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl ThrottledLog {
    /// Logs `message()` as a warning unless one was logged less than a second ago; then it
    /// is only counted, and the next line written says how many were left out. Returns
    /// whether it was written.
    pub fn warn(&self, message: impl FnOnce() -> String) -> bool {
        self.warn_at(Instant::now(), message)
    }

    fn warn_at(&self, now: Instant, message: impl FnOnce() -> String) -> bool {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state
            .last
            .is_some_and(|last| now.duration_since(last) < INTERVAL)
        {
            state.suppressed += 1;
            return false;
        }
        let suppressed = std::mem::take(&mut state.suppressed);
        state.last = Some(now);
        drop(state);
        if suppressed > 0 {
            log::warn!(
                "{} ({suppressed} more like it since the last one shown)",
                message()
            );
        } else {
            log::warn!("{}", message());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_once_a_second_and_counts_the_rest() {
        let log = ThrottledLog::default();
        let start = Instant::now();
        assert!(log.warn_at(start, || "first".into()));
        for i in 1..80 {
            let at = start + Duration::from_millis(i * 12);
            assert!(!log.warn_at(at, || unreachable!("throttled lines are not built")));
        }
        assert!(log.warn_at(start + INTERVAL, || "again".into()));
        assert_eq!(log.state.lock().unwrap().suppressed, 0);
    }
}
