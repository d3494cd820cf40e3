//! End-to-end tests: real servers on port 0, real clients, real SQLite, PostgreSQL and Redis.

mod support;

mod agentk;
mod cli;
mod fuzz_seeds;
mod gitlab_mode;
mod intake;
mod replicas;
mod server;
mod store_story;
mod streams;
