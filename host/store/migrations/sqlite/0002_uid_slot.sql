-- A sandbox's host uid slot: allocated at create, held until the row is
-- deleted. NULL for rows stored before this migration, until backfilled;
-- a UNIQUE index allows any number of NULLs (as in Postgres). Keep in step
-- with ../postgres/0002_uid_slot.sql.
ALTER TABLE sandboxes ADD COLUMN uid_slot INTEGER CHECK (uid_slot BETWEEN 0 AND 4294967295);

CREATE UNIQUE INDEX sandboxes_uid_slot ON sandboxes (uid_slot);
