-- Registry, project registry, push-event log and delivery positions.
-- Times are Unix milliseconds (BIGINT) so both backends store them the same way.

CREATE TABLE agents (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    name                TEXT   NOT NULL,
    config_project_path TEXT   NOT NULL,
    created_at          BIGINT NOT NULL,
    UNIQUE (config_project_path, name)
);
CREATE INDEX agents_name ON agents (name);

CREATE TABLE agent_tokens (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id     BIGINT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    digest       TEXT   NOT NULL UNIQUE,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at   BIGINT
);
CREATE INDEX agent_tokens_agent ON agent_tokens (agent_id);

-- full_path is not unique: after a rename GitLab may reuse a path before we hear of the
-- rename; lookups by path take the most recently updated row.
CREATE TABLE projects (
    id                BIGINT PRIMARY KEY,
    full_path         TEXT   NOT NULL,
    visibility        TEXT,
    repository_access TEXT   NOT NULL DEFAULT 'everyone',
    updated_at        BIGINT NOT NULL
);
CREATE INDEX projects_full_path ON projects (full_path, updated_at);

CREATE TABLE push_events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT   NOT NULL UNIQUE,
    project_id      BIGINT NOT NULL,
    project_path    TEXT   NOT NULL,
    kind            TEXT   NOT NULL,
    git_ref         TEXT,
    before_sha      TEXT,
    after_sha       TEXT,
    source          TEXT   NOT NULL,
    received_at     BIGINT NOT NULL,
    published_at    BIGINT,
    claimed_until   BIGINT
);
CREATE INDEX push_events_received ON push_events (received_at);
CREATE INDEX push_events_unpublished ON push_events (seq) WHERE published_at IS NULL;

CREATE TABLE agent_positions (
    agent_id   BIGINT PRIMARY KEY,
    seq        BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
