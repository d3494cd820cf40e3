//! A kas replica as a real process, for tests that crash it with SIGKILL.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use super::TestDb;

/// A running `kas serve` process.
pub struct ProcessReplica {
    pub http: SocketAddr,
    pub agent: SocketAddr,
    pub api: SocketAddr,
    /// Every log line so far (JSON).
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The JSON log lines before "kas is serving".
    pub startup_logs: Vec<serde_json::Value>,
    child: Child,
}

impl ProcessReplica {
    /// Starts `kas serve` on port-0 listeners against `db`, with extra environment.
    pub fn spawn(db: &TestDb, env: &[(&str, String)]) -> ProcessReplica {
        Self::spawn_with(db, env, None)
    }

    /// As `spawn`, with the soft open-file limit lowered to `soft_open_files` first.
    pub fn spawn_with(db: &TestDb, env: &[(&str, String)], soft_open_files: Option<u64>) -> ProcessReplica {
        let kas = env!("CARGO_BIN_EXE_kas");
        let mut cmd = match soft_open_files {
            Some(n) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("ulimit -Sn {n} && exec \"$0\" \"$@\""), kas]);
                c
            }
            None => Command::new(kas),
        };
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
        let mut startup_logs = Vec::new();
        let (http, agent, api) = loop {
            let line = lines.next().expect("replica logs before exiting").unwrap();
            logs.lock().unwrap().push(line.clone());
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "kas is serving" {
                let addr = |name: &str| v[name].as_str().unwrap().parse().unwrap();
                break (addr("http"), addr("agent"), addr("api"));
            }
            startup_logs.push(v);
        };
        // Keep draining the logs so the replica never blocks on a full pipe.
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        ProcessReplica { http, agent, api, logs, startup_logs, child }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The highest resident memory so far (VmHWM), from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }

    /// SIGTERM, then waits for the exit (at most 30 s); true when it exited with success.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
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
