//! Running as a systemd `Type=notify` unit: state changes and watchdog pings. Every call is a
//! no-op when the agent was not started by systemd (`NOTIFY_SOCKET` unset), and failures are
//! ignored: they only matter to systemd, and the agent works the same without it.

use sd_notify::NotifyState;

/// Reports a state change `app::run` announces: `READY`, `RELOADING` (a SIGHUP reload), and
/// anything else as stopping.
pub fn notify(state: &str) {
    let state = match state {
        "READY" => NotifyState::Ready,
        "RELOADING" => NotifyState::Reloading,
        _ => NotifyState::Stopping,
    };
    let _ = sd_notify::notify(&[state]);
}

/// When the unit sets `WatchdogSec`, pings twice per period from a task on this runtime: a
/// wedged runtime stops the pings and systemd restarts the agent.
pub fn start_watchdog() {
    if let Some(every) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    }
}
