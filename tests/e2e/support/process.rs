//! A kas replica as a real process, for tests that crash it with SIGKILL.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use super::TestDb;

/// A running `kas serve` process.
pub struct ProcessReplica {
    pub http: SocketAddr,
    pub agent: SocketAddr,
    /// Every log line so far (JSON).
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    child: Child,
}

impl ProcessReplica {
    /// Starts `kas serve` on port-0 listeners against `db`, with extra environment.
    pub fn spawn(db: &TestDb, env: &[(&str, String)]) -> ProcessReplica {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kas"));
        cmd.args(["serve", "--http-addr", "127.0.0.1:0", "--agent-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
            .env("KAS_DATABASE_URL", db.url())
            .env("KAS_DATA_DIR", db.data_dir())
            .env("KAS_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env_remove("KAS_CONFIG")
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (http, agent) = loop {
            let line = lines.next().expect("replica logs before exiting").unwrap();
            logs.lock().unwrap().push(line.clone());
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "kas is serving" {
                break (v["http"].as_str().unwrap().parse().unwrap(), v["agent"].as_str().unwrap().parse().unwrap());
            }
        };
        // Keep draining the logs so the replica never blocks on a full pipe.
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        ProcessReplica { http, agent, logs, child }
    }

    /// SIGKILL: no drain, no goodbye, as a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProcessReplica {
    fn drop(&mut self) {
        self.kill();
    }
}
