//! The status pages over HTTP: the sign-in (once, with a user token, into an HttpOnly cookie),
//! `ui.open`, and that each page shows what the API says.

mod common;

use std::time::Duration;

use common::{Harness, build_for, cluster};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_SECURITY_POLICY, LOCATION, SET_COOKIE};
use sd_testkit::Backend;
use serde_json::{Value, json};

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn get(
    h: &Harness,
    path: &str,
    cookie: Option<&str>,
) -> (StatusCode, String, reqwest::header::HeaderMap) {
    let mut request = client().get(format!("{}{path}", h.base));
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    (status, response.text().await.unwrap(), headers)
}

async fn sign_in(h: &Harness, token: &str, next: &str) -> reqwest::Response {
    client()
        .post(format!("{}/ui/login", h.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            form_urlencoded::Serializer::new(String::new())
                .append_pair("token", token)
                .append_pair("next", next)
                .finish(),
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_pages_ask_once_for_a_user_token_and_show_what_the_api_says() {
    let h = Harness::start(Backend::Sqlite).await;
    let keys = h
        .cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    for (id, blocked_by) in [(1, json!([])), (2, json!([100]))] {
        let mut body = build_for("east", id);
        body["jobId"] = json!(100);
        body["blockedBy"] = blocked_by;
        h.submit_until_accepted(body, Duration::from_secs(5)).await;
        if id == 1 {
            let jobs = h.poll("east", &keys, 0, 1).await;
            let delivery = jobs[0]["deliveryId"].as_str().unwrap();
            h.lease_call("east", &keys, "ack", &[delivery]).await;
        }
    }
    assert!(
        h.poll("east", &keys, 0, 1).await.is_empty(),
        "2 is held back"
    );

    // Not signed in: sent to the sign-in form, which returns to the page asked for.
    let (status, _, headers) = get(&h, "/ui/clusters/east", None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[LOCATION], "/ui/login?next=%2Fui%2Fclusters%2Feast");
    let (status, form, _) = get(&h, "/ui/login?next=%2Fui%2Fclusters%2Feast", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        form.contains(r#"<input type="hidden" name="next" value="/ui/clusters/east">"#),
        "{form}"
    );

    // Refused tokens say why; an sdapi token is not enough.
    for (token, says) in [
        ("not-a-jwt".to_owned(), "This token was refused"),
        (h.sdapi(), "neither scope user nor admin"),
    ] {
        let response = sign_in(&h, &token, "/ui/").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().get(SET_COOKIE).is_none());
        assert!(response.text().await.unwrap().contains(says));
    }
    // A sign-in never leaves the status pages.
    let response = sign_in(&h, &h.user(), "https://evil.example/").await;
    assert_eq!(response.headers()[LOCATION], "/ui/");

    let response = sign_in(&h, &h.user(), "/ui/clusters/east").await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()[LOCATION], "/ui/clusters/east");
    let set = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(set.starts_with("sd_ui_token="), "{set}");
    for attribute in ["Path=/ui", "HttpOnly", "SameSite=Strict", "Max-Age=43200"] {
        assert!(set.contains(attribute), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_owned();

    // The table: the same figures as the API.
    let (_, api) = h
        .call(
            reqwest::Method::GET,
            "/v4/buildclusters/east/status",
            Some(&h.user()),
            None,
        )
        .await;
    let (status, table, headers) = get(&h, "/ui/", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK, "{table}");
    assert!(
        headers[CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'")
    );
    assert!(!table.contains("<script"));
    assert!(table.contains(r#"<tr data-cluster="east">"#), "{table}");
    for (class, figure) in [
        ("ready", "ready"),
        ("leased", "leased"),
        ("blocked", "blocked"),
        ("dead", "dead"),
    ] {
        let cell = format!(r#"<td class="n {class}">{}</td>"#, api["queue"][figure]);
        assert!(table.contains(&cell), "{cell} in {table}");
    }
    assert_eq!(api["queue"]["blocked"], 1, "{api}");
    let dispatched = format!(
        r#"<td class="n dispatched">{}</td>"#,
        api["dispatchedLastHour"]
    );
    assert!(table.contains(&dispatched), "{table}");

    // The cluster's page: the blocked build and why.
    let (status, page, _) = get(&h, "/ui/clusters/east", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(r#"<a href="/ui/builds/2">2</a>"#), "{page}");
    assert!(
        page.contains("blocked by a running build of job 100"),
        "{page}"
    );
    assert!(
        page.contains("<td>unknown</td>"),
        "the test's agent sends no report: {page}"
    );

    // A build's page: its steps.
    let (_, view) = h
        .call(reqwest::Method::GET, "/v1/builds/1", Some(&h.user()), None)
        .await;
    let (status, page, _) = get(&h, "/ui/builds/1", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    let states: Vec<&str> = view["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s: &Value| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["queued", "dispatched"], "{view}");
    let shown: Vec<&str> = page
        .split(r#"<strong class="state">"#)
        .skip(1)
        .map(|rest| rest.split('<').next().unwrap())
        .collect();
    assert_eq!(shown, states, "{page}");

    let (status, _, _) = get(&h, "/ui/builds/999", Some(&cookie)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = get(&h, "/ui/clusters/nope", Some(&cookie)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = get(&h, "/ui/", Some("sd_ui_token=forged")).await;
    assert_eq!(
        status,
        StatusCode::SEE_OTHER,
        "a forged cookie is not a sign-in"
    );
}

#[tokio::test]
async fn open_pages_need_no_token() {
    let h = Harness::start_with(Backend::Sqlite, |c| c.ui.open = true).await;
    h.cluster_with_key(&cluster("east", "screwdriver", &[]))
        .await;
    let (status, page, _) = get(&h, "/ui/", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(r#"<tr data-cluster="east">"#), "{page}");
    let (status, css, _) = get(&h, "/ui/style.css", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(css.contains(".health.silent"));
}
