//! A stream's pending work: an ordered set of project paths, each with what the events that
//! put it there said, and the paths whose send must wait (an access check that failed is
//! retried later, without holding back the other paths).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

/// What is known about a pending path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Lowest sequence number coalesced into this entry (for the delivery position).
    pub first_seq: i64,
    /// Highest sequence number coalesced into this entry.
    pub last_seq: i64,
    /// The access fact of the newest event: visibility can change between pushes.
    pub world_readable: bool,
    /// Receipt time of the oldest coalesced event (intake-to-send latency).
    pub received_at: i64,
}

/// Paths waiting to be sent, first in first out; a path already waiting is not added twice.
#[derive(Debug, Default)]
pub struct Pending {
    order: VecDeque<Arc<str>>,
    entries: HashMap<Arc<str>, Entry>,
    /// Paths whose send failed, each out of `order` until its retry is due.
    deferred: HashMap<Arc<str>, (Entry, Instant)>,
    /// Consecutive failed sends per path, for the backoff; cleared by a success.
    failures: HashMap<Arc<str>, u32>,
    /// The entry taken for sending whose access decision is still under way: it still holds the
    /// delivery position back, so a stream that ends meanwhile does not skip it.
    in_flight: Option<Entry>,
}

impl Pending {
    /// Adds an event for `path`; returns false when it was coalesced into a waiting entry.
    pub fn add(&mut self, path: &Arc<str>, seq: i64, world_readable: bool, received_at: i64) -> bool {
        if let Some((e, _)) = self.deferred.get_mut(path) {
            // Waits with the deferred entry: it is sent when that one's retry is due.
            e.first_seq = e.first_seq.min(seq);
            if seq >= e.last_seq {
                e.last_seq = seq;
                e.world_readable = world_readable;
            }
            e.received_at = e.received_at.min(received_at);
            return false;
        }
        match self.entries.get_mut(path) {
            Some(e) => {
                e.first_seq = e.first_seq.min(seq);
                if seq >= e.last_seq {
                    e.last_seq = seq;
                    e.world_readable = world_readable;
                }
                e.received_at = e.received_at.min(received_at);
                false
            }
            None => {
                self.order.push_back(path.clone());
                self.entries.insert(path.clone(), Entry { first_seq: seq, last_seq: seq, world_readable, received_at });
                true
            }
        }
    }

    /// Takes the oldest waiting path for sending; it counts as waiting (for the position)
    /// until `settled` or `defer`.
    pub fn take(&mut self) -> Option<(Arc<str>, Entry)> {
        let taken = self.pop()?;
        self.in_flight = Some(taken.1);
        Some(taken)
    }

    /// Takes the oldest waiting path.
    pub fn pop(&mut self) -> Option<(Arc<str>, Entry)> {
        let path = self.order.pop_front()?;
        let entry = self.entries.remove(&path).expect("order and entries hold the same paths");
        Some((path, entry))
    }

    /// Sets a taken entry aside until `due` (its send failed), merging with anything that
    /// arrived for the path meanwhile; returns how many sends of the path failed in a row.
    pub fn defer(&mut self, path: Arc<str>, mut entry: Entry, due: Instant) -> u32 {
        if let Some(waiting) = self.entries.remove(&path) {
            self.order.retain(|p| *p != path);
            entry.first_seq = entry.first_seq.min(waiting.first_seq);
            if waiting.last_seq >= entry.last_seq {
                entry.last_seq = waiting.last_seq;
                entry.world_readable = waiting.world_readable;
            }
            entry.received_at = entry.received_at.min(waiting.received_at);
        }
        self.in_flight = None;
        self.deferred.insert(path.clone(), (entry, due));
        let failures = self.failures.entry(path).or_default();
        *failures += 1;
        *failures
    }

    /// How many sends of `path` failed in a row.
    pub fn failures(&self, path: &str) -> u32 {
        self.failures.get(path).copied().unwrap_or(0)
    }

    /// Forgets the failures of `path` after a successful decision.
    pub fn settled(&mut self, path: &str) {
        self.in_flight = None;
        if !self.failures.is_empty() {
            self.failures.remove(path);
        }
    }

    /// Moves deferred paths whose retry is due at `now` to the back of the queue; returns when
    /// the next one will be due.
    pub fn release_due(&mut self, now: Instant) -> Option<Instant> {
        if self.deferred.is_empty() {
            return None;
        }
        let due: Vec<Arc<str>> =
            self.deferred.iter().filter(|(_, (_, at))| *at <= now).map(|(p, _)| p.clone()).collect();
        for path in due {
            let (entry, _) = self.deferred.remove(&path).expect("listed above");
            self.order.push_back(path.clone());
            self.entries.insert(path, entry);
        }
        self.deferred.values().map(|(_, at)| *at).min()
    }

    /// Lowest sequence number still waiting, deferred paths included.
    pub fn min_seq(&self) -> Option<i64> {
        self.entries
            .values()
            .chain(self.deferred.values().map(|(e, _)| e))
            .chain(self.in_flight.as_ref())
            .map(|e| e.first_seq)
            .min()
    }

    /// Number of waiting paths, deferred ones included.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.order.len() + self.deferred.len()
    }

    /// The waiting paths, oldest first.
    #[cfg(test)]
    pub fn paths(&self) -> Vec<Arc<str>> {
        self.order.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_to_one_project_is_one_entry() {
        let mut p = Pending::default();
        let a: Arc<str> = "g/a".into();
        assert!(p.add(&a, 1, false, 100));
        for seq in 2..10_000 {
            assert!(!p.add(&a, seq, seq % 2 == 0, 100 + seq));
        }
        assert_eq!(p.len(), 1);
        let (path, e) = p.pop().unwrap();
        assert_eq!(&*path, "g/a");
        assert_eq!((e.first_seq, e.last_seq, e.received_at), (1, 9_999, 100));
        assert!(!e.world_readable, "the newest event's fact wins");
        assert!(p.pop().is_none());
    }

    #[test]
    fn first_in_first_out() {
        let mut p = Pending::default();
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        p.add(&a, 1, true, 0);
        p.add(&b, 2, true, 0);
        p.add(&c, 3, true, 0);
        p.add(&a, 4, true, 0);
        assert_eq!(p.min_seq(), Some(1));
        let (first, _) = p.pop().unwrap();
        assert_eq!(&*first, "a");
        assert_eq!(p.min_seq(), Some(2));
        p.add(&a, 5, false, 0);
        let order: Vec<String> = std::iter::from_fn(|| p.pop().map(|(x, _)| x.to_string())).collect();
        assert_eq!(order, ["b", "c", "a"], "a re-added after its send goes to the back");
    }

    #[test]
    fn a_deferred_path_waits_without_holding_back_others_and_keeps_the_position() {
        let mut p = Pending::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let now = Instant::now();
        p.add(&a, 1, true, 0);
        let (path, entry) = p.pop().unwrap();
        assert_eq!(p.defer(path, entry, now + std::time::Duration::from_secs(1)), 1);
        // More pushes to the deferred path coalesce into it; others go ahead.
        assert!(!p.add(&a, 3, false, 0));
        p.add(&b, 2, true, 0);
        assert_eq!(p.min_seq(), Some(1), "the deferred entry holds the position back");
        assert_eq!(p.release_due(now), Some(now + std::time::Duration::from_secs(1)));
        assert_eq!(&*p.pop().unwrap().0, "b");
        assert!(p.pop().is_none());
        assert_eq!(p.release_due(now + std::time::Duration::from_secs(1)), None);
        let (path, entry) = p.pop().unwrap();
        assert_eq!((&*path, entry.first_seq, entry.last_seq, entry.world_readable), ("a", 1, 3, false));
        assert_eq!(p.failures("a"), 1);
        assert_eq!(p.defer(path, entry, now), 2, "failures in a row are counted");
        p.release_due(now);
        let (path, _) = p.pop().unwrap();
        p.settled(&path);
        assert_eq!(p.failures("a"), 0);
        assert_eq!(p.min_seq(), None);
    }

    #[test]
    fn an_entry_under_decision_holds_the_position() {
        let mut p = Pending::default();
        let a: Arc<str> = "a".into();
        p.add(&a, 7, true, 0);
        let (path, _) = p.take().unwrap();
        assert_eq!(p.min_seq(), Some(7), "taken, not yet decided");
        p.settled(&path);
        assert_eq!(p.min_seq(), None);
    }
}
