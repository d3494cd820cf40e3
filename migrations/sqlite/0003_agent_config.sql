-- The agent configuration file as the operator stored it (validated on the way in), and a
-- version bumped on every change so replicas notice it.
ALTER TABLE agents ADD COLUMN config_yaml TEXT;
ALTER TABLE agents ADD COLUMN config_version BIGINT NOT NULL DEFAULT 0;
