//! The `builds` table: one row per accepted build, the source of truth behind the queues.

use sqlx::any::AnyRow;
use sqlx::{Any, Executor, Row};

use crate::db::{Backend, Db, DbError, now_ms};
use crate::group_commit::GroupCommit;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    /// Waiting for an eligible cluster.
    Unroutable,
    /// On a cluster's master queue.
    Queued,
    /// Transferred to the cluster's agent.
    Dispatched,
    Running,
    Finished,
    Failed,
    Stopped,
    Collapsed,
    /// Dead-lettered: delivered `queue.max_attempts` times and never acknowledged. Still
    /// QUEUED in Screwdriver, held for an operator to requeue or fail until
    /// `queue.dead_letter_hold` passes, then failed.
    Dead,
}

impl BuildState {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Unroutable => "unroutable",
            BuildState::Queued => "queued",
            BuildState::Dispatched => "dispatched",
            BuildState::Running => "running",
            BuildState::Finished => "finished",
            BuildState::Failed => "failed",
            BuildState::Stopped => "stopped",
            BuildState::Collapsed => "collapsed",
            BuildState::Dead => "dead",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [
            BuildState::Unroutable,
            BuildState::Queued,
            BuildState::Dispatched,
            BuildState::Running,
            BuildState::Finished,
            BuildState::Failed,
            BuildState::Stopped,
            BuildState::Collapsed,
            BuildState::Dead,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// States from which a build may still start somewhere.
    pub fn is_waiting(self) -> bool {
        matches!(self, BuildState::Unroutable | BuildState::Queued)
    }
}

#[derive(Debug, Clone)]
pub struct BuildRow {
    pub build_id: u64,
    pub job_id: u64,
    pub pipeline_id: u64,
    pub scm_context: String,
    pub organization: String,
    pub cluster: Option<String>,
    pub state: BuildState,
    pub reason: Option<String>,
    /// The start payload as received, without any token.
    pub message: String,
    pub body_token: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// One step of a build: its state, cluster and reason from `at` (epoch ms) on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub state: BuildState,
    pub cluster: Option<String>,
    pub reason: Option<String>,
    /// Epoch milliseconds.
    pub at: i64,
}

#[derive(Clone)]
pub struct Builds {
    db: Db,
    /// New builds on SQLite go in groups, one commit each.
    inserts: GroupCommit,
}

const COLUMNS: &str = "build_id, job_id, pipeline_id, scm_context, organization, cluster, state, \
     reason, message, body_token, created_at, updated_at";

impl Builds {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            inserts: GroupCommit::default(),
        }
    }

    /// Inserts the row unless the build is known; `false` means it already existed. On SQLite
    /// the row goes with the others arriving meanwhile, in one commit ([`GroupCommit`]).
    pub async fn insert(&self, row: &BuildRow) -> Result<bool, DbError> {
        match self.db.backend {
            Backend::Sqlite => self.inserts.insert(&self.db, row.clone()).await,
            Backend::Postgres => insert_row(&self.db.pool, row).await,
        }
    }

    pub async fn get(&self, build_id: u64) -> Result<Option<BuildRow>, DbError> {
        let sql = format!("SELECT {COLUMNS} FROM builds WHERE build_id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id(build_id))
            .fetch_optional(&self.db.pool)
            .await?;
        row.as_ref().map(decode).transpose()
    }

    /// A build's steps, oldest first, at most the latest `limit` (see migration 3).
    pub async fn history(&self, build_id: u64, limit: i64) -> Result<Vec<Step>, DbError> {
        let rows = sqlx::query(
            "SELECT state, cluster, reason, at FROM (SELECT seq, state, cluster, reason, at \
             FROM build_history WHERE build_id = $1 ORDER BY seq DESC LIMIT $2) latest ORDER BY seq",
        )
        .bind(id(build_id))
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let state: String = row.try_get("state")?;
                Ok(Step {
                    state: BuildState::parse(&state).ok_or_else(|| {
                        DbError::Query(sqlx::Error::Decode(
                            format!("build_history.state has unknown value {state:?}").into(),
                        ))
                    })?,
                    cluster: row.try_get("cluster")?,
                    reason: row.try_get("reason")?,
                    at: row.try_get("at")?,
                })
            })
            .collect()
    }

    /// Oldest builds in `state`, at most `limit`.
    pub async fn in_state(&self, state: BuildState, limit: i64) -> Result<Vec<BuildRow>, DbError> {
        let sql =
            format!("SELECT {COLUMNS} FROM builds WHERE state = $1 ORDER BY created_at LIMIT $2");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(state.as_str())
            .bind(limit)
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    /// Moves a build from `from` to `to` (setting cluster and reason); `false` when another
    /// replica or request changed it first. This compare-and-set is what keeps two replicas
    /// from routing one held build twice.
    pub async fn transition(
        &self,
        build_id: u64,
        from: BuildState,
        to: BuildState,
        cluster: Option<&str>,
        reason: Option<&str>,
    ) -> Result<bool, DbError> {
        let _turn = self.db.write_turn().await;
        let done = sqlx::query(
            "UPDATE builds SET state = $1, cluster = $2, reason = $3, updated_at = $4 \
             WHERE build_id = $5 AND state = $6",
        )
        .bind(to.as_str())
        .bind(cluster)
        .bind(reason)
        .bind(now_ms())
        .bind(id(build_id))
        .bind(from.as_str())
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Moves a build from `from` to `to`, keeping its cluster; `false` when it was not in `from`.
    pub async fn transition_keep_cluster(
        &self,
        build_id: u64,
        from: BuildState,
        to: BuildState,
        reason: &str,
    ) -> Result<bool, DbError> {
        let _turn = self.db.write_turn().await;
        let done = sqlx::query(
            "UPDATE builds SET state = $1, reason = $2, updated_at = $3 WHERE build_id = $4 AND state = $5",
        )
        .bind(to.as_str())
        .bind(reason)
        .bind(now_ms())
        .bind(id(build_id))
        .bind(from.as_str())
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks builds `cluster` acknowledged dispatched to it, in one transaction (one commit per
    /// ack batch). The acknowledged lease is proof of where the build went, so the row takes that
    /// cluster: an HA move may have put it there an instant before its own row update landed.
    pub async fn mark_dispatched(&self, cluster: &str, build_ids: &[u64]) -> Result<(), DbError> {
        if build_ids.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.pool.begin().await?;
        for build_id in build_ids {
            sqlx::query(
                "UPDATE builds SET state = 'dispatched', cluster = $1, reason = 'transferred to its cluster', \
                 updated_at = $2 WHERE build_id = $3 AND state = 'queued'",
            )
            .bind(cluster)
            .bind(now)
            .bind(id(*build_id))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Points a queued build at another cluster (after its message moved there).
    pub async fn reassign(
        &self,
        build_id: u64,
        from_cluster: &str,
        to_cluster: &str,
        reason: &str,
    ) -> Result<bool, DbError> {
        let _turn = self.db.write_turn().await;
        let done = sqlx::query(
            "UPDATE builds SET cluster = $1, reason = $2, updated_at = $3 \
             WHERE build_id = $4 AND state = 'queued' AND cluster = $5",
        )
        .bind(to_cluster)
        .bind(reason)
        .bind(now_ms())
        .bind(id(build_id))
        .bind(from_cluster)
        .execute(&self.db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Clusters that have queued builds.
    pub async fn queued_clusters(&self) -> Result<Vec<String>, DbError> {
        let rows = sqlx::query(
            "SELECT DISTINCT cluster FROM builds WHERE state = 'queued' AND cluster IS NOT NULL",
        )
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(DbError::from))
            .collect()
    }

    /// Queued builds of one cluster, oldest first.
    pub async fn queued_on(&self, cluster: &str, limit: i64) -> Result<Vec<BuildRow>, DbError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM builds WHERE state = 'queued' AND cluster = $1 ORDER BY created_at LIMIT $2"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(cluster)
            .bind(limit)
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    /// Builds in `state` not updated since `before_ms`, oldest first.
    pub async fn stale(
        &self,
        state: BuildState,
        before_ms: i64,
        limit: i64,
    ) -> Result<Vec<BuildRow>, DbError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM builds WHERE state = $1 AND updated_at < $2 ORDER BY updated_at LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(state.as_str())
            .bind(before_ms)
            .bind(limit)
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    /// Records why a build waits, without changing its state.
    pub async fn set_reason(&self, build_id: u64, reason: &str) -> Result<(), DbError> {
        let _turn = self.db.write_turn().await;
        sqlx::query("UPDATE builds SET reason = $1, updated_at = $2 WHERE build_id = $3")
            .bind(reason)
            .bind(now_ms())
            .bind(id(build_id))
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    pub async fn count(&self) -> Result<i64, DbError> {
        let row = sqlx::query("SELECT COUNT(*) FROM builds")
            .fetch_one(&self.db.pool)
            .await?;
        Ok(row.try_get(0)?)
    }
}

/// One build's `INSERT … ON CONFLICT DO NOTHING` on `exec` (the pool, or a group's
/// transaction); `false` when the build already existed.
pub(crate) async fn insert_row<'e, E>(exec: E, row: &BuildRow) -> Result<bool, DbError>
where
    E: Executor<'e, Database = Any>,
{
    let done = sqlx::query(
        "INSERT INTO builds (build_id, job_id, pipeline_id, scm_context, organization, cluster, \
         state, reason, message, body_token, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11) \
         ON CONFLICT (build_id) DO NOTHING",
    )
    .bind(id(row.build_id))
    .bind(id(row.job_id))
    .bind(id(row.pipeline_id))
    .bind(&row.scm_context)
    .bind(&row.organization)
    .bind(row.cluster.as_deref())
    .bind(row.state.as_str())
    .bind(row.reason.as_deref())
    .bind(&row.message)
    .bind(row.body_token.as_deref())
    .bind(now_ms())
    .execute(exec)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Build and job ids are positive and far below 2^63; the database stores them as BIGINT.
fn id(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn decode(row: &AnyRow) -> Result<BuildRow, DbError> {
    let state: String = row.try_get("state")?;
    let unsigned = |name: &str| -> Result<u64, DbError> {
        let v: i64 = row.try_get(name)?;
        Ok(u64::try_from(v).unwrap_or(0))
    };
    Ok(BuildRow {
        build_id: unsigned("build_id")?,
        job_id: unsigned("job_id")?,
        pipeline_id: unsigned("pipeline_id")?,
        scm_context: row.try_get("scm_context")?,
        organization: row.try_get("organization")?,
        cluster: row.try_get("cluster")?,
        state: BuildState::parse(&state).ok_or_else(|| {
            DbError::Query(sqlx::Error::Decode(
                format!("builds.state has unknown value {state:?}").into(),
            ))
        })?,
        reason: row.try_get("reason")?,
        message: row.try_get("message")?,
        body_token: row.try_get("body_token")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
