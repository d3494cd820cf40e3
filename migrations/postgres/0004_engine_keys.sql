-- Keys kas generates once and every replica shares through the database (never through Redis):
-- the key that signs what replicas leave in Redis, so whoever can write to Redis but cannot
-- read the database cannot forge it.
CREATE TABLE engine_keys (
    name TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
