-- One identity per build cluster: its name, unique across scmContexts, and unique up to case and
-- '-', '.', '_' (name_key, as sd_protocol::cluster::cluster_name_key spells it), because the key
-- variables SD_CLUSTER_<name_key>_PUBLIC_KEY are spelled from it. And one cluster per key
-- variable: a record cannot borrow another cluster's key.
-- Same SQL for SQLite and PostgreSQL. Fails when the table already breaks either rule: rename
-- or delete the offending records first (docs/operations.md, "Upgrading").
ALTER TABLE buildClusters ADD COLUMN name_key TEXT NOT NULL DEFAULT '';
UPDATE buildClusters SET name_key = UPPER(REPLACE(REPLACE(name, '-', '_'), '.', '_'));
CREATE UNIQUE INDEX buildClusters_name_key ON buildClusters (name_key);
CREATE UNIQUE INDEX buildClusters_auth_key ON buildClusters (auth_key);
