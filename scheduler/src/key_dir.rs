//! Cluster keys and sign options read from files (`registry.key_dir`), one file per variable
//! name, the way a Kubernetes Secret volume mounts its keys: a new cluster's key, or a rotated
//! one, is a new file, picked up without restarting any replica.
//!
//! A record's `authKey`/`signOption` still name variables: the process environment answers
//! first (as before), then this directory. Files are read when first asked for (so a key added
//! just before registering is found at once) and all re-read every `registry.reload_interval`
//! (so a changed or removed file is seen by every replica within that time).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cluster_auth::EnvLookup;

/// The largest key file read: a few PEM public keys are a few KiB.
const MAX_FILE: u64 = 64 * 1024;

/// The files of one directory, by name.
pub struct KeyDir {
    dir: PathBuf,
    files: RwLock<HashMap<String, String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("registry.key_dir {}: {source}", dir.display())]
pub struct KeyDirError {
    dir: PathBuf,
    source: std::io::Error,
}

impl KeyDir {
    /// Reads `dir` once; fails when it cannot be listed.
    pub fn open(dir: &Path) -> Result<Arc<Self>, KeyDirError> {
        let keys = Arc::new(Self {
            dir: dir.to_owned(),
            files: RwLock::new(HashMap::new()),
        });
        keys.reload().map_err(|source| KeyDirError {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(keys)
    }

    /// The value of the variable `name`: its file's text, read now when not yet known.
    pub fn get(&self, name: &str) -> Option<String> {
        if let Some(text) = self.read_lock().get(name) {
            return Some(text.clone());
        }
        let text = read_key_file(&self.dir, name)?;
        self.write_lock().insert(name.to_owned(), text.clone());
        Some(text)
    }

    /// Re-reads every file; logs which names came, changed and went (never their contents).
    pub fn reload(&self) -> std::io::Result<()> {
        let mut next = HashMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(text) = read_key_file(&self.dir, name) {
                next.insert(name.to_owned(), text);
            }
        }
        let mut files = self.write_lock();
        for (name, text) in &next {
            match files.get(name) {
                None => tracing::info!(variable = %name, "registry.key_dir: new key file"),
                Some(old) if old != text => {
                    tracing::info!(variable = %name, "registry.key_dir: key file changed");
                }
                Some(_) => {}
            }
        }
        for name in files.keys().filter(|n| !next.contains_key(*n)) {
            tracing::info!(variable = %name, "registry.key_dir: key file removed");
        }
        *files = next;
        Ok(())
    }

    /// `env`, then this directory.
    pub fn behind(self: &Arc<Self>, env: EnvLookup) -> EnvLookup {
        let keys = Arc::clone(self);
        Arc::new(move |name| env(name).or_else(|| keys.get(name)))
    }

    /// Re-reads the directory every `interval` until `shutdown`.
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let keys = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || keys.reload()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot re-read registry.key_dir; keeping the keys read before")
                }
                Err(e) => tracing::warn!(error = %e, "re-reading registry.key_dir failed"),
            }
        }
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, String>> {
        self.files.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, String>> {
        self.files.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The text of `dir/name` when `name` could be a variable's name (so no path, no `..data`, no
/// hidden file) and it is a regular file (a Secret volume's symlinks followed) of at most
/// [`MAX_FILE`] bytes of UTF-8.
fn read_key_file(dir: &Path, name: &str) -> Option<String> {
    let mut chars = name.chars();
    let variable = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !variable {
        return None;
    }
    let path = dir.join(name);
    let meta = std::fs::metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > MAX_FILE {
        if meta.len() > MAX_FILE {
            tracing::warn!(variable = %name, bytes = meta.len(), "registry.key_dir: key file over 64 KiB ignored");
        }
        return None;
    }
    std::fs::read_to_string(&path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_variable_named_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("SD_CLUSTER_A"), "key a").unwrap();
        std::fs::write(p.join(".hidden"), "x").unwrap();
        std::fs::write(p.join("not-a-variable"), "x").unwrap();
        std::fs::write(p.join("SD_BIG"), vec![b'k'; MAX_FILE as usize + 1]).unwrap();
        std::fs::create_dir(p.join("SD_DIR")).unwrap();
        // A Secret volume: NAME -> ..data/NAME, ..data -> ..2026_…
        std::fs::create_dir(p.join("..2026_12_03")).unwrap();
        std::fs::write(p.join("..2026_12_03/SD_CLUSTER_B"), "key b").unwrap();
        std::os::unix::fs::symlink("..2026_12_03", p.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/SD_CLUSTER_B", p.join("SD_CLUSTER_B")).unwrap();
        let keys = KeyDir::open(p).unwrap();
        let mut names: Vec<_> = keys.read_lock().keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["SD_CLUSTER_A", "SD_CLUSTER_B"]);
        assert_eq!(keys.get("SD_CLUSTER_B").as_deref(), Some("key b"));
        assert_eq!(keys.get("../etc/passwd"), None);
        assert_eq!(keys.get("SD_BIG"), None);
    }

    #[test]
    fn a_new_file_is_found_at_once_and_a_change_on_reload() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDir::open(dir.path()).unwrap();
        let env = keys.behind(Arc::new(|name| {
            (name == "SD_ENV").then(|| "from env".to_owned())
        }));
        assert_eq!(env("SD_NEW"), None);
        std::fs::write(dir.path().join("SD_NEW"), "one").unwrap();
        assert_eq!(env("SD_NEW").as_deref(), Some("one"));
        std::fs::write(dir.path().join("SD_NEW"), "two").unwrap();
        assert_eq!(
            env("SD_NEW").as_deref(),
            Some("one"),
            "read again only on reload"
        );
        keys.reload().unwrap();
        assert_eq!(env("SD_NEW").as_deref(), Some("two"));
        std::fs::remove_file(dir.path().join("SD_NEW")).unwrap();
        keys.reload().unwrap();
        assert_eq!(env("SD_NEW"), None);
        // The environment answers first.
        std::fs::write(dir.path().join("SD_ENV"), "from file").unwrap();
        assert_eq!(env("SD_ENV").as_deref(), Some("from env"));
    }
}
