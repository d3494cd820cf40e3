//! The duplicate filter: an event that reaches this replica twice (the outbox's sweep, a
//! catch-up after a Redis outage) is queued once.

use std::collections::{HashSet, VecDeque};

/// Sequence numbers remembered as delivered here.
const REMEMBERED: usize = 200_000;

/// A bounded memory of sequence numbers already delivered to local streams.
#[derive(Default)]
pub(super) struct Seen {
    set: HashSet<i64>,
    order: VecDeque<i64>,
}

impl Seen {
    /// Remembers `seq`; false when it was already remembered.
    pub(super) fn insert(&mut self, seq: i64) -> bool {
        if !self.set.insert(seq) {
            return false;
        }
        self.order.push_back(seq);
        if self.order.len() > REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_set_is_bounded_and_remembers_recent() {
        let mut d = Seen::default();
        assert!(d.insert(1));
        assert!(!d.insert(1));
        for i in 2..(REMEMBERED as i64 + 10) {
            d.insert(i);
        }
        assert!(d.set.len() <= REMEMBERED);
        assert!(d.insert(1), "the oldest was forgotten");
        assert!(!d.insert(REMEMBERED as i64 + 5));
    }
}
