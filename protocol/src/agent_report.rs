//! What an agent says about itself on every poll, in request headers so an older scheduler
//! ignores them and an older agent (which sends none) still polls: which instance it is, its
//! version and executor, and how full it is. The scheduler keeps the last report per instance
//! for the operator's view (`GET /v4/buildclusters/{name}/status`).
//!
//! Every value is checked here, on both sides: the sender only builds reports that pass, the
//! receiver refuses one that does not, naming the header. Values end up in Redis and on a
//! status page, so each is short and of a plain character set.

use serde::{Deserialize, Serialize};

use crate::error::FieldError;

/// The request headers of a report (lower case, as HTTP/2 sends them).
pub mod header {
    pub const INSTANCE: &str = "sd-agent-instance";
    pub const HOST: &str = "sd-agent-host";
    pub const VERSION: &str = "sd-agent-version";
    pub const EXECUTOR: &str = "sd-agent-executor";
    pub const IN_FLIGHT: &str = "sd-agent-in-flight";
    pub const CAPACITY: &str = "sd-agent-capacity";
}

/// Longest instance id or host name.
pub const MAX_NAME: usize = 128;
/// Longest version.
pub const MAX_VERSION: usize = 64;
/// Largest in-flight count or capacity.
pub const MAX_COUNT: u32 = 1_000_000;

/// One agent's report of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentReport {
    /// This run of the agent: unique per process, new after a restart.
    pub instance: String,
    /// The machine or pod it runs on, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub version: String,
    /// `kubernetes` or `process`.
    pub executor: String,
    /// Builds it holds now: launched and not yet ended, or taken and waiting to launch.
    pub in_flight: u32,
    /// Most builds it holds at once (`executor.max_in_flight`).
    pub capacity: u32,
}

impl AgentReport {
    /// The headers that carry this report.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (header::INSTANCE, self.instance.clone()),
            (header::VERSION, self.version.clone()),
            (header::EXECUTOR, self.executor.clone()),
            (header::IN_FLIGHT, self.in_flight.to_string()),
            (header::CAPACITY, self.capacity.to_string()),
        ];
        if let Some(host) = &self.host {
            headers.push((header::HOST, host.clone()));
        }
        headers
    }

    /// The report in a request's headers (`get` answers a header's value by name): `None`
    /// when there is none (an agent older than reports); refused, naming the header, when
    /// one is missing or unusable.
    pub fn from_headers<'a>(
        get: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Option<Self>, FieldError> {
        let Some(instance) = get(header::INSTANCE) else {
            return Ok(None);
        };
        let required = |name: &'static str| {
            get(name)
                .ok_or_else(|| FieldError::new(name, format!("required with {}", header::INSTANCE)))
        };
        let report = Self {
            instance: instance.to_owned(),
            host: get(header::HOST).map(str::to_owned),
            version: required(header::VERSION)?.to_owned(),
            executor: required(header::EXECUTOR)?.to_owned(),
            in_flight: count(header::IN_FLIGHT, required(header::IN_FLIGHT)?)?,
            capacity: count(header::CAPACITY, required(header::CAPACITY)?)?,
        };
        report.check()?;
        Ok(Some(report))
    }

    /// Refuses a report a scheduler would not keep, naming the header at fault.
    pub fn check(&self) -> Result<(), FieldError> {
        name(header::INSTANCE, &self.instance)?;
        if let Some(host) = &self.host {
            name(header::HOST, host)?;
        }
        if !(1..=MAX_VERSION).contains(&self.version.len())
            || !self
                .version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".+-_".contains(&b))
        {
            return Err(FieldError::new(
                header::VERSION,
                format!("must be 1 to {MAX_VERSION} letters, digits, '.', '+', '-' or '_'"),
            ));
        }
        if !["kubernetes", "process"].contains(&self.executor.as_str()) {
            return Err(FieldError::new(
                header::EXECUTOR,
                "must be kubernetes or process",
            ));
        }
        for (field, n) in [
            (header::IN_FLIGHT, self.in_flight),
            (header::CAPACITY, self.capacity),
        ] {
            if n > MAX_COUNT {
                return Err(FieldError::new(
                    field,
                    format!("must be at most {MAX_COUNT}"),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `value` may be a report's instance or host: 1 to [`MAX_NAME`] letters, digits,
/// '.', '-', '_' or ':'.
pub fn is_name(value: &str) -> bool {
    (1..=MAX_NAME).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b))
}

fn name(field: &'static str, value: &str) -> Result<(), FieldError> {
    if is_name(value) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("must be 1 to {MAX_NAME} letters, digits, '.', '-', '_' or ':'"),
        ))
    }
}

fn count(field: &'static str, text: &str) -> Result<u32, FieldError> {
    text.parse::<u32>()
        .ok()
        .filter(|n| *n <= MAX_COUNT)
        .ok_or_else(|| FieldError::new(field, format!("must be an integer from 0 to {MAX_COUNT}")))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn report() -> AgentReport {
        AgentReport {
            instance: "agent-12-00ff".into(),
            host: Some("sd-agent-7c9f".into()),
            version: "0.4.0".into(),
            executor: "kubernetes".into(),
            in_flight: 3,
            capacity: 10,
        }
    }

    fn parse(headers: &HashMap<&'static str, String>) -> Result<Option<AgentReport>, FieldError> {
        AgentReport::from_headers(|name| headers.get(name).map(String::as_str))
    }

    #[test]
    fn a_report_round_trips_through_its_headers() {
        let headers: HashMap<_, _> = report().headers().into_iter().collect();
        assert_eq!(parse(&headers).unwrap(), Some(report()));
    }

    #[test]
    fn no_report_is_an_older_agent_not_an_error() {
        assert_eq!(parse(&HashMap::new()).unwrap(), None);
    }

    #[test]
    fn each_bad_header_is_named() {
        let cases: [(&str, &str); 7] = [
            (header::INSTANCE, ""),
            (header::INSTANCE, "a b"),
            (header::HOST, "<script>"),
            (header::VERSION, "1.0\n"),
            (header::EXECUTOR, "docker"),
            (header::IN_FLIGHT, "-1"),
            (header::CAPACITY, "99999999999"),
        ];
        for (name, value) in cases {
            let mut headers: HashMap<_, _> = report().headers().into_iter().collect();
            headers.insert(name, value.to_owned());
            let e = parse(&headers).unwrap_err();
            assert_eq!(e.field, name, "{value:?}: {}", e.reason);
        }
        let mut headers: HashMap<_, _> = report().headers().into_iter().collect();
        headers.remove(header::VERSION);
        assert_eq!(parse(&headers).unwrap_err().field, header::VERSION);
    }
}
