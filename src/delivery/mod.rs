//! Delivery to this replica's agent streams.
//!
//! `Hub` puts the parts together (one file each: `index`, `seen`, `positions`, `revocation`,
//! `limits`, `stream`). It keeps an index from project path to the open streams that asked for it, so one event
//! costs work proportional to the streams that want it. Each stream's pending work is a set of
//! paths (`pending::Pending`): a burst of pushes to one project becomes one message, a slow
//! agent holds at most its own project set, and nothing is dropped. How far each agent's
//! notifications got is saved as its delivery position, so an agent that reconnects within the
//! replay window is sent, once, every project of its set pushed while it was away.

mod hub;
mod index;
mod limits;
mod pending;
mod positions;
mod revocation;
mod seen;
mod stream;

pub use hub::{CredentialGuard, Hub, HubConfig, HubParts};
pub use limits::TooManyStreams;
pub use revocation::{EndSignal, StreamEnd};
pub use stream::ReconcileStream;
