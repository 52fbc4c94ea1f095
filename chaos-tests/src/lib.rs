//! A harness for tests that run real `maas` processes: start one with its own data
//! directory and configuration, learn its address from its banner, signal it, kill it,
//! and wait for it to exit.
//!
//! The binary is `target/<profile>/maas` beside this test executable (built by
//! `cargo nextest run --workspace`), or `$MAAS_BIN`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// The `maas` binary under test.
pub fn maas_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MAAS_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/<profile>/deps/<test> -> target/<profile>/maas
    let path = exe.parent().and_then(Path::parent).expect("tests run from target/<profile>/deps").join("maas");
    assert!(
        path.exists(),
        "{} does not exist: build it with `cargo build -p maas-node` or set MAAS_BIN",
        path.display()
    );
    path
}

/// A running `maas` process.
pub struct MaasProcess {
    child: Child,
    /// `http://IP:PORT` of its API.
    pub base_url: String,
    pub data_dir: PathBuf,
    stderr_lines: mpsc::Receiver<String>,
    temp_dir: Option<tempfile::TempDir>,
}

impl MaasProcess {
    /// Starts `maas node start` with `config` (TOML) written to a fresh temporary
    /// directory that also holds its data; `listen.api` should use port 0.
    pub fn start_with_config(config: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("cluster.toml");
        std::fs::write(&config_path, format!("{config}\n"))?;
        let mut command = Command::new(maas_binary());
        command.args(["node", "start", "--config"]).arg(&config_path).env("MAAS_DATA", &data_dir);
        let mut process = Self::spawn(command, data_dir)?;
        process.temp_dir = Some(dir);
        Ok(process)
    }

    /// Starts `maas node start` on `dir/cluster.toml` with its data in `dir/data`: the same
    /// `dir` again restarts the same node.
    pub fn start_in(dir: &Path) -> Result<Self> {
        let mut command = Command::new(maas_binary());
        command.args(["node", "start", "--config"]).arg(dir.join("cluster.toml")).env("MAAS_DATA", dir.join("data"));
        Self::spawn(command, dir.join("data"))
    }

    /// Starts `command` (a `maas` invocation) and waits for its banner.
    pub fn spawn(mut command: Command, data_dir: PathBuf) -> Result<Self> {
        let mut child = command
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting maas")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_lines = forward_lines(child.stderr.take().expect("piped stderr"));
        let (url_sender, url_receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.trim_start().strip_prefix("api") {
                    let url = rest.split_whitespace().next().unwrap_or_default().to_owned();
                    let _ = url_sender.send(url);
                }
            }
        });
        let Ok(base_url) = url_receiver.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            let _ = child.wait();
            let stderr: Vec<String> = stderr_lines.try_iter().collect();
            bail!("maas printed no banner; stderr:\n{}", stderr.join("\n"));
        };
        Ok(MaasProcess { child, base_url, data_dir, stderr_lines, temp_dir: None })
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pids fit in i32"))
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(self.pid(), signal).context("signalling maas")
    }

    /// The address part of `base_url`, for raw TCP checks.
    pub fn api_addr(&self) -> &str {
        self.base_url.trim_start_matches("http://")
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("maas did not exit within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `/readyz` answers 200 (the store is migrated and the node registered).
    pub async fn wait_ready(&self, limit: Duration) -> Result<()> {
        let url = format!("{}/readyz", self.base_url);
        wait_until("the node is ready", limit, || {
            let url = url.clone();
            async move { reqwest::get(url).await.is_ok_and(|r| r.status().is_success()) }
        })
        .await
    }

    /// Everything the process has written to stderr so far.
    pub fn stderr_so_far(&self) -> Vec<String> {
        self.stderr_lines.try_iter().collect()
    }
}

impl Drop for MaasProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn forward_lines(stderr: ChildStderr) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

/// Waits (bounded) until `condition` holds, polling the system under test.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Whether nothing accepts TCP connections at `addr` any more.
pub async fn refuses_connections(addr: &str) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

/// The configuration of a node with one simulated 80 GiB GPU, loopback ports chosen by the
/// system, and `cookie`; `extra` is appended to the `[cluster]` section.
pub fn one_gpu_node_config(cookie: &str, extra_cluster: &str) -> String {
    format!(
        "[node]\n[[node.simulated_gpus]]\nmodel = \"H100\"\nmemory_mib = 81920\ncount = 1\n\
         [listen]\napi = \"127.0.0.1:0\"\ncluster = \"127.0.0.1:0\"\n[cluster]\ncookie = \"{cookie}\"\n{extra_cluster}"
    )
}

/// Runs a `maas` admin command against the node at `base_url` with `cookie`; it must
/// succeed.
pub fn run_cli(base_url: &str, cookie: &str, args: &[&str]) {
    let output = Command::new(maas_binary())
        .args(args)
        .args(["--cookie", cookie, "--server", base_url])
        .output()
        .expect("the maas binary runs");
    assert!(output.status.success(), "maas {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Writes a tiny random-weight model of `arch` (`llama`, `qwen2`, `bert`, `llama-gguf`) to
/// `out` with `maas dev tiny-model`.
pub fn tiny_model(arch: &str, out: &Path) {
    let made =
        Command::new(maas_binary()).args(["dev", "tiny-model", "--arch", arch]).arg(out).output().expect("maas runs");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
}

/// The cookie of a node started with `maas up` (cluster.cookie's default).
pub const DEFAULT_COOKIE: &str = "maas-dev-cookie";

/// A client that presents the cluster cookie on every request: the tests act as the
/// node's built-in administrator, as the admin CLI does.
pub fn admin_client(cookie: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "x-maas-cluster-cookie",
        reqwest::header::HeaderValue::from_str(cookie).expect("a cookie is a header value"),
    );
    reqwest::Client::builder().default_headers(headers).build().expect("a reqwest client")
}

/// `GET url` with the cluster cookie.
pub async fn admin_get(cookie: &str, url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    admin_client(cookie).get(url).send().await
}

/// `GET url` with the cluster cookie, as JSON.
pub async fn admin_get_json(cookie: &str, url: impl reqwest::IntoUrl) -> serde_json::Value {
    admin_get(cookie, url).await.expect("the node answers").json().await.expect("the answer is JSON")
}

/// `POST url` with the cluster cookie and a multipart form: the `fields` (name, value),
/// then one part `file` named `filename` of type `content_type` holding `bytes` (as the
/// OpenAI SDK and the console send uploads).
pub async fn post_multipart(
    cookie: &str,
    url: &str,
    fields: &[(&str, &str)],
    file: (&str, &str, &[u8]),
) -> reqwest::Response {
    post_multipart_with(&admin_client(cookie), url, fields, file).await
}

/// A client that sends `token` as a bearer token on every request (a user's session or key).
pub fn bearer_client(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("a token is a header value");
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder().default_headers(headers).build().expect("a reqwest client")
}

/// [`post_multipart`] with any client.
pub async fn post_multipart_with(
    client: &reqwest::Client,
    url: &str,
    fields: &[(&str, &str)],
    (filename, content_type, bytes): (&str, &str, &[u8]),
) -> reqwest::Response {
    let boundary = "maas-chaos-test-boundary";
    let mut form = Vec::new();
    for (name, value) in fields {
        form.extend_from_slice(
            format!("--{boundary}\r\ncontent-disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    form.extend_from_slice(
        format!(
            "--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
             content-type: {content_type}\r\n\r\n"
        )
        .as_bytes(),
    );
    form.extend_from_slice(bytes);
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    client
        .post(url)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(form)
        .send()
        .await
        .expect("the node answers")
}

/// Signs up `email` (the node's first sign-up becomes its administrator), verifies it
/// with the code from the outbox and signs it in: its session token and user id.
pub async fn signed_up(base_url: &str, cookie: &str, email: &str) -> (String, String) {
    let admin = admin_client(cookie);
    let base = base_url;
    let password = "plum-Harbour-sings-92-quietly";
    let created = admin
        .post(format!("{base}/v1/auth/signup"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let outbox: Value =
        admin.get(format!("{base}/v1/admin/outbox?recipient={email}")).send().await.unwrap().json().await.unwrap();
    if let Some(message) = outbox["data"][0]["body"].as_str() {
        let code: String = message.chars().filter(char::is_ascii_digit).take(6).collect();
        let verified = admin
            .post(format!("{base}/v1/auth/verify"))
            .json(&json!({"login": email, "code": code}))
            .send()
            .await
            .unwrap();
        assert_eq!(verified.status(), 200);
    }
    let signed_in: Value = admin
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({"login": email, "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = signed_in["token"].as_str().unwrap_or_else(|| panic!("{email} signs in: {signed_in}")).to_owned();
    (token, signed_in["user"]["id"].as_str().unwrap().to_owned())
}
