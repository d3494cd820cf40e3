//! What the child processes run: kas itself, or the bare axum handler that is the HTTP ceiling.

use std::net::SocketAddr;

use clap::Parser;
use kas::cli::{Cli, Command};

/// `kas-load serve-child <kas serve flags…>`: kas on port-0 listeners; prints their addresses.
pub async fn serve(args: Vec<String>) -> Result<(), String> {
    kas::telemetry::init(kas::config::LogFormat::Text, "warn");
    let mut full = vec!["kas".to_owned(), "serve".to_owned()];
    full.extend(args);
    let Command::Serve(settings) = Cli::try_parse_from(full).map_err(|e| e.to_string())?.command else {
        return Err("expected serve flags".into());
    };
    let config = settings.resolve().map_err(|e| e.to_string())?;
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let bind = |name| kas::server::bind(name, any).map_err(|e| e.to_string());
    let listeners = kas::Listeners { http: bind("HTTP")?, agent: bind("agent")?, api: bind("api")? };
    let addr = |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    println!(
        "{}",
        serde_json::json!({"http": addr(&listeners.http), "agent": addr(&listeners.agent), "api": addr(&listeners.api)})
    );
    kas::serve(config, listeners, kas::server::shutdown_signal()).await.map_err(|e| e.to_string())
}

/// `kas-load axum-child`: `POST /webhooks/gitlab` reads the body and answers 202, nothing else.
pub async fn bare_axum() -> Result<(), String> {
    use axum::routing::post;
    let app = axum::Router::new()
        .route("/webhooks/gitlab", post(|_: axum::body::Bytes| async { axum::http::StatusCode::ACCEPTED }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("{}", serde_json::json!({"http": addr.to_string()}));
    axum::serve(listener, app).with_graceful_shutdown(kas::server::shutdown_signal()).await.map_err(|e| e.to_string())
}

/// `kas-load h2-child`: bare hyper HTTP/2 that answers every request with a 200 whose body never
/// ends: the memory floor of one idle agent stream on the same stack kas uses.
pub async fn bare_h2() -> Result<(), String> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let addr: SocketAddr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("{}", serde_json::json!({"http": addr.to_string(), "agent": addr.to_string()}));
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => accepted.map_err(|e| e.to_string())?,
            _ = kas::server::shutdown_signal() => return Ok(()),
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req| async {
                let body = http_body_util::StreamBody::new(futures::stream::pending::<
                    Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
                >());
                Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
