//! Screwdriver's build annotations, read the way Screwdriver's executors read them: by the
//! name after `screwdriver.cd/`, also under `beta.screwdriver.cd/` (the executors strip a
//! leading `beta.`). Both binaries read annotations only through here.

use serde_json::Value;

use crate::StartMessage;

const PREFIX: &str = "screwdriver.cd/";
const BETA_PREFIX: &str = "beta.screwdriver.cd/";

/// `screwdriver.cd/<name>` names this crate's callers read.
pub const CPU: &str = "cpu";
pub const RAM: &str = "ram";
pub const DISK: &str = "disk";
pub const DISK_SPEED: &str = "diskSpeed";
pub const TIMEOUT: &str = "timeout";
pub const TERMINATION_GRACE_PERIOD: &str = "terminationGracePeriodSeconds";
pub const DOCKER_ENABLED: &str = "dockerEnabled";
pub const DOCKER_CPU: &str = "dockerCpu";
pub const DOCKER_RAM: &str = "dockerRam";
pub const ROOTLESS_BUILDKIT_ENABLED: &str = "rootlessBuildkitEnabled";

/// The full key a message should name for `name`, e.g. `screwdriver.cd/cpu`.
pub fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

impl StartMessage {
    /// The job's annotation `screwdriver.cd/<name>`, else `beta.screwdriver.cd/<name>`. An
    /// explicit JSON `null` counts as absent.
    pub fn annotation(&self, name: &str) -> Option<&Value> {
        [PREFIX, BETA_PREFIX]
            .iter()
            .find_map(|prefix| self.annotations.get(&format!("{prefix}{name}")))
            .filter(|v| !v.is_null())
    }

    /// The annotation as a positive number (a JSON number or a numeric string); `None` when
    /// absent, not a number, or not positive.
    pub fn annotation_number(&self, name: &str) -> Option<f64> {
        let n = match self.annotation(name)? {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        }?;
        (n.is_finite() && n > 0.0).then_some(n)
    }

    /// The annotation as a flag: `true`, or the string `"true"` in any case.
    pub fn annotation_flag(&self, name: &str) -> bool {
        match self.annotation(name) {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s.trim().eq_ignore_ascii_case("true"),
            _ => false,
        }
    }

    /// `screwdriver.cd/timeout` in minutes, when set to a positive number.
    pub fn timeout_minutes(&self) -> Option<f64> {
        self.annotation_number(TIMEOUT)
    }

    /// `screwdriver.cd/terminationGracePeriodSeconds`, whole seconds, when set.
    pub fn termination_grace_seconds(&self) -> Option<u64> {
        self.annotation_number(TERMINATION_GRACE_PERIOD)
            .map(|s| s.ceil().min(u64::MAX as f64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn message(annotations: Value) -> StartMessage {
        let Value::Object(m) = json!({
            "buildId": 1, "jobId": 2, "pipeline": {"id": 3, "name": "o/r", "scmContext": "github:github.com"},
            "apiUri": "https://api", "container": "node:22", "annotations": annotations,
        }) else {
            unreachable!()
        };
        StartMessage::from_json(m).unwrap()
    }

    #[test]
    fn beta_keys_are_read_and_the_plain_key_wins() {
        let m = message(json!({"beta.screwdriver.cd/ram": "HIGH", "screwdriver.cd/cpu": "TURBO"}));
        assert_eq!(m.annotation(RAM), Some(&json!("HIGH")));
        assert_eq!(m.annotation(CPU), Some(&json!("TURBO")));
        let both = message(json!({"beta.screwdriver.cd/cpu": "LOW", "screwdriver.cd/cpu": "HIGH"}));
        assert_eq!(both.annotation(CPU), Some(&json!("HIGH")));
        assert_eq!(
            message(json!({"screwdriver.cd/cpu": null})).annotation(CPU),
            None
        );
        assert_eq!(message(json!({"cpu": "HIGH"})).annotation(CPU), None);
    }

    #[test]
    fn numbers_flags_and_timeouts() {
        let m = message(json!({
            "screwdriver.cd/timeout": "60", "beta.screwdriver.cd/terminationGracePeriodSeconds": 89.5,
            "screwdriver.cd/dockerEnabled": "True", "screwdriver.cd/diskSpeed": "fast",
        }));
        assert_eq!(m.timeout_minutes(), Some(60.0));
        assert_eq!(m.termination_grace_seconds(), Some(90));
        assert!(m.annotation_flag(DOCKER_ENABLED));
        assert!(!m.annotation_flag(ROOTLESS_BUILDKIT_ENABLED));
        assert_eq!(m.annotation_number(DISK_SPEED), None);
        for bad in [json!(0), json!(-5), json!("soon"), json!(true)] {
            assert_eq!(
                message(json!({"screwdriver.cd/timeout": bad})).timeout_minutes(),
                None
            );
        }
        assert_eq!(key(CPU), "screwdriver.cd/cpu");
    }
}
