//! What GitLab Rails 17/18 calls on the agent server it is pointed at (`gitlab_kas` internal URL),
//! with the messages and metadata Rails sends (`support/wire.rs`): server info and the agent
//! configuration files of a project. Connected agents by ids are in `agentk.rs`.

use tonic::Code;

use crate::support::wire::{self, Empty, GetServerInfoResponse, ListAgentConfigFilesResponse};
use crate::support::{TestApp, TestDb};

const SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

async fn app(db: &TestDb) -> TestApp {
    let secret = crate::intake::write_gitlab_secret(db);
    TestApp::spawn(db, |s| s.gitlab_secret_file = Some(secret)).await
}

async fn call<Req, Resp>(app: &TestApp, path: &'static str, request: tonic::Request<Req>) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.api)).unwrap().connect().await.unwrap();
    wire::unary(&channel, path, request, false).await
}

fn rails<T>(message: T) -> tonic::Request<T> {
    wire::as_rails(&crate::intake::gitlab_jwt(SECRET, "gitlab-kas", 60), message)
}

#[tokio::test]
async fn server_info_is_kas_version_and_git_ref() {
    let db = TestDb::sqlite();
    let app = app(&db).await;
    let info: GetServerInfoResponse = call(&app, wire::GET_SERVER_INFO, rails(Empty {})).await.unwrap();
    let info = info.current_server_info.expect("current_server_info");
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.git_ref, kas::grpc::server_info::GIT_REF);
    assert!(
        info.git_ref == "unknown" || (info.git_ref.len() == 40 && info.git_ref.bytes().all(|b| b.is_ascii_hexdigit())),
        "{}",
        info.git_ref
    );
    let err =
        call::<_, GetServerInfoResponse>(&app, wire::GET_SERVER_INFO, tonic::Request::new(Empty {})).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "GitLab's JWT is required");
    app.stop().await;
}

/// GitLab uses the answered version as agentk's image tag ("Connect a cluster"): with
/// KAS_SERVER_VERSION set, that is what GetServerInfo answers.
#[tokio::test]
async fn server_info_answers_the_configured_version() {
    let db = TestDb::sqlite();
    let secret = crate::intake::write_gitlab_secret(&db);
    let app = TestApp::spawn(&db, |s| {
        s.gitlab_secret_file = Some(secret);
        s.server_version = Some("v18.6.0".into());
    })
    .await;
    let info: GetServerInfoResponse = call(&app, wire::GET_SERVER_INFO, rails(Empty {})).await.unwrap();
    let info = info.current_server_info.expect("current_server_info");
    assert_eq!(info.version, "v18.6.0");
    assert_eq!(info.git_ref, kas::grpc::server_info::GIT_REF);
    app.stop().await;
}

/// Facing GitLab (its shared secret set) without KAS_SERVER_VERSION, kas warns once at start;
/// with it set, it does not.
#[test]
fn an_unset_server_version_is_warned_about_once() {
    let warned = |version: Option<&str>| {
        let db = TestDb::sqlite();
        let mut env = vec![("KAS_GITLAB_SECRET_FILE", crate::intake::write_gitlab_secret(&db))];
        if let Some(v) = version {
            env.push(("KAS_SERVER_VERSION", v.to_owned()));
        }
        let replica = crate::support::process::ProcessReplica::spawn(&db, &env);
        let logs = replica.logs.lock().unwrap().clone();
        logs.iter().filter(|l| l.contains("KAS_SERVER_VERSION is not set")).count()
    };
    assert_eq!(warned(None), 1);
    assert_eq!(warned(Some("v18.6.0")), 0);
}

#[tokio::test]
async fn config_files_of_a_project_from_the_registry() {
    let db = TestDb::sqlite();
    let app = app(&db).await;
    app.create_agent("deployer", "team/agent-config").await;
    app.create_agent("web", "team/agent-config").await;
    app.create_agent("elsewhere", "team/other").await;
    let list = |path: &str| {
        let request = rails(wire::list_config_files_request(42, path));
        let app = &app;
        async move { call::<_, ListAgentConfigFilesResponse>(app, wire::LIST_AGENT_CONFIG_FILES, request).await }
    };
    let mut files: Vec<(String, String)> =
        list("team/agent-config").await.unwrap().config_files.into_iter().map(|f| (f.name, f.agent_name)).collect();
    files.sort();
    assert_eq!(
        files,
        [
            (".gitlab/agents/deployer/config.yaml".to_owned(), "deployer".to_owned()),
            (".gitlab/agents/web/config.yaml".to_owned(), "web".to_owned()),
        ]
    );
    assert!(list("team/nothing-here").await.unwrap().config_files.is_empty());
    assert_eq!(list("not a path").await.unwrap_err().code(), Code::InvalidArgument);
    let no_repository = rails(wire::ListAgentConfigFilesRequest::default());
    let err = call::<_, ListAgentConfigFilesResponse>(&app, wire::LIST_AGENT_CONFIG_FILES, no_repository).await;
    assert_eq!(err.unwrap_err().code(), Code::InvalidArgument);
    app.stop().await;
}
