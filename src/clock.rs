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

/// An RFC 3339 UTC time with milliseconds (`2026-11-28T09:30:00.123Z`).
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:03}Z", ms.rem_euclid(1000))
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
    fn formats_utc_times_with_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(rfc3339_ms(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
    }

    #[test]
    fn the_system_clock_reads_the_time() {
        let before = now_ms();
        assert!(Clock::system().now_ms() >= before);
        assert!(before > 1_700_000_000_000);
    }
}
