-- Postgres schema. Keep in step with ../sqlite/0001_init.sql: the column names
-- and meanings are the same; only the type names (BYTEA vs BLOB) and the
-- collation of id differ.

CREATE TABLE sandboxes (
    -- "C" so that ordering by id is byte order, as in SQLite, whatever
    -- locale the server was created with.
    id            TEXT   COLLATE "C" NOT NULL PRIMARY KEY,
    name          TEXT   NOT NULL UNIQUE,
    request_id    TEXT   UNIQUE,
    -- Copies of spec.driver and status.phase, kept as columns for queries;
    -- the JSON in spec and status is what is read back.
    driver        TEXT   NOT NULL,
    spec          TEXT   NOT NULL,
    phase         TEXT   NOT NULL,
    status        TEXT   NOT NULL,
    driver_state  BYTEA  NOT NULL,
    secret_hash   TEXT,
    revision      BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE INDEX sandboxes_created_at ON sandboxes (created_at_ms, id);
CREATE INDEX sandboxes_driver ON sandboxes (driver);

CREATE TABLE plugins (
    name         TEXT   NOT NULL PRIMARY KEY,
    digest       TEXT   NOT NULL,
    version      TEXT   NOT NULL,
    grants       TEXT   NOT NULL,
    wasm_path    TEXT   NOT NULL,
    loaded_at_ms BIGINT NOT NULL
);
