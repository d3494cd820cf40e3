//! `kas-load`: starts kas (as a child process, so its CPU and memory are its own), connects agent
//! streams, fires webhooks, and prints what it measured: intake throughput and latency,
//! intake-to-agent latency, notifications delivered against expected, server CPU and memory,
//! memory per connected stream, and the baselines that make these ratios (a bare axum handler,
//! raw Redis PUBLISH → subscriber). Targets only 127.0.0.1; every phase is bounded in time.
//!
//! `cargo run --release --features load --bin kas-load` runs every scenario with the defaults.

mod agents;
mod children;
mod process;
mod scenarios;
mod stats;
mod webhooks;

use std::time::Duration;

use clap::{Parser, Subcommand};

/// Load tool for kas.
#[derive(Parser)]
#[command(name = "kas-load")]
struct Cli {
    #[command(subcommand)]
    child: Option<Child>,
    #[command(flatten)]
    options: Options,
}

#[derive(Subcommand)]
enum Child {
    /// (internal) run kas with these `kas serve` flags on port-0 listeners
    #[command(name = "serve-child", hide = true)]
    Serve {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// (internal) run the bare axum baseline
    #[command(name = "axum-child", hide = true)]
    Axum,
    /// (internal) run the bare HTTP/2 memory baseline
    #[command(name = "h2-child", hide = true)]
    H2,
}

/// What to run and how hard.
#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// all, baseline-http, baseline-redis, baseline-memory, intake, fanout, fanout-redis, idle-flood, gitlab-flood
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// Length of each measured phase, in seconds
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Webhook connections for the throughput floods (closed loop: throughput ≈ connections ÷ latency)
    #[arg(long, default_value_t = 96)]
    pub concurrency: usize,
    /// Connected agent streams (each its own HTTP/2 connection)
    #[arg(long, default_value_t = 10_000)]
    pub agents: usize,
    /// Agent connections opened at once
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Silent sockets the idle-flood scenario holds on the webhook port (at most 20,000)
    #[arg(long, default_value_t = 3000)]
    pub idle_sockets: usize,
    /// Pushes per second spread over the agents
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// PostgreSQL server (a database is created and dropped for each scenario)
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pub postgres: String,
    /// Redis server (a fresh key prefix per scenario, deleted afterwards)
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// Also write the results as JSON to this file
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

impl Options {
    fn duration(&self) -> Duration {
        Duration::from_secs(self.seconds.clamp(1, 600))
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let result = runtime.block_on(async move {
        match cli.child {
            Some(Child::Serve { args }) => children::serve(args).await,
            Some(Child::Axum) => children::bare_axum().await,
            Some(Child::H2) => children::bare_h2().await,
            None => scenarios::run(cli.options).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
