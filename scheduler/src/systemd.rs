//! Running as a systemd `Type=notify` unit: readiness, stopping, and watchdog pings. Every call
//! is a no-op when the process was not started by systemd (`NOTIFY_SOCKET` unset).

use sd_notify::NotifyState;

/// Tells systemd about our state; a failure only matters to systemd, so it is logged at debug.
fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Reports ready and, when the unit sets `WatchdogSec`, pings twice per period from a task on
/// this runtime: a wedged runtime stops the pings and systemd restarts us.
pub fn ready() {
    notify(&[NotifyState::Ready]);
    if let Some(every) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tick.tick().await;
                notify(&[NotifyState::Watchdog]);
            }
        });
    }
}

/// Reports that a graceful shutdown began (`systemctl status` shows it while requests drain).
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}
