//! The string formats apimachinery checks (`k8s.io/apimachinery/pkg/util/validation` and
//! `.../api/validate/content`): each function returns the real server's messages for a value
//! that does not conform, none for one that does.

const LABEL_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character";
const SUBDOMAIN_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";
const KEY_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const KEY_MSG: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const KEY_EXAMPLES: [&str; 3] = ["MyName", "my.name", "123-abc"];
const VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const ENV_FMT: &str = "[-._a-zA-Z][-._a-zA-Z0-9]*";
const ENV_MSG: &str = "a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.', and must not start with a digit";
const CONFIG_KEY_FMT: &str = "[-._a-zA-Z0-9]+";
const CONFIG_KEY_MSG: &str =
    "a valid config key must consist of alphanumeric characters, '-', '_' or '.'";
const HEADER_FMT: &str = "[-A-Za-z0-9]+";
const HEADER_MSG: &str = "a valid HTTP header must consist of alphanumeric characters or '-'";

pub const LABEL_MAX: usize = 63;
pub const SUBDOMAIN_MAX: usize = 253;

/// `RegexError`, with its examples (and its double spaces) as the server prints them.
pub fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    if examples.is_empty() {
        return format!("{msg} (regex used for validation is '{fmt}')");
    }
    let shown: Vec<String> = examples.iter().map(|e| format!("'{e}', ")).collect();
    format!(
        "{msg} (e.g. {}regex used for validation is '{fmt}')",
        shown.join(" or ")
    )
}

pub fn max_len_error(max: usize) -> String {
    format!("must be no more than {max} characters")
}

pub fn inclusive_range_error(lo: i64, hi: i64) -> String {
    format!("must be between {lo} and {hi}, inclusive")
}

/// `IsDNS1123Label`: container, volume and port names, namespaces.
pub fn dns_label(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > LABEL_MAX {
        errors.push(max_len_error(LABEL_MAX));
    }
    if !is_label_syntax(value) {
        if is_subdomain_syntax(value) {
            errors.push("must not contain dots".to_owned());
        } else {
            errors.push(regex_error(LABEL_MSG, LABEL_FMT, &["my-name", "123-abc"]));
        }
    }
    errors
}

/// `IsDNS1123Subdomain`: pod, secret, config map and service account names.
pub fn dns_subdomain(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > SUBDOMAIN_MAX {
        errors.push(max_len_error(SUBDOMAIN_MAX));
    }
    if !is_subdomain_syntax(value) {
        errors.push(regex_error(SUBDOMAIN_MSG, SUBDOMAIN_FMT, &["example.com"]));
    }
    errors
}

/// `NameIsDNSSubdomain(name, prefix)`: a prefix (generateName) may end in a dash, which the
/// server masks the way it does (the last two characters become `a`).
pub fn dns_subdomain_prefix(value: &str) -> Vec<String> {
    match value.strip_suffix('-') {
        Some(_) => {
            let keep = value.len().saturating_sub(2);
            dns_subdomain(&format!("{}a", value.get(..keep).unwrap_or_default()))
        }
        None => dns_subdomain(value),
    }
}

/// `IsQualifiedName` (a label key): an optional DNS-subdomain prefix and `/`, then a name of
/// at most 63 alphanumerics, `-`, `_`, `.`.
pub fn qualified_name(value: &str) -> Vec<String> {
    let parts: Vec<&str> = value.split('/').collect();
    let mut errors = Vec::new();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_owned());
            } else {
                errors.extend(
                    dns_subdomain(prefix)
                        .into_iter()
                        .map(|m| format!("prefix part {m}")),
                );
            }
            *name
        }
        _ => {
            return vec![format!(
                "a valid label key {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                regex_error(KEY_MSG, KEY_FMT, &KEY_EXAMPLES)
            )];
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_owned());
    } else if name.len() > LABEL_MAX {
        errors.push(format!("name part {}", max_len_error(LABEL_MAX)));
    }
    if !is_key_syntax(name) {
        errors.push(format!(
            "name part {}",
            regex_error(KEY_MSG, KEY_FMT, &KEY_EXAMPLES)
        ));
    }
    errors
}

/// `IsValidLabelValue`: empty, or at most 63 characters shaped like a label key's name.
pub fn label_value(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > LABEL_MAX {
        errors.push(max_len_error(LABEL_MAX));
    }
    if !value.is_empty() && !is_key_syntax(value) {
        errors.push(regex_error(
            VALUE_MSG,
            VALUE_FMT,
            &["MyValue", "my_value", "12345"],
        ));
    }
    errors
}

/// `IsEnvVarName`: `[-._a-zA-Z][-._a-zA-Z0-9]*`, and not `.`, `..` or `..`-prefixed. (1.30
/// and 1.31 apply it; later releases relax it to printable ASCII without `=`, so this refuses
/// only what every supported release refuses.)
pub fn env_var_name(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let first_ok = value
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || matches!(b, b'-' | b'.' | b'_'));
    let rest_ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !(first_ok && rest_ok) {
        errors.push(regex_error(
            ENV_MSG,
            ENV_FMT,
            &["my.env-name", "MY_ENV.NAME", "MyEnvName1"],
        ));
    }
    errors.extend(chdir_prefix(value));
    errors
}

/// `IsConfigMapKey`: keys of config maps and secrets.
pub fn config_map_key(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > SUBDOMAIN_MAX {
        errors.push(max_len_error(SUBDOMAIN_MAX));
    }
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !ok {
        errors.push(regex_error(
            CONFIG_KEY_MSG,
            CONFIG_KEY_FMT,
            &["key.name", "KEY_NAME", "key-name"],
        ));
    }
    errors.extend(chdir_prefix(value));
    errors
}

/// `IsValidPortName`: at most 15 of `[-a-z0-9]`, at least one letter, no `--`, no dash at an end.
pub fn port_name(value: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if value.len() > 15 {
        errors.push(max_len_error(15));
    }
    if value.is_empty()
        || !value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        errors.push(
            "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)".to_owned(),
        );
    }
    if !value.bytes().any(|b| b.is_ascii_lowercase()) {
        errors.push("must contain at least one letter (a-z)".to_owned());
    }
    if value.contains("--") {
        errors.push("must not contain consecutive hyphens".to_owned());
    }
    if value.starts_with('-') || value.ends_with('-') {
        errors.push("must not begin or end with a hyphen".to_owned());
    }
    errors
}

/// `IsHTTPHeaderName`.
pub fn http_header_name(value: &str) -> Vec<String> {
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Vec::new()
    } else {
        vec![regex_error(HEADER_MSG, HEADER_FMT, &["X-Header-Name"])]
    }
}

fn chdir_prefix(value: &str) -> Option<String> {
    match value {
        "." => Some("must not be '.'".to_owned()),
        ".." => Some("must not be '..'".to_owned()),
        v if v.starts_with("..") => Some("must not start with '..'".to_owned()),
        _ => None,
    }
}

fn is_label_syntax(value: &str) -> bool {
    let bytes = value.as_bytes();
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    edge(bytes.first())
        && edge(bytes.last())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

fn is_subdomain_syntax(value: &str) -> bool {
    value.split('.').all(is_label_syntax)
}

fn is_key_syntax(value: &str) -> bool {
    let bytes = value.as_bytes();
    let edge = |b: Option<&u8>| b.is_some_and(u8::is_ascii_alphanumeric);
    edge(bytes.first())
        && edge(bytes.last())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_errors_print_like_the_servers() {
        assert_eq!(
            regex_error(KEY_MSG, KEY_FMT, &KEY_EXAMPLES),
            "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
        );
        assert_eq!(
            regex_error("m", "f", &[]),
            "m (regex used for validation is 'f')"
        );
    }

    #[test]
    fn dns_labels_and_subdomains() {
        assert!(dns_label("build-1").is_empty());
        assert_eq!(dns_label("a.b"), ["must not contain dots"]);
        assert_eq!(
            dns_label("Build"),
            [regex_error(LABEL_MSG, LABEL_FMT, &["my-name", "123-abc"])]
        );
        assert_eq!(dns_label(&"a".repeat(64)), [max_len_error(63)]);
        assert!(dns_subdomain("sd-1.builds").is_empty());
        assert_eq!(dns_subdomain("-a").len(), 1);
        assert_eq!(dns_subdomain("a..b").len(), 1);
        assert_eq!(dns_subdomain(&"a".repeat(254)), [max_len_error(253)]);
        assert!(dns_subdomain_prefix("sd-").is_empty());
    }

    #[test]
    fn qualified_names() {
        for ok in ["app", "screwdriver.cd/pipeline", "A_b.c-9", "k8s.io/x"] {
            assert!(qualified_name(ok).is_empty(), "{ok}");
        }
        assert_eq!(qualified_name("/x"), ["prefix part must be non-empty"]);
        assert_eq!(qualified_name("a/b/c").len(), 1);
        assert!(qualified_name("a/b/c")[0].starts_with("a valid label key must consist"));
        assert_eq!(qualified_name("x/").len(), 2, "{:?}", qualified_name("x/"));
        assert_eq!(
            qualified_name("-x"),
            [format!(
                "name part {}",
                regex_error(KEY_MSG, KEY_FMT, &KEY_EXAMPLES)
            )]
        );
        assert_eq!(
            qualified_name(&"a".repeat(64)),
            ["name part must be no more than 63 characters"]
        );
        assert_eq!(
            qualified_name("Ex.com/x")[0],
            format!(
                "prefix part {}",
                regex_error(SUBDOMAIN_MSG, SUBDOMAIN_FMT, &["example.com"])
            )
        );
    }

    #[test]
    fn label_values() {
        assert!(label_value("").is_empty());
        assert!(label_value("My_value.1").is_empty());
        assert_eq!(label_value("a b").len(), 1);
        assert_eq!(label_value(&"a".repeat(64)), [max_len_error(63)]);
    }

    #[test]
    fn env_var_names() {
        for ok in ["PATH", "_x", "my.env-name", "-a"] {
            assert!(env_var_name(ok).is_empty(), "{ok}");
        }
        assert_eq!(env_var_name("1A").len(), 1);
        assert_eq!(env_var_name("A B").len(), 1);
        assert_eq!(env_var_name(".."), ["must not be '..'"]);
        assert_eq!(env_var_name("..a"), ["must not start with '..'"]);
    }

    #[test]
    fn port_and_header_names() {
        assert!(port_name("http").is_empty());
        assert_eq!(
            port_name("8080"),
            ["must contain at least one letter (a-z)"]
        );
        assert_eq!(port_name("a--b"), ["must not contain consecutive hyphens"]);
        assert!(http_header_name("X-Token").is_empty());
        assert_eq!(http_header_name("X Token").len(), 1);
        assert!(config_map_key("key.name").is_empty());
        assert_eq!(config_map_key("a/b").len(), 1);
    }
}
