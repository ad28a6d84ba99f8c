//! Whose account a build runs as. A build runs code written by any pipeline author, so never
//! as the agent's own user (which holds the cluster's key, its config and the local Redis
//! password) unless the config says so explicitly; with a uid range, each running build has a
//! uid of its own, so builds cannot read each other's environment (their tokens) or files.

use std::collections::HashSet;

use crate::config::{ProcessConfig, UidRange};

use super::sys;

/// The account builds run as, resolved from `[executor.process]` at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RunAs {
    /// The agent's own user (`allow_agent_user`): no switch.
    Agent,
    /// Every build as `uid`:`gid`.
    One { uid: u32, gid: u32 },
    /// Each running build with its own uid of `range`, group `gid`.
    Range { range: UidRange, gid: u32 },
}

/// Why builds cannot run as configured; says which setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("executor.process.user {0:?}: no such user on this host")]
    NoUser(String),
    #[error("executor.process.group {0:?}: no such group on this host")]
    NoGroup(String),
    #[error("cannot look up {what} {name:?}: {source}")]
    Lookup {
        what: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "executor.process.{key} runs builds as uid {uid}, the agent's own user: builds could read its key and config and signal it. Pick another account, or set allow_agent_user = true on a host that runs only trusted builds"
    )]
    AgentsOwn { key: &'static str, uid: u32 },
    #[error("executor.process.{key} runs builds as root (uid 0): pick an unprivileged account")]
    Root { key: &'static str },
    #[error(
        "the agent cannot run builds as another user: it lacks {missing} (run it as root, or grant them, e.g. AmbientCapabilities= in its systemd unit)"
    )]
    Privileges { missing: String },
}

impl RunAs {
    /// The account `config` names, checked: it exists, it is not root nor the agent's own
    /// (unless allowed), and the agent may switch to it.
    pub(super) fn resolve(config: &ProcessConfig) -> Result<Self, AccountError> {
        let me = sys::euid();
        let user = config.user.as_deref().map(user_ids).transpose()?;
        let gid = match config.group.as_deref() {
            Some(group) => Some(group_id(group)?),
            None => user.map(|(_, gid)| gid),
        };
        let run_as = match (config.uid_range, user, gid) {
            (Some(range), _, Some(gid)) => {
                if range.contains(me) && !config.allow_agent_user {
                    return Err(AccountError::AgentsOwn {
                        key: "uid_range",
                        uid: me,
                    });
                }
                RunAs::Range { range, gid }
            }
            (None, Some((uid, _)), Some(gid)) => {
                if uid == me {
                    if !config.allow_agent_user {
                        return Err(AccountError::AgentsOwn { key: "user", uid });
                    }
                    return Ok(RunAs::Agent);
                }
                if uid == 0 {
                    return Err(AccountError::Root { key: "user" });
                }
                RunAs::One { uid, gid }
            }
            // The config check lets nothing else through but `allow_agent_user`.
            _ => return Ok(RunAs::Agent),
        };
        let missing = sys::missing_switch_capabilities();
        if !missing.is_empty() {
            return Err(AccountError::Privileges {
                missing: missing.join(", "),
            });
        }
        Ok(run_as)
    }

    /// The group of builds when they do not run as the agent.
    pub(super) fn gid(&self) -> Option<u32> {
        match self {
            RunAs::Agent => None,
            RunAs::One { gid, .. } | RunAs::Range { gid, .. } => Some(*gid),
        }
    }

    /// Whether `uid` is a build's own (a uid of the range): everything running as it belongs
    /// to that one build.
    pub(super) fn owns_alone(&self, uid: u32) -> bool {
        matches!(self, RunAs::Range { range, .. } if range.contains(uid))
    }

    /// For `sd-agent check` and the start-up log.
    pub(super) fn describe(&self) -> String {
        match self {
            RunAs::Agent => "builds run as the agent's own user (allow_agent_user)".into(),
            RunAs::One { uid, gid } => format!(
                "builds run as uid {uid}, gid {gid}; they share it, so builds running at once can read each other's environment (set uid_range to keep them apart)"
            ),
            RunAs::Range { range, gid } => format!(
                "builds run each as its own uid from {}-{}, gid {gid}",
                range.first, range.last
            ),
        }
    }
}

/// The first uid of `range` in no one's use, if any.
pub(super) fn free_uid(range: UidRange, busy: &HashSet<u32>) -> Option<u32> {
    (range.first..=range.last).find(|uid| !busy.contains(uid))
}

/// A user name, or a numeric uid (whose gid is then the same number unless `group` says).
fn user_ids(name: &str) -> Result<(u32, u32), AccountError> {
    if let Ok(uid) = name.parse::<u32>() {
        return Ok((uid, uid));
    }
    sys::user_by_name(name)
        .map_err(|source| AccountError::Lookup {
            what: "user",
            name: name.to_owned(),
            source,
        })?
        .ok_or_else(|| AccountError::NoUser(name.to_owned()))
}

fn group_id(name: &str) -> Result<u32, AccountError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    sys::group_by_name(name)
        .map_err(|source| AccountError::Lookup {
            what: "group",
            name: name.to_owned(),
            source,
        })?
        .ok_or_else(|| AccountError::NoGroup(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_uid_nobody_uses_is_picked_and_none_when_all_are_taken() {
        let range = UidRange {
            first: 5000,
            last: 5002,
        };
        assert_eq!(free_uid(range, &HashSet::new()), Some(5000));
        assert_eq!(free_uid(range, &HashSet::from([5000, 5002])), Some(5001));
        assert_eq!(free_uid(range, &HashSet::from([5000, 5001, 5002])), None);
    }

    #[test]
    fn only_a_uid_of_the_range_belongs_to_one_build() {
        let range = RunAs::Range {
            range: UidRange {
                first: 5000,
                last: 5009,
            },
            gid: 5000,
        };
        assert!(range.owns_alone(5003));
        assert!(!range.owns_alone(4999));
        assert!(!RunAs::One { uid: 5003, gid: 1 }.owns_alone(5003));
    }
}
