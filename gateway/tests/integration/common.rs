use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn models_dir() -> PathBuf {
    std::env::var_os("RAGWAY_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

/// A `ragway serve` process on a free port, killed on drop.
pub struct Server {
    child: Child,
    pub url: String,
    pub log: Arc<Mutex<Vec<String>>>,
    _data: PathBuf,
    keep_data: bool,
}

impl Server {
    /// Starts the binary with extra flags and waits for its listening line.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_with_models(&models_dir(), extra)
    }

    /// Starts the binary with another models directory.
    pub fn start_with_models(models: &std::path::Path, extra: &[&str]) -> Server {
        // Under cargo's scratch folder for integration tests: the shared servers live in
        // statics that never drop, so their folders outlive the run; there they stay out of /tmp.
        let data = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "ragway-gw-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        Self::spawn(models, data, false, extra)
    }

    /// Starts the binary on a data directory that outlives it (restarts, crash tests).
    pub fn start_in(data: &std::path::Path, extra: &[&str]) -> Server {
        Self::spawn(&models_dir(), data.to_path_buf(), true, extra)
    }

    fn spawn(models: &std::path::Path, data: PathBuf, keep_data: bool, extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ragway"));
        cmd.args(["serve", "--host", "127.0.0.1", "--port", "0", "--http-workers", "2"])
            .arg("--models-dir")
            .arg(models)
            .arg("--data-dir")
            .arg(&data)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("HF_HUB_OFFLINE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_tied(cmd);
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listening on http://") {
                    // Text or JSON log lines: the address ends at a quote or a space.
                    let rest = &line[i + "listening on ".len()..];
                    let end = rest.find(|c: char| c == '"' || c.is_whitespace()).unwrap_or(rest.len());
                    let _ = tx.send(rest[..end].to_string());
                }
                log2.lock().unwrap().push(line);
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("server did not start: {:?}", log.lock().unwrap()));
        Server { child, url, log, _data: data, keep_data }
    }

    /// SIGTERM: a graceful stop.
    pub fn terminate(&self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill -TERM");
        assert!(ok.success());
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether a line of the server's log so far contains `needle`.
    pub fn log_has(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// The value of the last `key=value` field in the server's log so far.
    pub fn log_field(&self, key: &str) -> Option<String> {
        let needle = format!("{key}=");
        let log = self.log.lock().unwrap();
        let line = log.iter().rev().find(|l| l.contains(&needle))?;
        let rest = &line[line.find(&needle)? + needle.len()..];
        Some(rest.split_whitespace().next().unwrap_or("").to_string())
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            if let Ok(r) = client().get(format!("{}/ready", self.url)).send() {
                if r.status() == 200 {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("server never became ready: {:?}", self.log.lock().unwrap());
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = client().post(format!("{}{path}", self.url)).json(body).send().expect("request");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        let r = client().delete(format!("{}{path}", self.url)).send().expect("request");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = client().get(format!("{}{path}", self.url)).send().expect("request");
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exit status if the process has ended.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.keep_data {
            let _ = std::fs::remove_dir_all(&self._data);
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Spawns a child that dies with this test process (the shared server lives in a static
/// that is never dropped). `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, so
/// every child is forked by one keeper thread that lives as long as the process.
fn spawn_tied(mut cmd: Command) -> Child {
    use std::os::unix::process::CommandExt;
    type Req = (Command, mpsc::Sender<std::io::Result<Child>>);
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Req>>> = OnceLock::new();
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Req>();
        std::thread::spawn(move || {
            for (mut c, reply) in rx {
                let _ = reply.send(c.spawn());
            }
        });
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    keeper.lock().unwrap().send((cmd, tx)).expect("keeper thread");
    rx.recv().expect("keeper reply").expect("spawn ragway")
}

pub fn client() -> &'static reqwest::blocking::Client {
    static C: OnceLock<reqwest::blocking::Client> = OnceLock::new();
    C.get_or_init(|| reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap())
}

/// One ready server shared by the tests that do not need their own.
pub fn shared() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let s = Server::start(&[]);
        s.wait_ready();
        s
    })
}

/// Asserts OpenAI's error shape and returns the error object.
pub fn assert_openai_error(status: u16, body: &Value, want_status: u16) -> &Value {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{body}");
    e
}
