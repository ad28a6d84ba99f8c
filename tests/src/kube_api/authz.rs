//! What the authorizer sees of a request (`RequestInfoFactory.NewRequestInfo`): the verb, API
//! group, resource, subresource, namespace and name of a resource request.

/// The attributes RBAC decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// get, list, watch, create, update, patch, delete, deletecollection
    pub verb: String,
    /// `""` for the core group
    pub group: String,
    pub resource: String,
    /// `""` when the request is on the resource itself
    pub subresource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl Attributes {
    /// `verb resource[/subresource]`, the form [`FakeKube::deny`](super::FakeKube::deny) takes.
    pub fn rule(&self) -> String {
        if self.subresource.is_empty() {
            format!("{} {}", self.verb, self.resource)
        } else {
            format!("{} {}/{}", self.verb, self.resource, self.subresource)
        }
    }

    /// Self-access reviews, which the default `system:basic-user` role grants everyone.
    pub fn is_self_review(&self) -> bool {
        self.group == "authorization.k8s.io"
            && matches!(
                self.resource.as_str(),
                "selfsubjectaccessreviews" | "selfsubjectrulesreviews"
            )
    }
}

/// The attributes of a resource request; `None` for discovery and other non-resource paths.
/// `params` are the decoded query parameters.
pub fn attributes(method: &str, path: &str, params: &[(String, String)]) -> Option<Attributes> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (legacy_watch, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        rest => (false, rest),
    };
    let (namespace, rest) = scope(rest);
    let resource = (*rest.first()?).to_owned();
    let mut name = rest.get(1).map(|n| (*n).to_owned());
    let subresource = rest.get(2).map(|s| (*s).to_owned()).unwrap_or_default();
    let param = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let mut verb = match method {
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => "get",
    };
    if legacy_watch {
        verb = "watch";
    } else if verb == "get" && name.is_none() {
        verb = if matches!(param("watch"), Some("true" | "1")) {
            "watch"
        } else {
            "list"
        };
        name = param("fieldSelector").and_then(exact_name);
    }
    if verb == "delete" && name.is_none() {
        verb = "deletecollection";
    }
    Some(Attributes {
        verb: verb.to_owned(),
        group: group.to_owned(),
        resource,
        subresource,
        namespace,
        name,
    })
}

/// `/namespaces/{ns}/<rest>` is namespaced; `/namespaces[/{ns}[/status|finalize]]` is the
/// namespace resource itself.
fn scope<'a>(rest: &'a [&'a str]) -> (Option<String>, &'a [&'a str]) {
    match rest {
        ["namespaces", ns, next, ..] if !matches!(*next, "status" | "finalize") => {
            (Some((*ns).to_owned()), &rest[2..])
        }
        ["namespaces", ns, ..] => (Some((*ns).to_owned()), rest),
        rest => (None, rest),
    }
}

/// A list narrowed to one object by `metadata.name=x` is authorized as that object.
fn exact_name(selector: &str) -> Option<String> {
    selector.split(',').find_map(|requirement| {
        let value = requirement
            .trim()
            .strip_prefix("metadata.name==")
            .or_else(|| requirement.trim().strip_prefix("metadata.name="))?;
        (!value.is_empty() && !value.contains('/') && value != "." && value != "..")
            .then(|| value.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verb_of(method: &str, path: &str, query: &[(&str, &str)]) -> (String, String, String) {
        let params: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let a = attributes(method, path, &params).unwrap();
        (a.verb, a.resource, a.subresource)
    }

    fn t(verb: &str, resource: &str, sub: &str) -> (String, String, String) {
        (verb.to_owned(), resource.to_owned(), sub.to_owned())
    }

    #[test]
    fn verbs_are_the_authorizers() {
        let pods = "/api/v1/namespaces/builds/pods";
        assert_eq!(verb_of("GET", pods, &[]), t("list", "pods", ""));
        assert_eq!(
            verb_of("GET", pods, &[("watch", "true")]),
            t("watch", "pods", "")
        );
        assert_eq!(
            verb_of("GET", "/api/v1/pods", &[("watch", "1")]),
            t("watch", "pods", "")
        );
        assert_eq!(
            verb_of("GET", &format!("{pods}/sd-1"), &[]),
            t("get", "pods", "")
        );
        assert_eq!(
            verb_of("GET", &format!("{pods}/sd-1/log"), &[]),
            t("get", "pods", "log")
        );
        assert_eq!(verb_of("POST", pods, &[]), t("create", "pods", ""));
        assert_eq!(
            verb_of("PUT", &format!("{pods}/sd-1/status"), &[]),
            t("update", "pods", "status")
        );
        assert_eq!(
            verb_of("PATCH", &format!("{pods}/sd-1"), &[]),
            t("patch", "pods", "")
        );
        assert_eq!(
            verb_of("DELETE", &format!("{pods}/sd-1"), &[]),
            t("delete", "pods", "")
        );
        assert_eq!(
            verb_of("DELETE", pods, &[]),
            t("deletecollection", "pods", "")
        );
        assert_eq!(
            verb_of("GET", "/api/v1/watch/namespaces/builds/pods", &[]),
            t("watch", "pods", "")
        );
        assert_eq!(
            verb_of(
                "GET",
                "/api/v1/namespaces/builds/events",
                &[("fieldSelector", "involvedObject.name=sd-1")]
            ),
            t("list", "events", "")
        );
    }

    #[test]
    fn groups_namespaces_and_names() {
        let review = attributes(
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            &[],
        )
        .unwrap();
        assert_eq!(review.group, "authorization.k8s.io");
        assert_eq!(review.namespace, None);
        assert!(review.is_self_review());
        let get = attributes("GET", "/api/v1/namespaces/builds/pods/sd-1", &[]).unwrap();
        assert_eq!(
            (get.namespace.as_deref(), get.name.as_deref()),
            (Some("builds"), Some("sd-1"))
        );
        let ns = attributes("GET", "/api/v1/namespaces/builds", &[]).unwrap();
        assert_eq!(
            (ns.resource.as_str(), ns.name.as_deref()),
            ("namespaces", Some("builds"))
        );
        let one = attributes(
            "GET",
            "/api/v1/namespaces/builds/pods",
            &[("fieldSelector".to_owned(), "metadata.name=sd-1".to_owned())],
        )
        .unwrap();
        assert_eq!(
            (one.verb.as_str(), one.name.as_deref()),
            ("list", Some("sd-1"))
        );
        assert!(attributes("GET", "/version", &[]).is_none());
        assert!(attributes("GET", "/apis", &[]).is_none());
        assert!(attributes("GET", "/api/v1", &[]).is_none());
    }
}
