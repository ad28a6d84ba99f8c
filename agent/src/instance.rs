//! `executor.instance_file`: how a restarted agent knows, without waiting, that its previous
//! run on this host is dead, and which instance that run was.
//!
//! The agent holds an exclusive `flock` on the file for as long as it runs. The kernel drops a
//! flock when its process dies, however it dies, so an agent that gets the lock has proof that
//! the previous holder is gone: its local jobs can be taken back at once instead of after
//! `executor.takeover_after`. The file holds the instance name of the run that holds (or last
//! held) the lock. A lock held by a live process means a second agent was pointed at the same
//! file: it refuses to start.
//!
//! The name is written in place (truncate, write, fsync), never through a temporary file and a
//! rename: a rename would put a new inode under the path while the lock stays on the old one,
//! and the next agent would lock a file nobody holds.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The longest instance name read back (ours, `agent-<pid>-<16 hex digits>`, are under 40).
pub const MAX_NAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("cannot open the instance file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the instance file {path} is locked by another running sd-agent: two agents must not share one (give each its own executor.instance_file)"
    )]
    Held { path: PathBuf },
    #[error("cannot lock the instance file {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the instance file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the instance file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The exclusive lock on the instance file, held while this value lives. Dropping it (or the
/// process dying) lets the next agent start and take this run's local jobs back.
#[derive(Debug)]
pub struct InstanceLock {
    file: File,
    path: PathBuf,
    previous: Option<String>,
}

impl InstanceLock {
    /// Opens (or creates) `path`, locks it without waiting and reads the name of the run that
    /// held it before. Fails with [`InstanceError::Held`] while another process holds it.
    pub fn acquire(path: &Path) -> Result<Self, InstanceError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| InstanceError::Open {
                path: path.to_owned(),
                source,
            })?;
        if !try_lock(&file, path)? {
            return Err(InstanceError::Held {
                path: path.to_owned(),
            });
        }
        let previous = read_name(&mut file, path)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            previous,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The instance name of the run that held the lock before this one, if it left a valid one.
    pub fn previous(&self) -> Option<&str> {
        self.previous.as_deref()
    }

    /// Names `instance` (this run) in the file, on disk before it returns: the next run takes
    /// back what this one holds.
    pub fn record(&mut self, instance: &str) -> Result<(), InstanceError> {
        let write = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(format!("{instance}\n").as_bytes())?;
            file.sync_all()
        };
        write(&mut self.file).map_err(|source| InstanceError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// What [`probe`] found at an instance file, for `sd-agent check`.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    /// The file does not exist yet; its directory takes new files.
    Absent,
    /// The file opens for writing and no agent holds it; the name it holds, if any.
    Free(Option<String>),
    /// A running agent holds it; the name it holds.
    Held(Option<String>),
}

/// Looks at `path` as the agent would, without keeping the lock and without creating the file
/// (one created by `check` run as root would be unusable for the agent's own user).
pub fn probe(path: &Path) -> Result<Probe, InstanceError> {
    let open = OpenOptions::new().read(true).write(true).open(path);
    let mut file = match open {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            writable_dir(path)?;
            return Ok(Probe::Absent);
        }
        Err(source) => {
            return Err(InstanceError::Open {
                path: path.to_owned(),
                source,
            });
        }
    };
    let name = read_name(&mut file, path)?;
    // A lock taken here is released when `file` is dropped, at once.
    Ok(if try_lock(&file, path)? {
        Probe::Free(name)
    } else {
        Probe::Held(name)
    })
}

/// Takes the exclusive lock without waiting: false when another process holds it.
fn try_lock(file: &File, path: &Path) -> Result<bool, InstanceError> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(source)) => Err(InstanceError::Lock {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The directory of `path` takes a new file: one is created there and removed.
fn writable_dir(path: &Path) -> Result<(), InstanceError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let trial = dir.join(format!(".sd-agent-check-{}", std::process::id()));
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&trial)
        .map_err(|source| InstanceError::Open {
            path: path.to_owned(),
            source,
        })?;
    let _ = std::fs::remove_file(&trial);
    Ok(())
}

/// The name in the file, if it is one of ours: a file holding anything else (cut short, or
/// not written by an agent) names no previous run, and its jobs wait out the lapse instead.
fn read_name(file: &mut File, path: &Path) -> Result<Option<String>, InstanceError> {
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.take(MAX_NAME as u64 + 2).read_to_end(&mut bytes))
        .map_err(|source| InstanceError::Read {
            path: path.to_owned(),
            source,
        })?;
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Ok(None);
    };
    let name = text.trim_end_matches('\n');
    if is_instance_name(name) {
        Ok(Some(name.to_owned()))
    } else {
        if !name.is_empty() {
            tracing::warn!(
                file = %path.display(),
                "the instance file does not hold an instance name; the previous run's local jobs wait out executor.takeover_after"
            );
        }
        Ok(None)
    }
}

/// An instance name as the agent makes them: 1 to [`MAX_NAME`] ASCII letters, digits and '-'.
pub fn is_instance_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_exclusive_until_dropped_and_passes_the_name_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instance");
        let mut first = InstanceLock::acquire(&path).unwrap();
        assert_eq!(first.previous(), None, "a new file names no previous run");
        first.record("agent-1-00000000000000aa").unwrap();
        // A longer name first, then a shorter one: the file holds only the last.
        first.record("agent-12345-0000000000000abc").unwrap();
        first.record("agent-7-00000000000000ab").unwrap();

        let err = InstanceLock::acquire(&path).unwrap_err();
        assert!(matches!(err, InstanceError::Held { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(
            probe(&path).unwrap(),
            Probe::Held(Some("agent-7-00000000000000ab".into()))
        );

        drop(first);
        assert_eq!(
            probe(&path).unwrap(),
            Probe::Free(Some("agent-7-00000000000000ab".into()))
        );
        let second = InstanceLock::acquire(&path).unwrap();
        assert_eq!(second.previous(), Some("agent-7-00000000000000ab"));
    }

    #[test]
    fn anything_but_an_instance_name_names_no_previous_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instance");
        for junk in [
            "".as_bytes(),
            b"agent 1\n",
            b"agent-1\xff\n",
            b"*\n",
            "a".repeat(MAX_NAME + 1).as_bytes(),
        ] {
            std::fs::write(&path, junk).unwrap();
            let lock = InstanceLock::acquire(&path).unwrap();
            assert_eq!(lock.previous(), None, "{junk:?}");
        }
        std::fs::write(&path, "a".repeat(MAX_NAME)).unwrap();
        assert_eq!(
            InstanceLock::acquire(&path)
                .unwrap()
                .previous()
                .map(str::len),
            Some(MAX_NAME)
        );
    }

    #[test]
    fn a_probe_creates_nothing_and_names_what_it_cannot_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instance");
        assert_eq!(probe(&path).unwrap(), Probe::Absent);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let missing = dir.path().join("nowhere").join("instance");
        let err = probe(&missing).unwrap_err();
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
    }
}
