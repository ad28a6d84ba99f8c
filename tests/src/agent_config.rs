//! `agent.toml` for a real `sd-agent` process with the process executor, built from the
//! settings a test cares about: what is not set is left out, so the agent's defaults apply.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An `sd-agent` configuration file's text, rendered by [`render`](Self::render).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    cluster: String,
    scheduler_url: String,
    request_timeout: Option<Duration>,
    private_key_file: PathBuf,
    algorithm: Option<String>,
    poll_wait: Option<Duration>,
    poll_max_jobs: Option<u32>,
    redis_url: Option<String>,
    max_in_flight: Option<u32>,
    launch_lease: Option<Duration>,
    command: Vec<String>,
    work_dir: Option<PathBuf>,
    shutdown_timeout: Option<Duration>,
    health_port: Option<u16>,
    log_format: Option<String>,
    log_level: Option<String>,
    screwdriver_apis: Vec<String>,
    extra: String,
}

impl AgentConfig {
    /// The agent of `cluster`, polling the scheduler at `scheduler_url` with the key in
    /// `private_key_file`.
    pub fn new(cluster: &str, scheduler_url: &str, private_key_file: &Path) -> Self {
        Self {
            cluster: cluster.to_owned(),
            scheduler_url: scheduler_url.to_owned(),
            request_timeout: None,
            private_key_file: private_key_file.to_owned(),
            algorithm: None,
            poll_wait: None,
            poll_max_jobs: None,
            redis_url: None,
            max_in_flight: None,
            launch_lease: None,
            command: Vec::new(),
            work_dir: None,
            shutdown_timeout: None,
            health_port: None,
            log_format: None,
            log_level: None,
            screwdriver_apis: Vec::new(),
            extra: String::new(),
        }
    }

    /// `scheduler.request_timeout`.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = Some(d);
        self
    }

    /// `auth.algorithm` (`ES256`, `RS256`…).
    pub fn algorithm(mut self, algorithm: &str) -> Self {
        self.algorithm = Some(algorithm.to_owned());
        self
    }

    /// `poll.wait`.
    pub fn poll_wait(mut self, d: Duration) -> Self {
        self.poll_wait = Some(d);
        self
    }

    /// `poll.max_jobs`.
    pub fn poll_max_jobs(mut self, n: u32) -> Self {
        self.poll_max_jobs = Some(n);
        self
    }

    /// `redis.url`: the cluster's local Redis.
    pub fn redis(mut self, url: &str) -> Self {
        self.redis_url = Some(url.to_owned());
        self
    }

    /// `executor.max_in_flight`.
    pub fn max_in_flight(mut self, n: u32) -> Self {
        self.max_in_flight = Some(n);
        self
    }

    /// `executor.launch_lease`.
    pub fn launch_lease(mut self, d: Duration) -> Self {
        self.launch_lease = Some(d);
        self
    }

    /// `executor.process.command`.
    pub fn command<S: Into<String>>(mut self, command: impl IntoIterator<Item = S>) -> Self {
        self.command = command.into_iter().map(Into::into).collect();
        self
    }

    /// `executor.process.command` running the script at `path` (a
    /// [`Launcher`](crate::launcher::Launcher)'s) with `/bin/sh`.
    pub fn launcher(self, path: &Path) -> Self {
        self.command(["/bin/sh".to_owned(), path.display().to_string()])
    }

    /// `executor.process.work_dir`.
    pub fn work_dir(mut self, dir: &Path) -> Self {
        self.work_dir = Some(dir.to_owned());
        self
    }

    /// `shutdown_timeout`.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = Some(d);
        self
    }

    /// `health.listen` on 127.0.0.1.
    pub fn health_port(mut self, port: u16) -> Self {
        self.health_port = Some(port);
        self
    }

    /// `log.format` (`json`, `text`).
    pub fn log_format(mut self, format: &str) -> Self {
        self.log_format = Some(format.to_owned());
        self
    }

    /// `log.level` (a tracing filter: `info,sd_agent=debug`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = Some(level.to_owned());
        self
    }

    /// Adds `url` to `screwdriver.api_uris` (the agent requires at least one); a plain
    /// `http://` one also sets `screwdriver.allow_http`.
    pub fn screwdriver_api(mut self, url: &str) -> Self {
        self.screwdriver_apis.push(url.to_owned());
        self
    }

    /// TOML appended as is after everything else (so it starts with a `[table]` header, of a
    /// table not rendered already).
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// The file's text. The executor is always the process executor.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(d) = self.shutdown_timeout {
            line(&mut s, "shutdown_timeout", &duration(d));
        }
        s.push_str("[cluster]\n");
        line(&mut s, "name", &string(&self.cluster));
        s.push_str("[scheduler]\n");
        line(&mut s, "url", &string(&self.scheduler_url));
        if let Some(d) = self.request_timeout {
            line(&mut s, "request_timeout", &duration(d));
        }
        s.push_str("[auth]\n");
        line(&mut s, "private_key_file", &path(&self.private_key_file));
        if let Some(a) = &self.algorithm {
            line(&mut s, "algorithm", &string(a));
        }
        if self.poll_wait.is_some() || self.poll_max_jobs.is_some() {
            s.push_str("[poll]\n");
            if let Some(d) = self.poll_wait {
                line(&mut s, "wait", &duration(d));
            }
            if let Some(n) = self.poll_max_jobs {
                line(&mut s, "max_jobs", &n.to_string());
            }
        }
        if let Some(url) = &self.redis_url {
            s.push_str("[redis]\n");
            line(&mut s, "url", &string(url));
        }
        s.push_str("[executor]\n");
        line(&mut s, "kind", &string("process"));
        if let Some(n) = self.max_in_flight {
            line(&mut s, "max_in_flight", &n.to_string());
        }
        if let Some(d) = self.launch_lease {
            line(&mut s, "launch_lease", &duration(d));
        }
        s.push_str("[executor.process]\n");
        if !self.command.is_empty() {
            let words: Vec<String> = self.command.iter().map(|w| string(w)).collect();
            line(&mut s, "command", &format!("[{}]", words.join(", ")));
        }
        if let Some(dir) = &self.work_dir {
            line(&mut s, "work_dir", &path(dir));
        }
        // The tests' launchers are their own stand-ins: trusted builds.
        line(&mut s, "allow_agent_user", "true");
        if !self.screwdriver_apis.is_empty() {
            s.push_str("[screwdriver]\n");
            let urls: Vec<String> = self.screwdriver_apis.iter().map(|u| string(u)).collect();
            line(&mut s, "api_uris", &format!("[{}]", urls.join(", ")));
            if self
                .screwdriver_apis
                .iter()
                .any(|u| u.starts_with("http://"))
            {
                line(&mut s, "allow_http", "true");
            }
        }
        if let Some(port) = self.health_port {
            s.push_str("[health]\n");
            line(&mut s, "listen", &string(&format!("127.0.0.1:{port}")));
        }
        if self.log_format.is_some() || self.log_level.is_some() {
            s.push_str("[log]\n");
            if let Some(f) = &self.log_format {
                line(&mut s, "format", &string(f));
            }
            if let Some(l) = &self.log_level {
                line(&mut s, "level", &string(l));
            }
        }
        s.push_str(&self.extra);
        s
    }

    /// Writes the file to `path` and returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.render()).expect("write the agent config");
        path.to_owned()
    }
}

fn line(s: &mut String, key: &str, value: &str) {
    let _ = writeln!(s, "{key} = {value}");
}

/// A TOML basic string.
fn string(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn path(p: &Path) -> String {
    string(&p.display().to_string())
}

/// A duration as the agent reads it (humantime): whole seconds as `5s`, else milliseconds.
fn duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        string(&format!("{}s", d.as_secs()))
    } else {
        string(&format!("{}ms", d.as_millis()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_is_set_and_nothing_else() {
        let text = AgentConfig::new("ios-farm", "http://127.0.0.1:9", Path::new("/k/key.pem"))
            .algorithm("ES256")
            .command(["/bin/true"])
            .health_port(4000)
            .shutdown_timeout(Duration::from_secs(5))
            .extra_toml("[poll]\nwiat = \"30s\"\n")
            .render();
        assert_eq!(
            text,
            "shutdown_timeout = \"5s\"\n[cluster]\nname = \"ios-farm\"\n\
             [scheduler]\nurl = \"http://127.0.0.1:9\"\n\
             [auth]\nprivate_key_file = \"/k/key.pem\"\nalgorithm = \"ES256\"\n\
             [executor]\nkind = \"process\"\n[executor.process]\ncommand = [\"/bin/true\"]\n\
             allow_agent_user = true\n[health]\nlisten = \"127.0.0.1:4000\"\n[poll]\nwiat = \"30s\"\n"
        );
    }

    #[test]
    fn every_setting_lands_in_its_table() {
        let text = AgentConfig::new("linux", "http://s", Path::new("/k/\"odd\".pem"))
            .request_timeout(Duration::from_secs(3))
            .poll_wait(Duration::from_millis(2500))
            .poll_max_jobs(10)
            .redis("redis://127.0.0.1:6379")
            .max_in_flight(20)
            .launch_lease(Duration::from_secs(5))
            .launcher(Path::new("/h/launch.sh"))
            .work_dir(Path::new("/h/work"))
            .shutdown_timeout(Duration::from_secs(10))
            .health_port(4001)
            .screwdriver_api("http://127.0.0.1:9")
            .screwdriver_api("https://api.sd.example")
            .log_format("json")
            .log_level("info,sd_agent=debug")
            .render();
        let v: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(v["shutdown_timeout"].as_str(), Some("10s"));
        assert_eq!(v["cluster"]["name"].as_str(), Some("linux"));
        assert_eq!(v["scheduler"]["request_timeout"].as_str(), Some("3s"));
        assert_eq!(
            v["auth"]["private_key_file"].as_str(),
            Some("/k/\"odd\".pem")
        );
        assert_eq!(v["poll"]["wait"].as_str(), Some("2500ms"));
        assert_eq!(v["poll"]["max_jobs"].as_integer(), Some(10));
        assert_eq!(v["redis"]["url"].as_str(), Some("redis://127.0.0.1:6379"));
        let executor = &v["executor"];
        assert_eq!(executor["kind"].as_str(), Some("process"));
        assert_eq!(executor["max_in_flight"].as_integer(), Some(20));
        assert_eq!(executor["launch_lease"].as_str(), Some("5s"));
        let command: Vec<&str> = executor["process"]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        assert_eq!(command, ["/bin/sh", "/h/launch.sh"]);
        assert_eq!(executor["process"]["work_dir"].as_str(), Some("/h/work"));
        assert_eq!(v["health"]["listen"].as_str(), Some("127.0.0.1:4001"));
        let apis: Vec<&str> = v["screwdriver"]["api_uris"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap())
            .collect();
        assert_eq!(apis, ["http://127.0.0.1:9", "https://api.sd.example"]);
        assert_eq!(v["screwdriver"]["allow_http"].as_bool(), Some(true));
        assert_eq!(v["log"]["format"].as_str(), Some("json"));
        assert_eq!(v["log"]["level"].as_str(), Some("info,sd_agent=debug"));
    }
}
