//! The cluster registry: the `buildClusters` table, and the in-memory cache routing reads.
//!
//! Architecture invariant: routing never queries the database. It reads [`ClusterCache`], which
//! is reloaded after every registry write on this replica, on a Redis pub/sub message from any
//! other replica, and periodically as a safety net.

use std::sync::{Arc, RwLock};

use sd_protocol::cluster::cluster_name_key;
use sd_protocol::{Cluster, ManagedBy, NewCluster};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::db::{Db, DbError, now_ms};

/// Redis channel on which every replica announces registry writes.
pub const INVALIDATION_CHANNEL: &str = "{sd}:registry";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Names are one cluster's identity (its queue, its heartbeat, its builds), unique across
    /// scmContexts and up to what would share key variables.
    #[error(
        "the name {name} is taken: cluster {existing} (scmContext {scm_context}) already has it{alike}; cluster names are unique across scmContexts",
        alike = if name == existing { "" } else { ", and the two names would share key variables" }
    )]
    NameTaken {
        name: String,
        existing: String,
        scm_context: String,
    },
    /// A key variable verifies one cluster only: a record cannot borrow another's key.
    #[error(
        "authKey {auth_key} is already the key of cluster {cluster}; every cluster has a key of its own"
    )]
    AuthKeyTaken { auth_key: String, cluster: String },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("stored cluster row {id} is corrupt: {reason}")]
    Corrupt { id: i64, reason: String },
}

impl From<sqlx::Error> for RegistryError {
    fn from(e: sqlx::Error) -> Self {
        RegistryError::Db(DbError::Query(e))
    }
}

// === impl Registry ===

/// CRUD on the `buildClusters` table.
#[derive(Clone)]
pub struct Registry {
    db: Db,
}

const COLUMNS: &str = "id, name, scm_context, scm_organizations, is_active, auth_key, sign_option, \
     managed_by, managed_by_email, weightage, cluster_group, description";

impl Registry {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub async fn list(&self) -> Result<Vec<Cluster>, RegistryError> {
        let sql = format!("SELECT {COLUMNS} FROM buildClusters ORDER BY name, scm_context");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    /// Every record with this name (one per scmContext).
    pub async fn by_name(&self, name: &str) -> Result<Vec<Cluster>, RegistryError> {
        let sql =
            format!("SELECT {COLUMNS} FROM buildClusters WHERE name = $1 ORDER BY scm_context");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(name)
            .fetch_all(&self.db.pool)
            .await?;
        rows.iter().map(decode).collect()
    }

    pub async fn insert(&self, c: &NewCluster) -> Result<Cluster, RegistryError> {
        let now = now_ms();
        let turn = self.db.write_turn().await;
        let row = sqlx::query(
            "INSERT INTO buildClusters (name, scm_context, scm_organizations, is_active, auth_key, \
             sign_option, managed_by, managed_by_email, weightage, cluster_group, description, \
             created_at, updated_at, name_key) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13) \
             ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(&c.name)
        .bind(&c.scm_context)
        .bind(organizations_json(c))
        .bind(i64::from(c.is_active))
        .bind(&c.auth_key)
        .bind(c.sign_option.as_deref())
        .bind(c.managed_by.as_str())
        .bind(&c.managed_by_email)
        .bind(i64::from(c.weightage))
        .bind(&c.group)
        .bind(c.description.as_deref())
        .bind(now)
        .bind(cluster_name_key(&c.name))
        .fetch_optional(&self.db.pool)
        .await?;
        drop(turn);
        match row {
            Some(row) => Ok(Cluster {
                id: row.try_get(0)?,
                fields: c.clone(),
            }),
            None => Err(self.conflict(c, None).await),
        }
    }

    /// Which uniqueness rule `c` broke (the database's unique indexes decided; this finds the
    /// record in the way to say so), ignoring the record `except`.
    async fn conflict(&self, c: &NewCluster, except: Option<i64>) -> RegistryError {
        let others = match self.list().await {
            Ok(all) => all,
            Err(e) => return e,
        };
        let others = || others.iter().filter(|o| Some(o.id) != except);
        let key = cluster_name_key(&c.name);
        if let Some(o) = others().find(|o| cluster_name_key(&o.fields.name) == key) {
            return RegistryError::NameTaken {
                name: c.name.clone(),
                existing: o.fields.name.clone(),
                scm_context: o.fields.scm_context.clone(),
            };
        }
        match others().find(|o| o.fields.auth_key == c.auth_key) {
            Some(o) => RegistryError::AuthKeyTaken {
                auth_key: c.auth_key.clone(),
                cluster: o.fields.name.clone(),
            },
            // Gone again since: the write raced another; it was refused all the same.
            None => RegistryError::NameTaken {
                name: c.name.clone(),
                existing: c.name.clone(),
                scm_context: c.scm_context.clone(),
            },
        }
    }

    /// Replaces the record `id` with `c` (already validated as a whole).
    pub async fn update(&self, id: i64, c: &NewCluster) -> Result<Option<Cluster>, RegistryError> {
        let turn = self.db.write_turn().await;
        let result = sqlx::query(
            "UPDATE buildClusters SET scm_context = $1, scm_organizations = $2, is_active = $3, \
             auth_key = $4, sign_option = $5, managed_by = $6, managed_by_email = $7, \
             weightage = $8, cluster_group = $9, description = $10, updated_at = $11 WHERE id = $12",
        )
        .bind(&c.scm_context)
        .bind(organizations_json(c))
        .bind(i64::from(c.is_active))
        .bind(&c.auth_key)
        .bind(c.sign_option.as_deref())
        .bind(c.managed_by.as_str())
        .bind(&c.managed_by_email)
        .bind(i64::from(c.weightage))
        .bind(&c.group)
        .bind(c.description.as_deref())
        .bind(now_ms())
        .bind(id)
        .execute(&self.db.pool)
        .await;
        drop(turn);
        match result {
            Ok(done) if done.rows_affected() == 0 => Ok(None),
            Ok(_) => Ok(Some(Cluster {
                id,
                fields: c.clone(),
            })),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(self.conflict(c, Some(id)).await)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete(&self, id: i64) -> Result<bool, RegistryError> {
        let turn = self.db.write_turn().await;
        let done = sqlx::query("DELETE FROM buildClusters WHERE id = $1")
            .bind(id)
            .execute(&self.db.pool)
            .await?;
        drop(turn);
        Ok(done.rows_affected() > 0)
    }
}

fn organizations_json(c: &NewCluster) -> String {
    serde_json::Value::from(c.scm_organizations.clone()).to_string()
}

fn decode(row: &AnyRow) -> Result<Cluster, RegistryError> {
    let id: i64 = row.try_get("id")?;
    let corrupt = |reason: String| RegistryError::Corrupt { id, reason };
    let orgs: String = row.try_get("scm_organizations")?;
    let managed_by: String = row.try_get("managed_by")?;
    let weightage: i64 = row.try_get("weightage")?;
    let is_active: i64 = row.try_get("is_active")?;
    Ok(Cluster {
        id,
        fields: NewCluster {
            name: row.try_get("name")?,
            scm_context: row.try_get("scm_context")?,
            scm_organizations: serde_json::from_str(&orgs)
                .map_err(|e| corrupt(format!("scm_organizations: {e}")))?,
            is_active: is_active != 0,
            auth_key: row.try_get("auth_key")?,
            sign_option: row.try_get("sign_option")?,
            managed_by: ManagedBy::parse(&managed_by)
                .ok_or_else(|| corrupt(format!("managed_by: {managed_by:?}")))?,
            managed_by_email: row.try_get("managed_by_email")?,
            weightage: u8::try_from(weightage)
                .map_err(|_| corrupt(format!("weightage: {weightage}")))?,
            group: row.try_get("cluster_group")?,
            description: row.try_get("description")?,
        },
    })
}

// === impl ClusterCache ===

/// The registry as routing sees it: an immutable snapshot swapped whole on reload, so a
/// routing decision never sees half an update.
#[derive(Clone, Default)]
pub struct ClusterCache {
    snapshot: Arc<RwLock<Arc<Vec<Cluster>>>>,
}

impl ClusterCache {
    pub fn snapshot(&self) -> Arc<Vec<Cluster>> {
        match self.snapshot.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn replace(&self, clusters: Vec<Cluster>) {
        let next = Arc::new(clusters);
        match self.snapshot.write() {
            Ok(mut guard) => *guard = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        metrics::gauge!("sd_scheduler_clusters_cached").set(self.snapshot().len() as f64);
    }

    /// Reloads from the database.
    pub async fn reload(&self, registry: &Registry) -> Result<(), RegistryError> {
        self.replace(registry.list().await?);
        Ok(())
    }
}
