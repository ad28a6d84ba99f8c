//! A real headless Chromium (Debian's `chromium` and `chromium-driver` packages), driven over
//! the W3C WebDriver protocol that `chromedriver` speaks: a page is loaded, read and clicked as
//! a person's browser would. The protocol is a handful of JSON calls, made here with the
//! reqwest the harness has already (a WebDriver crate would bring a second copy of half the
//! dependency tree for these few calls).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::{Value, json};

/// The key under which WebDriver names an element.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One browser session; the driver (and the browser it started) is killed on drop.
pub struct Browser {
    driver: Child,
    http: reqwest::Client,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts `chromedriver` on a free port and a headless Chromium session of `width` ×
    /// `height` pixels.
    pub async fn start(width: u32, height: u32) -> Result<Self> {
        let port = crate::free_port();
        let mut command = Command::new("chromedriver");
        command
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so the browser it starts goes with it.
        command.process_group(0);
        let driver = command.spawn().context(
            "cannot start chromedriver (install it: apt-get install chromium chromium-driver)",
        )?;
        let profile = tempfile::tempdir()?;
        let mut browser = Self {
            driver,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            session: String::new(),
            _profile: profile,
        };
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = browser
                .http
                .get(format!("{base}/status"))
                .send()
                .await
                .ok()
                .map(|r| r.status().is_success());
            if ready == Some(true) {
                break;
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not answer on port {port} within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--hide-scrollbars", "--force-device-scale-factor=1",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", browser._profile.path().display()),
                ],
            },
        }}});
        let answer = browser
            .call("POST", &format!("{base}/session"), Some(capabilities))
            .await?;
        let id = answer["sessionId"]
            .as_str()
            .context("no session id in chromedriver's answer")?;
        browser.session = format!("{base}/session/{id}");
        Ok(browser)
    }

    async fn call(&self, method: &str, url: &str, body: Option<Value>) -> Result<Value> {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut request = self.http.request(method, url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("WebDriver {url}"))?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("WebDriver {url}: {status} {}", answer["value"]);
        }
        Ok(answer["value"].clone())
    }

    async fn session(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        self.call(method, &format!("{}{path}", self.session), body)
            .await
    }

    /// Loads `url` and waits until it has loaded.
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.session("POST", "/url", Some(json!({"url": url})))
            .await?;
        Ok(())
    }

    /// The address the browser is at now (after redirects).
    pub async fn url(&self) -> Result<String> {
        Ok(self
            .session("GET", "/url", None)
            .await?
            .as_str()
            .unwrap_or("")
            .to_owned())
    }

    async fn elements(&self, css: &str) -> Result<Vec<String>> {
        let found = self
            .session(
                "POST",
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(found
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str().map(str::to_owned))
            .collect())
    }

    async fn element(&self, css: &str) -> Result<String> {
        self.elements(css)
            .await?
            .into_iter()
            .next()
            .with_context(|| format!("no element matches {css}"))
    }

    /// The rendered text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> Result<String> {
        let id = self.element(css).await?;
        Ok(self
            .session("GET", &format!("/element/{id}/text"), None)
            .await?
            .as_str()
            .unwrap_or("")
            .to_owned())
    }

    /// The rendered text of every element matching `css`, in page order.
    pub async fn texts(&self, css: &str) -> Result<Vec<String>> {
        let mut texts = Vec::new();
        for id in self.elements(css).await? {
            let text = self
                .session("GET", &format!("/element/{id}/text"), None)
                .await?;
            texts.push(text.as_str().unwrap_or("").to_owned());
        }
        Ok(texts)
    }

    /// A computed CSS property of the first element matching `css` (a colour, say).
    pub async fn css(&self, css: &str, property: &str) -> Result<String> {
        let id = self.element(css).await?;
        Ok(self
            .session("GET", &format!("/element/{id}/css/{property}"), None)
            .await?
            .as_str()
            .unwrap_or("")
            .to_owned())
    }

    /// Types `text` into the first element matching `css`.
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let id = self.element(css).await?;
        self.session(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await?;
        Ok(())
    }

    /// Clicks the first element matching `css`.
    pub async fn click(&self, css: &str) -> Result<()> {
        let id = self.element(css).await?;
        self.session("POST", &format!("/element/{id}/click"), Some(json!({})))
            .await?;
        Ok(())
    }

    /// The page as the browser shows it, as PNG, written to `path`.
    pub async fn screenshot(&self, path: &std::path::Path) -> Result<()> {
        let data = self.session("GET", "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().context("no screenshot data")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    /// Ends the session (the browser closes); the driver stops on drop.
    pub async fn close(self) -> Result<()> {
        self.call("DELETE", &self.session, None).await?;
        Ok(())
    }
}

/// Debian's binary, or `SD_TEST_CHROMIUM`.
fn chromium() -> String {
    std::env::var("SD_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned())
}

impl Drop for Browser {
    fn drop(&mut self) {
        let pid = self.driver.id() as libc::pid_t;
        // SAFETY: signals the process group this struct started (its pid is the group's id).
        unsafe { libc::killpg(pid, libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}
