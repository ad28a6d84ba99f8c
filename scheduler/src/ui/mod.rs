//! The status pages under `/ui/`: read-only, server-rendered, no script. Open to anyone only
//! when `ui.open` says so; otherwise the first visit asks for a Screwdriver token with scope
//! `user` or `admin`, kept in an HttpOnly cookie for `/ui` and checked on every page.
//!
//! The pages read what the API reads (`status`, the builds table, dead letters); what they
//! show is decided in `pages`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::AppState;
use crate::auth::Scope;
use crate::status::{ClusterStatus, DeadLetters};

pub mod pages;

/// The cookie that holds the token.
const COOKIE: &str = "sd_ui_token";
/// Longest a sign-in lasts, whatever the token's own expiry.
const COOKIE_MAX_AGE_SECS: u64 = 12 * 3600;
/// Largest sign-in form accepted.
const MAX_FORM_BYTES: usize = 16 * 1024;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/ui/", get(clusters))
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/clusters/{name}", get(cluster))
        .route("/ui/builds/{build_id}", get(build))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/style.css", get(style))
}

/// Someone allowed to see the pages.
struct Viewer;

/// Not allowed: sent to the sign-in page, then back.
struct SignIn(String);

impl IntoResponse for SignIn {
    fn into_response(self) -> Response {
        let to = format!("/ui/login?next={}", encode(&self.0));
        Redirect::to(&to).into_response()
    }
}

impl FromRequestParts<Arc<AppState>> for Viewer {
    type Rejection = SignIn;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if state.ui_open {
            return Ok(Viewer);
        }
        let allowed = cookie(&parts.headers, COOKIE)
            .and_then(|token| state.verifier.verify(token).ok())
            .is_some_and(|caller| caller.has_any(&[Scope::User, Scope::Admin]));
        if allowed {
            Ok(Viewer)
        } else {
            Err(SignIn(parts.uri.path().to_owned()))
        }
    }
}

/// A page, with the headers every page carries.
fn page(markup: maud::Markup) -> Response {
    let mut response = Html(markup.into_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(pages::CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn failed(status: StatusCode, what: &str) -> Response {
    (status, page(pages::message(what))).into_response()
}

async fn clusters(State(state): State<Arc<AppState>>, _: Viewer) -> Response {
    match ClusterStatus::read_all(&state.queues, &state.clusters(), state.dead_after).await {
        Ok(all) => page(pages::clusters(&all)),
        Err(e) => {
            tracing::warn!(error = %e, "status page: Redis unavailable");
            failed(
                StatusCode::SERVICE_UNAVAILABLE,
                "Redis is unavailable; try again shortly.",
            )
        }
    }
}

async fn cluster(
    State(state): State<Arc<AppState>>,
    _: Viewer,
    Path(name): Path<String>,
) -> Response {
    let Some((name, active)) = state.cluster(&name) else {
        return failed(StatusCode::NOT_FOUND, "No cluster of this name.");
    };
    let status = ClusterStatus::read(&state.queues, (&name, active), state.dead_after).await;
    let dead =
        DeadLetters::read(&state.queues, &name, 100, state.workers.dead_letters.hold()).await;
    let waiting = state.intake.builds().queued_on(&name, 100).await;
    match (status, dead, waiting) {
        (Ok(status), Ok(dead), Ok(waiting)) => page(pages::cluster(&status, &waiting, &dead)),
        _ => failed(
            StatusCode::SERVICE_UNAVAILABLE,
            "Redis or the database is unavailable; try again shortly.",
        ),
    }
}

async fn build(
    State(state): State<Arc<AppState>>,
    _: Viewer,
    Path(build_id): Path<String>,
) -> Response {
    let Some(build_id) = build_id
        .parse::<u64>()
        .ok()
        .filter(|id| *id > 0 && *id <= i64::MAX as u64)
    else {
        return failed(StatusCode::BAD_REQUEST, "A build id is a positive integer.");
    };
    let builds = state.intake.builds();
    match (
        builds.get(build_id).await,
        builds.history(build_id, 100).await,
    ) {
        (Ok(Some(row)), Ok(steps)) => page(pages::build(&row, &steps)),
        (Ok(None), _) => failed(
            StatusCode::NOT_FOUND,
            "No build of this id is known to the scheduler.",
        ),
        _ => failed(
            StatusCode::SERVICE_UNAVAILABLE,
            "The database is unavailable; try again shortly.",
        ),
    }
}

#[derive(Deserialize)]
struct Next {
    next: Option<String>,
}

async fn login_form(Query(query): Query<Next>) -> Response {
    page(pages::login(&safe_next(query.next.as_deref()), None))
}

/// The sign-in form's answer: a token that passes sets the cookie and goes on to `next`.
async fn login(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    if body.len() > MAX_FORM_BYTES {
        return failed(StatusCode::PAYLOAD_TOO_LARGE, "The form is too large.");
    }
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.trim());
    let next = safe_next(field("next"));
    let token = field("token").unwrap_or_default();
    let refusal = match state.verifier.verify(token) {
        Ok(caller) if caller.has_any(&[Scope::User, Scope::Admin]) => None,
        Ok(_) => Some("This token has neither scope user nor admin.".to_owned()),
        Err(e) => Some(format!("This token was refused: {e}.")),
    };
    if let Some(refusal) = refusal {
        tracing::info!("status pages: sign-in refused");
        return (
            StatusCode::UNAUTHORIZED,
            page(pages::login(&next, Some(&refusal))),
        )
            .into_response();
    }
    let secure = if https(&headers, state.tls_listening) {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE_SECS}{secure}"
    );
    let mut response = Redirect::to(&next).into_response();
    match HeaderValue::from_str(&cookie) {
        Ok(value) => {
            response.headers_mut().insert(header::SET_COOKIE, value);
            response
        }
        Err(_) => failed(StatusCode::BAD_REQUEST, "A token is plain text."),
    }
}

async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        pages::STYLE,
    )
}

/// Where to go after signing in: a page of `/ui/` only, never another site.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(path)
            if path.starts_with("/ui/")
                && !path.contains("//")
                && !path.contains('\\')
                && path.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            path.to_owned()
        }
        _ => "/ui/".to_owned(),
    }
}

/// Whether the browser reached us over HTTPS: our own TLS, or a proxy that says so.
fn https(headers: &HeaderMap, tls_listening: bool) -> bool {
    tls_listening
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
        .filter(|v| !v.is_empty())
}

fn encode(path: &str) -> String {
    form_urlencoded::byte_serialize(path.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_returns_only_to_a_status_page() {
        assert_eq!(safe_next(Some("/ui/clusters/east")), "/ui/clusters/east");
        for bad in [
            "https://evil.example/ui/",
            "//evil.example/ui/",
            "/ui//evil.example",
            "/ui/\\evil",
            "/v4/buildclusters",
            "/ui/a b",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui/", "{bad}");
        }
        assert_eq!(safe_next(None), "/ui/");
    }

    #[test]
    fn the_token_is_read_from_its_cookie_only() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; sd_ui_token=abc.def"),
        );
        assert_eq!(cookie(&headers, COOKIE), Some("abc.def"));
        let mut other = HeaderMap::new();
        other.append(header::COOKIE, HeaderValue::from_static("xsd_ui_token=abc"));
        assert_eq!(cookie(&other, COOKIE), None);
    }
}
