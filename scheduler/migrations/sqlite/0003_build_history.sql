-- Every step of every build, for the operator's view of one build: a row when the build is
-- accepted and whenever its state, cluster or reason changes (queued → queued, blocked by a
-- running build → dispatched → running → finished, a move to another cluster, …). Written by
-- triggers, in the same transaction as the change itself, so no code path can forget it.
CREATE TABLE build_history (
    -- The order of the steps (several may fall in one millisecond).
    seq       INTEGER PRIMARY KEY,
    build_id  BIGINT  NOT NULL,
    state     TEXT    NOT NULL,
    cluster   TEXT,
    reason    TEXT,
    at        BIGINT  NOT NULL
);
CREATE INDEX build_history_build ON build_history (build_id, seq);
CREATE TRIGGER builds_history_insert AFTER INSERT ON builds
BEGIN
    INSERT INTO build_history (build_id, state, cluster, reason, at) VALUES (NEW.build_id, NEW.state, NEW.cluster, NEW.reason, NEW.created_at);
END;
CREATE TRIGGER builds_history_update AFTER UPDATE OF state, cluster, reason ON builds
WHEN OLD.state IS NOT NEW.state OR OLD.cluster IS NOT NEW.cluster OR OLD.reason IS NOT NEW.reason
BEGIN
    INSERT INTO build_history (build_id, state, cluster, reason, at) VALUES (NEW.build_id, NEW.state, NEW.cluster, NEW.reason, NEW.updated_at);
END;
