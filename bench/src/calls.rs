//! The two calls every benchmark mode makes on the processes it measures.

use anyhow::{Result, bail};
use serde_json::json;

/// Registers a build cluster (an existing one of that name is fine: runs may repeat).
pub async fn register(
    http: &reqwest::Client,
    url: &str,
    admin: &str,
    name: &str,
    key_variable: &str,
    weightage: u32,
) -> Result<()> {
    let resp = http
        .post(format!("{url}/v4/buildclusters"))
        .bearer_auth(admin)
        .json(&json!({"name": name, "scmContext": "github:github.com", "managedBy": "screwdriver",
            "managedByEmail": "bench@example.com", "authKey": key_variable, "weightage": weightage}))
        .send()
        .await?;
    if !(resp.status().is_success() || resp.status() == reqwest::StatusCode::CONFLICT) {
        bail!(
            "registering {name}: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// The value of the unlabelled series `name` at the Prometheus endpoint `metrics_url`.
pub async fn gauge(http: &reqwest::Client, metrics_url: &str, name: &str) -> Result<Option<f64>> {
    let text = http.get(metrics_url).send().await?.text().await?;
    Ok(text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
    }))
}
