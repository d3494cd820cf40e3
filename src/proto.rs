//! Code generated from `proto/` (GitLab's wire names), re-exported by package.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!(concat!(env!("OUT_DIR"), "/gitlab.rs"));

pub use gitlab::agent::*;
