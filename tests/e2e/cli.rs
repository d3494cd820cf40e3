//! The `kas` binary's registry commands, run as a user runs them.

use std::process::{Command, Output};

use kas::domain::AgentToken;

use crate::support::TestDb;

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
