-- When a sandbox was last active (a relay opened or closed, a create, a
-- start), in ms since the epoch: what its idle timeout counts from, kept
-- here so the deadline survives a gateway restart. Not part of the record
-- (no revision bump, no watchers told); NULL for rows from before this
-- migration, whose idle clock starts at their creation. The ttl and idle
-- timeout themselves are in the spec's JSON. Keep in step with
-- ../sqlite/0003_last_active.sql.
ALTER TABLE sandboxes ADD COLUMN last_active_ms BIGINT;
