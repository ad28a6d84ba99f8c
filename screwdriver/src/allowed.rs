//! Which Screwdriver APIs a build's token may be sent to.
//!
//! A start message names its API (`apiUri`), and the build's token goes there: in the
//! scheduler's and the agent's status reports, and on the launcher's command line. Anyone who
//! can put a start message in a queue could otherwise collect freshly minted tokens at an
//! address of their choosing, so both binaries take `apiUri` only when it is one of the API
//! base URLs their operator configured (`screwdriver.api_uris`), or below one.
//!
//! Both sides are parsed with the `url` crate and compared part by part: scheme, host, port
//! (`:443` is https's default) and path prefix by whole segments. Nothing is compared as a
//! string prefix, so `https://api.example.com.evil.net` or `https://api.example.com@evil.net`
//! never pass for `https://api.example.com`. Characters URL parsers disagree on (the launcher
//! that reads `apiUri` next is not written in Rust) are refused outright.

use url::{Host, Url};

/// Why one URL is not an acceptable API URL. Says what is wrong, never repeats the URL (it may
/// carry credentials); the caller names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("must be an https:// URL (http:// only with screwdriver.allow_http = true)")]
    Scheme,
    #[error("is not a URL: {0}")]
    Parse(#[from] url::ParseError),
    /// Parsers disagree on these (`\` is a slash to one and not to another, `@` starts
    /// credentials, `%` escapes a host), or they end the compared part (`?`, `#`).
    #[error("contains {0:?}, which an API URL must not contain")]
    Character(char),
    #[error("has no host")]
    NoHost,
    #[error("is not one of the Screwdriver APIs allowed by screwdriver.api_uris")]
    NotAllowed,
}

/// Why a configured allow-list is refused; names the entry by its position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowListError {
    #[error(
        "is empty: list the Screwdriver API base URL(s) builds may name as apiUri, e.g. [\"https://api.screwdriver.example.com\"]"
    )]
    Empty,
    #[error("[{index}] {source}")]
    Entry {
        index: usize,
        #[source]
        source: UriError,
    },
}

/// The Screwdriver APIs a build may name, from `screwdriver.api_uris` and
/// `screwdriver.allow_http`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUris {
    bases: Vec<Base>,
    allow_http: bool,
}

impl ApiUris {
    /// Parses the configured base URLs; `https://` only unless `allow_http`. An empty list is
    /// refused: it would refuse every build, which is better found out at start-up.
    pub fn new<S: AsRef<str>>(uris: &[S], allow_http: bool) -> Result<Self, AllowListError> {
        if uris.is_empty() {
            return Err(AllowListError::Empty);
        }
        let bases = uris
            .iter()
            .enumerate()
            .map(|(index, uri)| {
                Base::parse(uri.as_ref(), allow_http)
                    .map(|(base, _)| base)
                    .map_err(|source| AllowListError::Entry { index, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { bases, allow_http })
    }

    /// `api_uri` as it will be called, when it is one of the allowed APIs or below one.
    pub fn check(&self, api_uri: &str) -> Result<ApiBase, UriError> {
        let (candidate, url) = Base::parse(api_uri, self.allow_http)?;
        if self.bases.iter().any(|allowed| allowed.admits(&candidate)) {
            Ok(ApiBase(url))
        } else {
            Err(UriError::NotAllowed)
        }
    }
}

/// An allowed API base URL, parsed: requests go to exactly what was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiBase(Url);

impl ApiBase {
    /// `{apiUri}/v4/builds/{id}`, whatever trailing slashes `apiUri` has.
    pub fn build_url(&self, build_id: u64) -> Url {
        let mut url = self.0.clone();
        let path = format!(
            "{}/v4/builds/{build_id}",
            self.0.path().trim_end_matches('/')
        );
        url.set_path(&path);
        url
    }
}

/// The parts of a URL that are compared.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Base {
    scheme: String,
    host: Host<String>,
    port: u16,
    /// Without trailing slashes: `""` for the root.
    path: String,
}

impl Base {
    fn parse(text: &str, allow_http: bool) -> Result<(Self, Url), UriError> {
        if let Some(c) = text
            .chars()
            .find(|c| !c.is_ascii_graphic() || matches!(c, '\\' | '@' | '%' | '?' | '#'))
        {
            return Err(UriError::Character(c));
        }
        // Spelled out in full: parsers differ on `https:host` and `https:///host`.
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(UriError::Scheme);
        };
        let scheme = scheme.to_ascii_lowercase();
        if !(scheme == "https" || (scheme == "http" && allow_http)) {
            return Err(UriError::Scheme);
        }
        if rest.starts_with('/') {
            return Err(UriError::NoHost);
        }
        let url = Url::parse(text)?;
        let host = url.host().ok_or(UriError::NoHost)?.to_owned();
        let port = url.port_or_known_default().ok_or(UriError::Scheme)?;
        let base = Base {
            scheme,
            host,
            port,
            path: url.path().trim_end_matches('/').to_owned(),
        };
        Ok((base, url))
    }

    /// Same scheme, host and port, and `other`'s path is this path or below it (whole segments).
    fn admits(&self, other: &Base) -> bool {
        self.scheme == other.scheme
            && self.host == other.host
            && self.port == other.port
            && other
                .path
                .strip_prefix(&self.path)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(uris: &[&str]) -> ApiUris {
        ApiUris::new(uris, false).unwrap()
    }

    #[test]
    fn the_configured_api_and_its_spellings_pass() {
        let list = allowed(&["https://api.screwdriver.example"]);
        for uri in [
            "https://api.screwdriver.example",
            "https://api.screwdriver.example/",
            "https://api.screwdriver.example//",
            "https://API.Screwdriver.Example",
            "HTTPS://api.screwdriver.example",
            "https://api.screwdriver.example:443",
            "https://api.screwdriver.example/v4",
        ] {
            assert!(list.check(uri).is_ok(), "{uri}");
        }
    }

    #[test]
    fn lookalikes_are_refused() {
        let list = allowed(&["https://api.example.com"]);
        for uri in [
            "https://api.example.com.evil.net",
            "https://api.example.com@evil.net",
            "https://user:pass@api.example.com",
            "https://api.example.com\\@evil.net",
            "https://evil.net/api.example.com",
            "https://evil.net?https://api.example.com",
            "https://evil.net#https://api.example.com",
            "https://api.example.co",
            "https://xapi.example.com",
            "https://api.example.com:8443",
            "https://api.example.com.",
            "https://api%2Eexample.com",
            "https:api.example.com",
            "https:///api.example.com",
            "https:// api.example.com",
            "https://api.example.com\t",
            "https://api.exämple.com",
            "http://api.example.com",
            "ftp://api.example.com",
            "api.example.com",
            "",
        ] {
            assert!(list.check(uri).is_err(), "{uri} was allowed");
        }
    }

    #[test]
    fn a_path_prefix_matches_whole_segments() {
        let list = allowed(&["https://sd.example/api/"]);
        for uri in [
            "https://sd.example/api",
            "https://sd.example/api/",
            "https://sd.example/api/v4",
        ] {
            assert!(list.check(uri).is_ok(), "{uri}");
        }
        for uri in [
            "https://sd.example",
            "https://sd.example/apix",
            "https://sd.example/ap",
            "https://sd.example/api/../admin",
            "https://sd.example/api/./../admin",
            "https://sd.example/other/api",
        ] {
            assert!(list.check(uri).is_err(), "{uri} was allowed");
        }
    }

    #[test]
    fn hosts_are_compared_normalised() {
        let list = allowed(&["https://127.0.0.1:8443", "https://[::1]"]);
        assert!(list.check("https://127.0.0.1:8443/").is_ok());
        assert!(list.check("https://[0:0::1]/").is_ok());
        assert!(list.check("https://127.0.0.1").is_err());
        assert!(list.check("https://127.0.0.2:8443").is_err());
    }

    #[test]
    fn http_only_when_allowed() {
        assert_eq!(
            ApiUris::new(&["http://127.0.0.1:9"], false),
            Err(AllowListError::Entry {
                index: 0,
                source: UriError::Scheme
            })
        );
        let list = ApiUris::new(&["http://127.0.0.1:9", "https://api.example"], true).unwrap();
        assert!(list.check("http://127.0.0.1:9/").is_ok());
        assert!(list.check("https://api.example").is_ok());
        // Allowed for http is not allowed for https at the same address, or the reverse.
        assert!(list.check("https://127.0.0.1:9").is_err());
        assert!(list.check("http://api.example").is_err());
    }

    #[test]
    fn a_bad_list_names_the_entry() {
        assert_eq!(ApiUris::new::<&str>(&[], false), Err(AllowListError::Empty));
        let err =
            ApiUris::new(&["https://ok.example", "https://u:p@x.example"], false).unwrap_err();
        assert_eq!(
            err,
            AllowListError::Entry {
                index: 1,
                source: UriError::Character('@')
            }
        );
        assert!(!err.to_string().contains("u:p"), "{err}");
        assert!(ApiUris::new(&["not a url"], false).is_err());
    }

    #[test]
    fn build_urls_are_made_from_the_checked_url() {
        let list = allowed(&["https://api.sd.example/sd"]);
        let base = list.check("https://API.sd.example:443/sd//").unwrap();
        assert_eq!(
            base.build_url(8609).as_str(),
            "https://api.sd.example/sd/v4/builds/8609"
        );
        let base = allowed(&["https://api.sd.example"])
            .check("https://api.sd.example")
            .unwrap();
        assert_eq!(
            base.build_url(1).as_str(),
            "https://api.sd.example/v4/builds/1"
        );
    }
}
