-- Replay reads the events of an agent's projects within the window.
CREATE INDEX push_events_project ON push_events (project_path, received_at);
