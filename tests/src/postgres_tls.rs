//! A throwaway PostgreSQL server with TLS, its certificate from a [`TestCa`]: RDS as a test can
//! run it, to hold `sslmode=verify-full` with `sslrootcert` to what it promises. Started with
//! the Debian package's `initdb` and `postgres` on a free port, as the `postgres` user when the
//! test runs as root (PostgreSQL refuses to run as root).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{TestCa, free_port};

pub struct PgTls {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl PgTls {
    /// Initialises a cluster (superuser `sd`, trusted over TLS from localhost only) and starts
    /// it with `ssl = on` and a server certificate from `ca`.
    pub fn start(ca: &TestCa) -> Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let cert = ca.server("postgres");
        let (cert_file, key_file) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::copy(&cert.cert, &cert_file)?;
        std::fs::copy(&cert.key, &key_file)?;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
        let data = dir.path().join("data");
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        if as_root {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()?;
            if !status.success() {
                bail!("chown postgres {} failed", dir.path().display());
            }
        }
        // As root, the programs run as the postgres user directly (no runuser in between, so
        // the child this struct holds is the postmaster itself).
        let account = if as_root {
            Some(postgres_account()?)
        } else {
            None
        };
        let run = |program: PathBuf| {
            let mut cmd = Command::new(program);
            if let Some((uid, gid)) = account {
                use std::os::unix::process::CommandExt;
                cmd.uid(uid).gid(gid);
            }
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            cmd
        };
        let init = run(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "sd", "--auth=trust", "--no-sync"])
            .output()
            .context("initdb")?;
        if !init.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&init.stderr));
        }
        // TLS connections from localhost only; no plain TCP at all.
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )?;
        let port = free_port();
        let child = run(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-p")
            .arg(port.to_string())
            .arg("-k")
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "ssl=on",
                "-c",
                "fsync=off",
            ])
            .arg("-c")
            .arg(format!("ssl_cert_file={}", cert_file.display()))
            .arg("-c")
            .arg(format!("ssl_key_file={}", key_file.display()))
            .stderr(Stdio::null())
            .spawn()
            .context("postgres")?;
        let server = Self {
            port,
            child: Some(child),
            dir,
        };
        server.wait_ready(&bin)?;
        Ok(server)
    }

    /// `postgres://sd@localhost:PORT/postgres` with `query` appended (`sslmode=…`).
    pub fn url(&self, query: &str) -> String {
        format!("postgres://sd@localhost:{}/postgres?{query}", self.port)
    }

    fn wait_ready(&self, bin: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()?;
            if ready.success() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "PostgreSQL with TLS did not start on port {} (data in {})",
            self.port,
            self.dir.path().display()
        )
    }
}

impl Drop for PgTls {
    /// An immediate shutdown (SIGQUIT): the postmaster takes its backends and shared memory
    /// with it, which SIGKILL would leave behind.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: signals the postmaster this struct started.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
            }
            let _ = child.wait();
        }
    }
}

/// The `postgres` user's uid and gid (Debian's package creates it).
fn postgres_account() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("no postgres user (id postgres)")
    };
    Ok((id("-u")?, id("-g")?))
}

/// The newest installed PostgreSQL's binaries (Debian: /usr/lib/postgresql/<version>/bin).
fn bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (/usr/lib/postgresql); scripts/test installs it")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no PostgreSQL with initdb under /usr/lib/postgresql")
}
