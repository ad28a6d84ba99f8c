//! Environment overrides for TOML config files: `PREFIX_<SECTION>_<KEY>=value`.
//!
//! Shared by both binaries so `SD_SCHEDULER_REDIS_URL` and `SD_AGENT_REDIS_URL` behave alike.
//! Pure: the caller passes the variables, so tests need no process environment.

use toml::{Table, Value};

use crate::error::FieldError;

/// Applies every `prefix`-ed variable to `doc`.
///
/// `sections` lists the config's tables (dotted for nested ones, e.g. `executor.kubernetes`);
/// the longest section whose name matches the start of the variable wins, the rest is the key
/// (`SD_AGENT_EXECUTOR_KUBERNETES_NAMESPACE` → `executor.kubernetes.namespace`). A value that
/// parses as a TOML number, boolean, array or inline table takes that type; anything else is a
/// string (quote it, `'"true"'`, to force a string).
pub fn apply_overrides(
    doc: &mut Table,
    prefix: &str,
    sections: &[&str],
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, FieldError> {
    let mut applied = Vec::new();
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let section = sections
            .iter()
            .filter(|s| {
                let flat = s.replace('.', "_");
                rest.len() > flat.len() + 1
                    && rest.starts_with(&flat)
                    && rest.as_bytes()[flat.len()] == b'_'
            })
            .max_by_key(|s| s.len());
        let (path, key): (Vec<&str>, String) = match section {
            Some(s) => (s.split('.').collect(), rest[s.len() + 1..].to_owned()),
            None => (Vec::new(), rest.clone()),
        };
        let mut table = &mut *doc;
        for part in &path {
            let entry = table
                .entry((*part).to_owned())
                .or_insert_with(|| Value::Table(Table::new()));
            table = match entry {
                Value::Table(t) => t,
                _ => {
                    return Err(FieldError::new(
                        name.clone(),
                        format!("{part} is not a section in the config file"),
                    ));
                }
            };
        }
        table.insert(key, parse_value(&raw));
        applied.push(name);
    }
    Ok(applied)
}

fn parse_value(raw: &str) -> Value {
    match format!("v = {raw}").parse::<Table>() {
        Ok(mut t) => match t.remove("v") {
            Some(v @ (Value::Integer(_) | Value::Float(_) | Value::Boolean(_))) => v,
            Some(v @ (Value::Array(_) | Value::Table(_) | Value::String(_))) => v,
            _ => Value::String(raw.to_owned()),
        },
        Err(_) => Value::String(raw.to_owned()),
    }
}

/// Why a configuration was refused; always names the file or the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("config key {key}: {reason}")]
    Invalid { key: String, reason: String },
    /// A file a key names (a password file, say) that the loader reads itself.
    #[error("config key {key}: cannot read {path}: {source}")]
    ReadKeyFile {
        key: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl ConfigError {
    pub fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Two keys set together or not at all (a certificate and its key): the one missing is named.
pub fn check_pair(
    (a_key, a): (&str, Option<&std::path::Path>),
    (b_key, b): (&str, Option<&std::path::Path>),
) -> Result<(), ConfigError> {
    match (a, b) {
        (Some(_), None) => Err(ConfigError::invalid(
            b_key,
            format!("is required with {a_key}"),
        )),
        (None, Some(_)) => Err(ConfigError::invalid(
            a_key,
            format!("is required with {b_key}"),
        )),
        _ => Ok(()),
    }
}

/// Each file a key names, when set, exists: named by its key at start, not at first use.
pub fn check_files<'a>(
    files: impl IntoIterator<Item = (&'a str, Option<&'a std::path::Path>)>,
) -> Result<(), ConfigError> {
    for (key, file) in files {
        if let Some(path) = file
            && !path.is_file()
        {
            return Err(ConfigError::invalid(
                key,
                format!("{} does not exist", path.display()),
            ));
        }
    }
    Ok(())
}

/// Turns TOML `text` (read from `path`, named in errors) plus `prefix`-ed variables into a
/// typed config. Every error names the key: a type error its path, a missing key the key itself
/// (serde reports it at the enclosing section).
pub fn parse_config<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &std::path::Path,
    prefix: &str,
    sections: &[&str],
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let mut doc = text.parse::<Table>().map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    apply_overrides(&mut doc, prefix, sections, vars)
        .map_err(|e| ConfigError::invalid(&e.field, e.reason))?;
    serde_path_to_error::deserialize(Value::Table(doc)).map_err(|e| {
        let at = e.path().to_string();
        let reason = e.into_inner().to_string();
        let missing = reason
            .find("missing field `")
            .map(|i| &reason[i + "missing field `".len()..])
            .and_then(|rest| rest.split('`').next());
        match missing {
            Some(field) if at == "." => ConfigError::invalid(field, "is required"),
            Some(field) => ConfigError::invalid(&format!("{at}.{field}"), "is required"),
            None => ConfigError::invalid(&at, reason.trim()),
        }
    })
}

/// A list key that also takes one string (`key = "a"` as `key = ["a"]`), so a single value
/// can come from an environment variable without TOML brackets. Use with
/// `#[serde(deserialize_with = "sd_protocol::env::one_or_many")]`.
pub fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match serde::Deserialize::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// `url` safe to print or log: the password, if any, replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_list_key_takes_one_string_or_a_list() {
        #[derive(serde::Deserialize)]
        struct C {
            #[serde(deserialize_with = "one_or_many")]
            uris: Vec<String>,
        }
        let parse = |text: &str, env: &[(&str, &str)]| {
            parse_config::<C>(text, std::path::Path::new("t"), "SD_X_", &[], vars(env))
                .map(|c| c.uris)
        };
        assert_eq!(parse("uris = \"a\"", &[]).unwrap(), ["a"]);
        assert_eq!(parse("uris = [\"a\", \"b\"]", &[]).unwrap(), ["a", "b"]);
        assert_eq!(
            parse("", &[("SD_X_URIS", "https://api.example")]).unwrap(),
            ["https://api.example"]
        );
        assert_eq!(
            parse("", &[("SD_X_URIS", "[\"https://a\", \"https://b\"]")]).unwrap(),
            ["https://a", "https://b"]
        );
        assert!(parse("uris = 5", &[]).is_err());
    }

    #[test]
    fn keys_land_in_their_sections() {
        let mut doc: Table = "[redis]\nurl = \"redis://a\"\n".parse().unwrap();
        let applied = apply_overrides(
            &mut doc,
            "SD_X_",
            &["redis", "auth", "executor", "executor.kubernetes"],
            vars(&[
                ("SD_X_REDIS_URL", "redis://b"),
                ("SD_X_AUTH_API_PUBLIC_KEY_FILE", "/k.pem"),
                ("SD_X_EXECUTOR_KUBERNETES_NAMESPACE", "builds"),
                ("SD_X_EXECUTOR_MAX_IN_FLIGHT", "8"),
                ("SD_X_LISTEN", "0.0.0.0:80"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(applied.len(), 5);
        assert_eq!(doc["redis"]["url"].as_str(), Some("redis://b"));
        assert_eq!(doc["auth"]["api_public_key_file"].as_str(), Some("/k.pem"));
        assert_eq!(
            doc["executor"]["kubernetes"]["namespace"].as_str(),
            Some("builds")
        );
        assert_eq!(doc["executor"]["max_in_flight"].as_integer(), Some(8));
        assert_eq!(doc["listen"].as_str(), Some("0.0.0.0:80"));
    }

    #[test]
    fn values_are_typed_when_they_look_typed() {
        assert_eq!(parse_value("true"), Value::Boolean(true));
        assert_eq!(parse_value("60s"), Value::String("60s".into()));
        assert_eq!(parse_value("\"true\""), Value::String("true".into()));
        assert_eq!(
            parse_value("[\"a\", \"b\"]"),
            Value::Array(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            parse_value("postgres://u@h/db"),
            Value::String("postgres://u@h/db".into())
        );
    }

    #[test]
    fn passwords_are_redacted() {
        for (url, shown) in [
            ("postgres://u:secret@h/db", "postgres://u:***@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("sqlite://x.db", "sqlite://x.db"),
            (
                "redis://agent:s3cret@redis.local:6379/0",
                "redis://agent:***@redis.local:6379/0",
            ),
            ("rediss://:s3cret@h:6380", "rediss://:***@h:6380"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        assert!(!redact_url("redis://:s3cret@[bad").contains("s3cret"));
    }
}
