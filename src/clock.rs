//! Time as kas reads it: wall-clock Unix milliseconds, which the event log, delivery positions
//! and registrations store. Production reads the system clock; a test builds a manual clock and
//! moves it, so expiry and replay-window rules can be checked without sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// A source of Unix milliseconds: the system's, or one a test sets by hand.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// `None` reads the system clock; otherwise the shared hand-set time, so every clone of a
    /// manual clock moves together.
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// A clock that stands at `start_ms` until `advance` or `set` moves it.
    pub fn manual(start_ms: i64) -> Self {
        Self { manual: Some(Arc::new(AtomicI64::new(start_ms))) }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(at) => at.load(Ordering::Relaxed),
            None => now_ms(),
        }
    }

    /// Moves a manual clock forward; the system clock cannot be moved.
    ///
    /// # Panics
    /// On the system clock: a test that thinks it drives time must not silently not.
    pub fn advance(&self, by: Duration) {
        let at = self.manual.as_ref().expect("only a manual clock can be moved");
        at.fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }
}

/// The system clock's Unix milliseconds, for code that is not handed a [`Clock`] (command-line
/// tools, one-off timestamps).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_clones_move_together() {
        let clock = Clock::manual(1_000);
        let other = clock.clone();
        assert_eq!(clock.now_ms(), 1_000);
        other.advance(Duration::from_secs(2));
        assert_eq!(clock.now_ms(), 3_000);
    }

    #[test]
    fn the_system_clock_reads_the_time() {
        let before = now_ms();
        assert!(Clock::system().now_ms() >= before);
        assert!(before > 1_700_000_000_000);
    }
}
