-- What kas did in an agent's cluster for an event (one row per agent and event): the mark that
-- makes an action happen once, also across replicas and restarts, and what the operator sees.
CREATE TABLE cluster_actions (
    agent_id BIGINT NOT NULL,
    seq      BIGINT NOT NULL,
    outcome  TEXT   NOT NULL,
    detail   TEXT   NOT NULL DEFAULT '',
    done_at  BIGINT NOT NULL,
    PRIMARY KEY (agent_id, seq)
);
CREATE INDEX cluster_actions_done ON cluster_actions (done_at);
CREATE INDEX push_events_kind ON push_events (kind, received_at);
