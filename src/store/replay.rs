//! Reading a stretch of the event log back, page by page: what an agent that reconnects is
//! replayed, and what a replica that lost its Redis subscription catches up on.

use super::{EventLog, StoreError};
use crate::domain::EventNotice;

/// Which events to read back.
#[derive(Debug, Clone, Copy)]
pub struct LogReplay<'a> {
    /// Events after this sequence number…
    pub after_seq: i64,
    /// …or received at or after this time (Unix ms), which catches events recorded slightly
    /// out of sequence order by other replicas.
    pub overlap_from: i64,
    /// Nothing received before this (the replay window's start).
    pub not_before: i64,
    /// Only these project paths (every project when empty).
    pub projects: &'a [String],
    /// Events per query.
    pub page: i64,
}

/// Reads every event `query` selects, in sequence order, handing each page to `each`; returns
/// how many events were read. A page after the first continues from the last sequence number
/// read, so no event is read twice and none is skipped.
pub async fn replay_log(
    log: &dyn EventLog,
    query: LogReplay<'_>,
    mut each: impl FnMut(&[EventNotice]),
) -> Result<usize, StoreError> {
    let (mut after, mut overlap_from) = (query.after_seq, query.overlap_from);
    let mut total = 0;
    loop {
        let page = log.pushes_since(after, overlap_from, query.not_before, query.projects, query.page).await?;
        total += page.len();
        each(&page);
        match page.last() {
            Some(last) if page.len() as i64 == query.page => {
                after = last.seq;
                overlap_from = i64::MAX;
            }
            _ => return Ok(total),
        }
    }
}
