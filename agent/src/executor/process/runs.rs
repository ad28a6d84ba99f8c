//! The runs this executor follows, by buildId, and the one way a run gets there
//! ([`Inner::register`]): for a build launched here and for one adopted from an agent that is
//! gone alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use super::{Inner, lock};
use crate::executor::ExecError;

/// Builds launched or adopted here and not yet ended.
#[derive(Default)]
pub(super) struct Runs(Mutex<HashMap<u64, Run>>);

struct Run {
    /// Cancelled to stop the build.
    cancel: CancellationToken,
    /// The task following it, once there is one.
    task: Option<AbortHandle>,
}

impl Runs {
    /// Reserves `id` for a run about to start: its stop token, or `None` when the build already
    /// has a run here.
    fn reserve(&self, id: u64) -> Option<CancellationToken> {
        let mut runs = lock(&self.0);
        if runs.contains_key(&id) {
            return None;
        }
        let cancel = CancellationToken::new();
        runs.insert(
            id,
            Run {
                cancel: cancel.clone(),
                task: None,
            },
        );
        Some(cancel)
    }

    /// Records the task following run `id`, unless it has already ended.
    fn attach(&self, id: u64, task: AbortHandle) {
        if let Some(run) = lock(&self.0).get_mut(&id) {
            run.task = Some(task);
        }
    }

    /// The run ended (or never started).
    pub(super) fn forget(&self, id: u64) {
        lock(&self.0).remove(&id);
    }

    pub(super) fn contains(&self, id: u64) -> bool {
        lock(&self.0).contains_key(&id)
    }

    /// Asks run `id` to stop; `false` when it is not one of ours.
    pub(super) fn cancel(&self, id: u64) -> bool {
        match lock(&self.0).get(&id) {
            Some(run) => {
                run.cancel.cancel();
                true
            }
            None => false,
        }
    }

    pub(super) fn len(&self) -> usize {
        lock(&self.0).len()
    }

    /// Forgets every run and aborts the tasks following them: the builds keep running, as
    /// after a crash.
    pub(super) fn abandon_all(&self) {
        let runs = std::mem::take(&mut *lock(&self.0));
        for run in runs.values() {
            if let Some(task) = &run.task {
                task.abort();
            }
        }
    }
}

impl Inner {
    /// The one way a run is registered. Reserves `id` (nothing happens when the build already
    /// has a run here), lets `prepare` make the run real with the run's stop token (spawn it,
    /// or claim an orphan's marker), then follows it in a task with `follow`. Returns whether a
    /// run was started; when `prepare` declines (`Ok(None)`) or fails, the reservation goes.
    pub(super) async fn register<T, P, PF, F, FF>(
        self: &Arc<Self>,
        id: u64,
        prepare: P,
        follow: F,
    ) -> Result<bool, ExecError>
    where
        P: FnOnce(CancellationToken) -> PF,
        PF: Future<Output = Result<Option<T>, ExecError>>,
        F: FnOnce(Arc<Self>, T, CancellationToken) -> FF,
        FF: Future<Output = ()> + Send + 'static,
    {
        let Some(cancel) = self.runs.reserve(id) else {
            return Ok(false);
        };
        let prepared = match prepare(cancel.clone()).await {
            Ok(Some(prepared)) => prepared,
            other => {
                self.runs.forget(id);
                return other.map(|_| false);
            }
        };
        let task = tokio::spawn(follow(Arc::clone(self), prepared, cancel));
        self.runs.attach(id, task.abort_handle());
        Ok(true)
    }
}
