-- Commit statuses kas posted to GitLab for Flux results: the mark that makes each
-- (project, commit, status name, state) posted once, also across replicas and restarts.
CREATE TABLE sync_statuses (
    project   TEXT   NOT NULL,
    sha       TEXT   NOT NULL,
    name      TEXT   NOT NULL,
    state     TEXT   NOT NULL,
    agent_id  BIGINT NOT NULL,
    posted_at BIGINT NOT NULL,
    PRIMARY KEY (project, sha, name, state)
);
CREATE INDEX sync_statuses_posted ON sync_statuses (posted_at);

-- The last state Flux reported per agent and Kustomization, for operators (GET /agents).
CREATE TABLE sync_kustomizations (
    agent_id   BIGINT NOT NULL,
    namespace  TEXT   NOT NULL,
    name       TEXT   NOT NULL,
    revision   TEXT   NOT NULL,
    state      TEXT   NOT NULL,
    project    TEXT,
    sha        TEXT,
    message    TEXT   NOT NULL DEFAULT '',
    reported   TEXT   NOT NULL DEFAULT '',
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (agent_id, namespace, name)
);

-- push -> synced: the push kas recorded for a project and commit.
CREATE INDEX push_events_commit ON push_events (project_path, after_sha);
