//! The `recd` child processes: the commands with the bench's settings, and
//! the `recd serve` under load, on its own copy of a prepared store (or, for
//! `scale_bench`, on a PostgreSQL store). (`scale_bench` uses this module too.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tempfile::TempDir;

pub fn sqlite_url(db: &Path) -> String {
    format!("sqlite://{}", db.display())
}

/// `recd` with the bench's settings and none inherited from the caller.
pub fn recd_command(recd: &Path, url: &str) -> Command {
    let mut cmd = Command::new(recd);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RECD_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RECD_DATABASE_URL", url)
        .env("RECD_TRAIN_INTERVAL", "0")
        .env("RECD_LOG_FORMAT", "text")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

/// Adds settings given as `KEY=VALUE` (from the command line's `flag`) to
/// `command`'s environment.
pub fn with_settings(command: &mut Command, settings: &[String], flag: &str) -> anyhow::Result<()> {
    for setting in settings {
        let (key, value) = setting
            .split_once('=')
            .with_context(|| format!("{flag} {setting:?}: expected KEY=VALUE"))?;
        command.env(key, value);
    }
    Ok(())
}

/// The release `recd` to drive (`given`, or the one `cargo build
/// --release` makes) and the target folder; warns when it is older than
/// the sources.
pub fn release_recd(given: Option<PathBuf>) -> anyhow::Result<(PathBuf, PathBuf)> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo.join("target"), PathBuf::from);
    let recd = given.unwrap_or_else(|| target.join("release/recd"));
    anyhow::ensure!(
        recd.is_file(),
        "no recd binary at {}: run `cargo build --release` first (or give --recd PATH)",
        recd.display()
    );
    crate::system::warn_if_stale(&recd, &repo);
    Ok((recd, target))
}

/// A keep-alive HTTP/1 connection to the server, requests with bodies of
/// type `B`.
pub async fn connect<B>(addr: SocketAddr) -> anyhow::Result<hyper::client::conn::http1::SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

pub fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The server child; killed when dropped, so an error never leaves it running.
pub struct Server {
    child: Child,
    log: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
    /// When it was started.
    pub started: Instant,
    /// The folder of its store and log, removed once it is stopped.
    _run_dir: TempDir,
}

impl Server {
    /// `recd serve` on a fresh copy of the store `db` (impressions written by
    /// one run do not pile up in the cache), on a free local port, with
    /// `settings` (`KEY=VALUE`) in its environment and its output in a log.
    pub fn start(recd: &Path, db: &Path, settings: &[String]) -> anyhow::Result<Server> {
        let run_dir = tempfile::tempdir()?;
        let copy = run_dir.path().join("bench.db");
        std::fs::copy(db, &copy).with_context(|| format!("cannot copy {}", db.display()))?;
        for suffix in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{suffix}", db.display()));
            if side.exists() {
                std::fs::copy(&side, format!("{}{suffix}", copy.display()))?;
            }
        }
        Server::spawn(recd, &sqlite_url(&copy), settings, run_dir)
    }

    /// `recd serve` on the store at `url` (any kind), on a free local port,
    /// with `settings` (`KEY=VALUE`) in its environment and its output in a
    /// log in `run_dir`, which is removed once the server is stopped.
    pub fn spawn(recd: &Path, url: &str, settings: &[String], run_dir: TempDir) -> anyhow::Result<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let log = run_dir.path().join("recd.log");
        let log_file = std::fs::File::create(&log)?;
        let started = Instant::now();
        let mut command = recd_command(recd, url);
        with_settings(&mut command, settings, "--server-env")?;
        let child = command
            .arg("serve")
            .env("RECD_LISTEN", addr.to_string())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("cannot start recd serve")?;
        Ok(Server {
            child,
            log,
            addr,
            started,
            _run_dir: run_dir,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, with the end of its log, if the server has exited; `when`
    /// follows "exited (status)" in the message.
    pub fn ensure_running(&mut self, when: &str) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("recd serve exited ({status}){when}; its log ends:\n{}", self.log_tail());
        }
        Ok(())
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Prints the first few warnings and errors of its log.
    pub fn print_log_warnings(&self) {
        let log = self.log_text();
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .take(10)
            .collect();
        if !warnings.is_empty() {
            println!("!!! recd serve logged warnings or errors (first {}):", warnings.len());
            for line in warnings {
                println!("    {line}");
            }
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, then up to 15 s for a graceful stop.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    println!(
                        "!!! recd serve exited with {status}; its log ends:\n{}",
                        self.log_tail()
                    );
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("!!! recd serve did not stop within 15 s of SIGTERM; killing it");
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `/healthz` until it answers 200; fails if the child exits first.
pub async fn wait_healthy(server: &mut Server, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("http://{}/healthz", server.addr);
    let deadline = Instant::now() + timeout;
    loop {
        server.ensure_running(" before answering")?;
        if let Ok(reply) = client.get(&url).timeout(Duration::from_secs(2)).send().await {
            if reply.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "recd serve did not answer /healthz within {timeout:?}; its log ends:\n{}",
                server.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits while the served model's nearest-neighbour index is building
/// (large catalogues) and while the recently active users' states are made:
/// the load measures the service as it runs afterwards.
pub async fn wait_for_index(server: &mut Server, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/model", server.addr);
    let started = Instant::now();
    loop {
        server.ensure_running("")?;
        let body: serde_json::Value = client.get(&url).send().await?.json().await?;
        let (index, warm) = (&body["index"], &body["warm"]);
        if index["state"] != "building" && warm["state"] != "warming" {
            println!(
                "ranking: {}; user states: {} (waited {:.0} s)",
                serde_json::to_string(index)?,
                serde_json::to_string(warm)?,
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("the index was still building or the states warming after {timeout:?}: {body}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
