//! What `/readyz` reports: the last outcome of each dependency, updated by the loops as they
//! run (no extra probing of the scheduler).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Default)]
pub struct Status {
    scheduler: Mutex<Option<String>>,
    redis: Mutex<Option<String>>,
    polled_once: AtomicBool,
    at_capacity: AtomicBool,
}

impl Status {
    pub fn scheduler_ok(&self) {
        self.polled_once.store(true, Ordering::Relaxed);
        *lock(&self.scheduler) = None;
        *lock(&self.redis) = None;
    }

    pub fn scheduler_failed(&self, why: &str) {
        *lock(&self.scheduler) = Some(why.to_owned());
    }

    pub fn redis_failed(&self, why: &str) {
        *lock(&self.redis) = Some(why.to_owned());
    }

    pub fn set_at_capacity(&self, full: bool) {
        self.at_capacity.store(full, Ordering::Relaxed);
    }

    /// `None` when ready, else why not.
    pub fn not_ready(&self) -> Option<String> {
        if let Some(why) = lock(&self.scheduler).clone() {
            return Some(format!("scheduler: {why}"));
        }
        if let Some(why) = lock(&self.redis).clone() {
            return Some(format!("local Redis: {why}"));
        }
        if !self.polled_once.load(Ordering::Relaxed) && !self.at_capacity.load(Ordering::Relaxed) {
            return Some("scheduler: no successful poll yet".into());
        }
        None
    }

    pub fn at_capacity(&self) -> bool {
        self.at_capacity.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
