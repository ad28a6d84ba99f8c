-- Cluster registry. Secrets never live here: auth_key / sign_option hold variable NAMES.
CREATE TABLE buildClusters (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    name              TEXT    NOT NULL,
    scm_context       TEXT    NOT NULL,
    scm_organizations TEXT    NOT NULL, -- JSON array of organization names
    is_active         BIGINT  NOT NULL,
    auth_key          TEXT    NOT NULL,
    sign_option       TEXT,
    managed_by        TEXT    NOT NULL,
    managed_by_email  TEXT    NOT NULL,
    weightage         BIGINT  NOT NULL,
    cluster_group     TEXT    NOT NULL,
    description       TEXT,
    created_at        BIGINT  NOT NULL, -- epoch milliseconds
    updated_at        BIGINT  NOT NULL,
    UNIQUE (name, scm_context)
);

-- One row per accepted build: the source of truth behind the Redis queues.
CREATE TABLE builds (
    build_id          BIGINT  PRIMARY KEY,
    job_id            BIGINT  NOT NULL,
    pipeline_id       BIGINT  NOT NULL,
    scm_context       TEXT    NOT NULL,
    organization      TEXT    NOT NULL,
    cluster           TEXT,             -- NULL while unroutable
    state             TEXT    NOT NULL,
    reason            TEXT,
    message           TEXT    NOT NULL, -- start payload as received, without any token
    body_token        TEXT,             -- only when Screwdriver put a token in the body
    created_at        BIGINT  NOT NULL,
    updated_at        BIGINT  NOT NULL
);
CREATE INDEX builds_state ON builds (state, updated_at);
