//! A stream's pending work: an ordered set of project paths, each with what the events that
//! put it there said.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

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
}

impl Pending {
    /// Adds an event for `path`; returns false when it was coalesced into a waiting entry.
    pub fn add(&mut self, path: &Arc<str>, seq: i64, world_readable: bool, received_at: i64) -> bool {
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

    /// Takes the oldest waiting path.
    pub fn pop(&mut self) -> Option<(Arc<str>, Entry)> {
        let path = self.order.pop_front()?;
        let entry = self.entries.remove(&path).expect("order and entries hold the same paths");
        Some((path, entry))
    }

    /// Puts a taken entry back at the front (its send must be retried), merging with anything
    /// that arrived for the path meanwhile.
    pub fn put_back(&mut self, path: Arc<str>, entry: Entry) {
        match self.entries.get_mut(&path) {
            Some(e) => {
                e.first_seq = e.first_seq.min(entry.first_seq);
                e.received_at = e.received_at.min(entry.received_at);
            }
            None => {
                self.order.push_front(path.clone());
                self.entries.insert(path, entry);
            }
        }
    }

    /// Lowest sequence number still waiting.
    pub fn min_seq(&self) -> Option<i64> {
        self.entries.values().map(|e| e.first_seq).min()
    }

    /// Number of waiting paths.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.order.len()
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
    fn first_in_first_out_and_put_back_goes_first() {
        let mut p = Pending::default();
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        p.add(&a, 1, true, 0);
        p.add(&b, 2, true, 0);
        p.add(&c, 3, true, 0);
        p.add(&a, 4, true, 0);
        assert_eq!(p.min_seq(), Some(1));
        let (first, entry) = p.pop().unwrap();
        assert_eq!(&*first, "a");
        assert_eq!(p.min_seq(), Some(2));
        p.add(&a, 5, false, 0);
        p.put_back(first, entry);
        assert_eq!(p.len(), 3);
        assert_eq!(p.min_seq(), Some(1));
        let order: Vec<String> = std::iter::from_fn(|| p.pop().map(|(x, _)| x.to_string())).collect();
        assert_eq!(order, ["b", "c", "a"], "a re-added meanwhile keeps its place at the back");
    }
}
