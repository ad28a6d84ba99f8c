//! Kubernetes' rules for names, label keys and values, and environment variable names, as
//! the API server applies them. A leaf module: the config checks its keys with these before
//! any pod is built, and the pod builder relies on them.

/// Volume names the pod builder uses itself; configured volumes must pick others.
pub const RESERVED_VOLUMES: &[&str] = &[
    "podinfo",
    "screwdriver",
    "sdtemp",
    "workspace",
    "dind-storage",
    "dind-share",
    "dind-client-certs",
];

/// A DNS-1123 label: ≤ 63 of `[a-z0-9-]`, alphanumeric at both ends (container and volume
/// names; pod names made of our prefix and a build id).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A DNS-1123 subdomain: dot-separated labels, ≤ 253 (object names, label key prefixes).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && part.starts_with(|c: char| c.is_ascii_alphanumeric())
                && part.ends_with(|c: char| c.is_ascii_alphanumeric())
        })
}

/// A label value: empty, or ≤ 63 of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_name_part(s)
}

/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain, the name as a
/// label value but not empty.
pub fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_name_part(name),
        None => is_name_part(s),
    }
}

/// An environment variable name as Kubernetes accepts it: `[-._a-zA-Z][-._a-zA-Z0-9]*`.
pub fn is_env_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic() || matches!(c, '-' | '.' | '_'))
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// `text` made into a label value the way Screwdriver's executor does it: every run of
/// characters outside `[A-Za-z0-9_.-]` becomes `.`, the result is cut to 63 and trimmed to
/// alphanumerics at both ends (`screwdriver-cd/launcher` → `screwdriver-cd.launcher`).
pub fn label_value_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_run = false;
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
            out.push(c);
            in_run = false;
        } else if !in_run {
            out.push('.');
            in_run = true;
        }
    }
    let trimmed = out.trim_matches(|c: char| matches!(c, '_' | '.' | '-'));
    let cut = &trimmed[..trimmed.len().min(63)];
    cut.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

fn is_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels() {
        assert!(is_dns_label("sd-8609"));
        assert!(!is_dns_label("Sd-1") && !is_dns_label("-a") && !is_dns_label(&"a".repeat(64)));
        assert!(is_dns_subdomain("screwdriver.cd") && !is_dns_subdomain("a..b"));
        assert!(is_label_value("") && is_label_value("PR-17.main") && !is_label_value("a/b"));
        assert!(is_qualified_name("screwdriver.cd/pipeline") && is_qualified_name("app"));
        assert!(
            !is_qualified_name("Screwdriver.cd/x")
                && !is_qualified_name("a/")
                && !is_qualified_name("/a")
        );
        assert!(
            is_env_name("SD_TEMP")
                && is_env_name("_x.y-z")
                && !is_env_name("1X")
                && !is_env_name("")
        );
    }

    #[test]
    fn label_values_are_made_as_screwdriver_makes_them() {
        assert_eq!(
            label_value_of("screwdriver-cd/launcher"),
            "screwdriver-cd.launcher"
        );
        assert_eq!(label_value_of("PR-17:main"), "PR-17.main");
        assert_eq!(label_value_of("__a  b__"), "a.b");
        assert_eq!(label_value_of("ünïcode/name"), "n.code.name");
        assert_eq!(
            label_value_of(&format!("{}-tail", "x".repeat(62))),
            "x".repeat(62)
        );
        assert_eq!(label_value_of("///"), "");
        for s in ["a/b c", "日本", "x.-_y", &"z".repeat(200)] {
            assert!(is_label_value(&label_value_of(s)), "{s}");
        }
    }
}
