//! kas: a GitLab agent server for the git-push → agent notification path.
//!
//! Pushes come in at the edges (`http` webhooks, `grpc` GitPushEvent), are recorded once in
//! the event log (`store`) by `intake`, published through an `engine` (in-process or Redis)
//! to every replica, and `delivery` sends each to exactly the open agent streams that want
//! the project and may see it (`domain::access`). `server::serve` wires it together on
//! listeners the caller binds (`listener` is the shared accept loop); `cli` is the `kas`
//! command line. `tunnel` calls agents' clusters through agentk's reverse tunnels.
#![forbid(unsafe_code)]

pub mod actions;
pub mod agentcfg;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod engine;
pub mod files;
pub mod gitlab;
pub mod grpc;
pub mod handshake;
pub mod hex;
pub mod http;
pub mod identity;
pub mod intake;
pub mod listener;
pub mod metrics;
pub mod proto;
pub mod secrets;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tunnel;
pub mod websocket;

pub use server::{Listeners, ServeError, serve};
