-- SQLite schema. Keep in step with ../postgres/0001_init.sql: the column names
-- and meanings are the same; only the type names differ (BLOB vs BYTEA).
-- STRICT makes SQLite reject a value of the wrong type instead of storing it.

CREATE TABLE sandboxes (
    id            TEXT    NOT NULL PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    request_id    TEXT    UNIQUE,
    -- Copies of spec.driver and status.phase, kept as columns for queries;
    -- the JSON in spec and status is what is read back.
    driver        TEXT    NOT NULL,
    spec          TEXT    NOT NULL,
    phase         TEXT    NOT NULL,
    status        TEXT    NOT NULL,
    driver_state  BLOB    NOT NULL,
    secret_hash   TEXT,
    revision      INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
) STRICT;

CREATE INDEX sandboxes_created_at ON sandboxes (created_at_ms, id);
CREATE INDEX sandboxes_driver ON sandboxes (driver);

CREATE TABLE plugins (
    name         TEXT    NOT NULL PRIMARY KEY,
    digest       TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    grants       TEXT    NOT NULL,
    wasm_path    TEXT    NOT NULL,
    loaded_at_ms INTEGER NOT NULL
) STRICT;
