//! What kas does in clusters through the agents' tunnels, for agents that opted in: asking
//! Flux to reconcile OCIRepository objects when the registry gets a push (`oci`: which objects
//! and the patch; `runner`: who acts, once, on which replica), and reporting Flux's results to
//! GitLab as commit statuses (`sync`).

pub mod oci;
pub mod runner;
pub mod sync;
