//! What kas does in clusters through the agents' tunnels, for agents that opted in: today,
//! asking Flux to reconcile OCIRepository objects when the registry gets a push (`oci`: which
//! objects and the patch; `runner`: who acts, once, on which replica).

pub mod oci;
pub mod runner;
pub mod sync;
