//! Group commit of new builds on SQLite: the builds arriving while one transaction commits go
//! in the next one together, so a burst of intake pays one commit (one `fsync` of the WAL)
//! per group instead of one per build, and no request sleeps in SQLite's busy handler.
//!
//! Each insert joins the queue, then waits for its writer's turn ([`Db::write_turn`]); whoever
//! gets the turn writes everything queued by then, its own row or not, and tells each waiter
//! its result. The whole of it runs in a task of its own, so a request that is cancelled
//! (its client gone, `http.request_timeout`) never leaves a row in the queue unwritten nor a
//! group half answered.

use std::sync::{Arc, Mutex, PoisonError};

use sqlx::AnyPool;
use tokio::sync::oneshot;

use crate::builds::{BuildRow, insert_row};
use crate::db::{Db, DbError};

/// A row waiting for the next group, and where its result goes.
struct Pending {
    row: BuildRow,
    done: oneshot::Sender<Result<bool, DbError>>,
}

#[derive(Clone, Default)]
pub struct GroupCommit {
    queue: Arc<Mutex<Vec<Pending>>>,
}

impl GroupCommit {
    /// Inserts `row` with the next group; `false` when the build already existed.
    pub async fn insert(&self, db: &Db, row: BuildRow) -> Result<bool, DbError> {
        let this = self.clone();
        let db = db.clone();
        tokio::spawn(async move { this.join(&db, row).await })
            .await
            .map_err(|_| DbError::Abandoned)?
    }

    async fn join(&self, db: &Db, row: BuildRow) -> Result<bool, DbError> {
        let (done, result) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Pending { row, done });
        {
            let _turn = db.write_turn().await;
            let group =
                std::mem::take(&mut *self.queue.lock().unwrap_or_else(PoisonError::into_inner));
            if !group.is_empty() {
                commit(&db.pool, group).await;
            }
        }
        // Written by now: by this task, or by one that held the turn before it.
        result.await.unwrap_or(Err(DbError::Abandoned))
    }
}

/// Writes `group` in one transaction. Should that fail, each row is written on its own so
/// every waiter hears its own row's fate rather than another's.
async fn commit(pool: &AnyPool, group: Vec<Pending>) {
    metrics::histogram!("sd_scheduler_db_group_size").record(group.len() as f64);
    match in_one_transaction(pool, &group).await {
        Ok(results) => {
            for (pending, inserted) in group.into_iter().zip(results) {
                let _ = pending.done.send(Ok(inserted));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, builds = group.len(), "group commit failed; writing its builds one by one");
            for pending in group {
                let result = insert_row(pool, &pending.row).await;
                let _ = pending.done.send(result);
            }
        }
    }
}

async fn in_one_transaction(pool: &AnyPool, group: &[Pending]) -> Result<Vec<bool>, DbError> {
    let mut tx = pool.begin().await?;
    let mut results = Vec::with_capacity(group.len());
    for pending in group {
        results.push(insert_row(&mut *tx, &pending.row).await?);
    }
    tx.commit().await?;
    Ok(results)
}
