//! The `kas` binary: parse the command line; for `serve`, load the configuration, start
//! logging, bind the listeners and run until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use kas::cli::{Cli, Command};
use kas::config::{Settings, parse_log_format};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS implementation for every client and server in the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(settings) => serve(*settings).await,
            command => {
                kas::telemetry::init(kas::config::LogFormat::Text, "warn");
                kas::cli::run(command, &mut std::io::stdout().lock()).await.map_err(|e| e.to_string())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> Result<(), String> {
    kas::telemetry::init(
        parse_log_format(settings.log_format.as_deref()).unwrap_or(kas::config::LogFormat::Text),
        "info",
    );
    let config = settings.resolve().map_err(|e| e.to_string())?;
    let listeners = kas::Listeners::bind(&config).await.map_err(|e| e.to_string())?;
    kas::serve(config, listeners, kas::server::shutdown_signal()).await.map_err(|e| e.to_string())
}
