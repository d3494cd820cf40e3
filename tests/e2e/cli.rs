//! The `kas` binary's registry commands, run as a user runs them.

use std::process::{Command, Output};
use std::time::Duration;

use kas::domain::AgentToken;

use crate::support::{TestApp, TestDb};

fn kas(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(args)
        .env("KAS_DATABASE_URL", db.url())
        .env("KAS_DATA_DIR", db.data_dir())
        .env_remove("KAS_CONFIG")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

/// Asserts failure with exactly one line on stderr mentioning `needle`.
fn assert_fails(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure, got {:?}\n{}", o.status, stdout(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "one-line error expected: {err:?}");
    assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
}

async fn registry_commands(db: TestDb) {
    let out = kas(&db, &["agent", "create", "my-agent", "--config-project", "group/sub/config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let token = text.lines().last().unwrap();
    assert!(token.starts_with("glagent-") && token.len() == 58, "last line is the token alone: {token:?}");

    let store = db.open_store().await;
    let auth = store.authenticate(&AgentToken::from_presented(token).unwrap().digest(), 1).await.unwrap().unwrap();
    assert_eq!(auth.agent.name.as_str(), "my-agent");
    assert_eq!(auth.agent.config_project.as_str(), "group/sub/config");

    assert_fails(&kas(&db, &["agent", "create", "my-agent", "--config-project", "group/sub/config"]), "already exists");
    assert_fails(&kas(&db, &["agent", "create", "My_Agent", "--config-project", "g/c"]), "agent name");
    assert_fails(&kas(&db, &["agent", "create", "ok", "--config-project", "no-namespace"]), "project path");
    assert_fails(&kas(&db, &["token", "create", "nobody"]), "no agent named nobody");
    assert_fails(&kas(&db, &["project", "set", "g/p", "--id", "1", "--visibility", "secret"]), "visibility");
    assert_fails(
        &kas(&db, &["project", "set", "g/p", "--id", "1", "--visibility", "public", "--repository-access", "all"]),
        "repository access",
    );
    assert_fails(&kas(&db, &["project", "set", "g/p", "--id", "0", "--visibility", "public"]), "project id");
    assert_fails(&kas(&db, &["token", "revoke", "424242"]), "no token");

    let second = kas(&db, &["token", "create", "my-agent"]);
    assert!(second.status.success());
    let second_token = stdout(&second).lines().last().unwrap().to_owned();
    assert_ne!(second_token, token);
    assert_fails(&kas(&db, &["token", "create", "my-agent"]), "at most 2");

    let list = stdout(&kas(&db, &["token", "list", "my-agent"]));
    assert_eq!(list.lines().filter(|l| l.contains("active")).count(), 2, "{list}");
    assert!(!list.contains(token) && !list.contains(&second_token), "tokens are never listed");

    let revoke = kas(&db, &["token", "revoke", &auth.token_id.to_string()]);
    assert!(revoke.status.success());
    assert!(
        store.authenticate(&AgentToken::from_presented(token).unwrap().digest(), 2).await.unwrap().is_none(),
        "revoked at once"
    );

    let set = kas(&db, &["project", "set", "group/app", "--id", "12", "--visibility", "public"]);
    assert!(set.status.success(), "{}", stderr(&set));
    let p = store.project_by_path(&"group/app".parse().unwrap()).await.unwrap().unwrap();
    assert_eq!((p.id, p.visibility.unwrap().as_str(), p.repository_access.as_str()), (12, "public", "everyone"));

    // Same name under another configuration project: deleting by name alone is ambiguous.
    assert!(kas(&db, &["agent", "create", "my-agent", "--config-project", "other/config"]).status.success());
    assert_fails(&kas(&db, &["agent", "delete", "my-agent"]), "--config-project");
    let del = kas(&db, &["agent", "delete", "my-agent", "--config-project", "other/config"]);
    assert!(del.status.success(), "{}", stderr(&del));
    let agents = stdout(&kas(&db, &["agent", "list"]));
    assert!(agents.contains("group/sub/config") && !agents.contains("other/config"), "{agents}");
    store.close().await;
}
crate::both_backends!(registry_commands_work, registry_commands);

#[test]
fn migrate_creates_the_embedded_database() {
    let db = TestDb::sqlite();
    let out = kas(&db, &["migrate"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(db.data_dir().join("kas.db").exists());
}

#[test]
fn bad_setting_fails_at_start_naming_it() {
    let db = TestDb::sqlite();
    let out = Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["serve", "--replay-window", "soon"])
        .env("KAS_DATA_DIR", db.data_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--replay-window (KAS_REPLAY_WINDOW)"), "{}", stderr(&out));
    let out = Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["serve"])
        .env("KAS_DATA_DIR", db.data_dir())
        .env("KAS_HTTP_ADDR", "not-an-address")
        .output()
        .unwrap();
    assert!(stderr(&out).contains("KAS_HTTP_ADDR"), "{}", stderr(&out));
}

/// A `kas watch` process whose stdout and stderr the test reads line by line.
struct Watch {
    child: tokio::process::Child,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    stderr: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
}

impl Watch {
    fn start(addr: &str, token_file: &std::path::Path, extra: &[&str]) -> Watch {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kas"))
            .args(["watch", "--addr", addr, "--token-file"])
            .arg(token_file)
            .args(extra)
            .env_remove("KAS_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        Watch { child, stdout, stderr }
    }

    /// Waits for the line that says the stream is open.
    async fn connected(&mut self) -> String {
        let line = tokio::time::timeout(Duration::from_secs(15), self.stderr.next_line())
            .await
            .expect("kas watch says it is connected")
            .unwrap()
            .expect("kas watch exited before connecting");
        assert!(line.starts_with("connected to "), "{line:?}");
        line
    }

    async fn notification(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(15), self.stdout.next_line())
            .await
            .expect("a notification")
            .unwrap()
            .expect("kas watch exited early");
        serde_json::from_str(&line).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_says_when_connected_and_marks_replayed_notifications() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |_| {}).await;
    let (_, token) = app.create_agent("watcher", "g/config").await;
    let token_file = db.data_dir().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    // A bare host:port, as KAS_AGENT_ADDR holds it, means http://.
    let addr = app.agent.to_string();

    let mut first = Watch::start(&addr, &token_file, &["g/config"]);
    let said = first.connected().await;
    assert_eq!(said, format!("connected to {addr}; watching 1 project(s)"));
    drop(first); // the agent goes away; its position was saved when the stream opened
    assert_eq!(app.push(1, "g/config", 0).await.status(), 202);

    let mut second = Watch::start(&addr, &token_file, &["--count", "2", "g/config"]);
    second.connected().await;
    let missed = second.notification().await;
    assert_eq!((missed["project"].as_str(), missed["replayed"].as_bool()), (Some("g/config"), Some(true)));
    // Past the replay burst, a new push is live.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.push(1, "g/config", 0).await.status(), 202);
    let live = second.notification().await;
    assert_eq!((live["project"].as_str(), live["replayed"].as_bool()), (Some("g/config"), Some(false)));
    let status = tokio::time::timeout(Duration::from_secs(15), second.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "--count 2 ends the command");
    app.stop().await;
}

#[test]
fn client_addresses_with_an_unusable_scheme_are_refused_naming_it() {
    let db = TestDb::sqlite();
    let token_file = db.data_dir().join("token");
    std::fs::write(&token_file, "glagent-x\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["watch", "--addr", "wss://gitlab.example.com/-/kubernetes-agent/", "--once", "--token-file"])
        .arg(&token_file)
        .arg("g/config")
        .output()
        .unwrap();
    assert_fails(&out, "use http://host:port");
}

async fn kas_health(env: &[(&str, String)]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kas"));
    cmd.arg("health").env_remove("KAS_HTTP_ADDR").env_remove("KAS_TLS_CERT_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_exits_zero_while_the_server_lives_and_one_after() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |_| {}).await;
    // What a container sets: a listen address, which the check turns into loopback.
    let env = [("KAS_HTTP_ADDR", format!("0.0.0.0:{}", app.http.port()))];
    let up = kas_health(&env).await;
    assert!(up.status.success(), "{}", stderr(&up));
    assert!(stdout(&up).contains("200 OK"), "{}", stdout(&up));
    app.stop().await;
    let down = kas_health(&env).await;
    assert_eq!(down.status.code(), Some(1));
    assert_fails(&down, "/healthz");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_a_tls_listener_whatever_its_certificate_names() {
    // Self-signed, and naming only localhost: the check at 127.0.0.1 could verify neither.
    let db = TestDb::sqlite();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (db.data_dir().join("tls.crt"), db.data_dir().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let app = TestApp::spawn(&db, |s| {
        s.tls_cert_file = Some(cert_path.display().to_string());
        s.tls_key_file = Some(key_path.display().to_string());
    })
    .await;
    let up = kas_health(&[
        ("KAS_HTTP_ADDR", format!("0.0.0.0:{}", app.http.port())),
        ("KAS_TLS_CERT_FILE", cert_path.display().to_string()),
    ])
    .await;
    assert!(up.status.success(), "{}", stderr(&up));
    assert!(stdout(&up).starts_with("https://127.0.0.1:"), "{}", stdout(&up));
    app.stop().await;
}

#[test]
fn text_logs_carry_no_colour_when_not_written_to_a_terminal() {
    use std::io::{BufRead, BufReader};
    let db = TestDb::sqlite();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["serve", "--http-addr", "127.0.0.1:0", "--agent-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
        .env("KAS_DATA_DIR", db.data_dir())
        .env("KAS_LOG_FORMAT", "text")
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .env_remove("KAS_CONFIG")
        .env_remove("KAS_DATABASE_URL")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("kas is serving") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.contains("kas is serving"), "{seen}");
    assert!(!seen.contains('\u{1b}'), "ANSI escapes in piped logs: {seen:?}");
}
