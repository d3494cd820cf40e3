-- Container registry pushes are events of kind 'image_push' in the same log: the tag goes in
-- git_ref, the manifest digest in after_sha, and these two columns say where it was pushed.
ALTER TABLE push_events ADD COLUMN repository TEXT;
ALTER TABLE push_events ADD COLUMN registry_host TEXT;
