//! End-to-end tests: real servers on port 0, real clients, real SQLite, PostgreSQL and Redis.

mod support;

mod agentk;
mod cli;
mod crash;
mod fuzz_seeds;
mod gitlab_mode;
mod hostile;
mod intake;
mod limits;
mod oci;
mod rails;
mod regressions;
mod replicas;
mod security;
mod server;
mod store_story;
mod streams;
mod sync;
mod tunnel;
