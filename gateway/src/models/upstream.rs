//! A model version served by upstream OpenAI-compatible servers (other ragway instances,
//! vLLM, TGI, llama.cpp's server): a pool of endpoints with health checks, least-busy
//! balancing, retries on connection failures, timeouts and a circuit breaker per endpoint.
//!
//! - **Balancing**: the endpoint with the fewest requests in flight among those whose
//!   circuit is closed and whose last health check passed; ties go round-robin.
//! - **Retries**: a request that never reached an upstream (refused or reset connection) or
//!   got 502/503/504 goes to the next endpoint, up to `retries` more times. A request that
//!   timed out or got another answer is not retried: generation is not idempotent.
//! - **Circuit breaking**: `failure_threshold` consecutive failures open an endpoint's circuit
//!   for `cooldown_s`; then one request may try it (half-open) and closes it on success.
//! - **Health checks**: `GET <endpoint><health_path>` every `health_interval_s` seconds.

use ragway_engine::generate::scheduler::Histogram;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where and how a version's upstream servers are reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    /// Base URLs, e.g. `http://10.0.0.5:8080` (requests go to `<url>/v1/...`).
    pub endpoints: Vec<String>,
    /// The model name sent upstream [default: the public name].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Bearer token for the upstreams (never shown by the admin API).
    #[serde(default, skip_serializing)]
    pub api_key: Option<String>,
    /// Seconds until an upstream's response head (and, unstreamed, its whole body).
    #[serde(default = "d_timeout")]
    pub timeout_s: f64,
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout_s: f64,
    /// Further endpoints tried after a connection failure or a 502/503/504.
    #[serde(default = "d_retries")]
    pub retries: usize,
    #[serde(default = "d_health_path")]
    pub health_path: String,
    #[serde(default = "d_health_interval")]
    pub health_interval_s: f64,
    /// Consecutive failures that open an endpoint's circuit.
    #[serde(default = "d_threshold")]
    pub failure_threshold: u32,
    /// Seconds an open circuit keeps traffic away.
    #[serde(default = "d_cooldown")]
    pub cooldown_s: f64,
}

fn d_timeout() -> f64 {
    120.0
}
fn d_connect_timeout() -> f64 {
    2.0
}
fn d_retries() -> usize {
    2
}
fn d_health_path() -> String {
    "/health".into()
}
fn d_health_interval() -> f64 {
    5.0
}
fn d_threshold() -> u32 {
    3
}
fn d_cooldown() -> f64 {
    10.0
}

impl UpstreamSpec {
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.endpoints.is_empty() {
            return Err(("upstream.endpoints".into(), "an upstream needs at least one endpoint".into()));
        }
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(("upstream.endpoints".into(), format!("at most {MAX_ENDPOINTS} endpoints")));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            let ok = (e.starts_with("http://") || e.starts_with("https://"))
                && reqwest::Url::parse(e).is_ok_and(|u| u.host_str().is_some());
            if !ok {
                return Err((format!("upstream.endpoints[{i}]"), format!("`{e}` is not an http(s) URL")));
            }
        }
        if self.retries > MAX_ENDPOINTS {
            return Err(("upstream.retries".into(), format!("retries must be at most {MAX_ENDPOINTS}")));
        }
        if !self.health_path.starts_with('/') || self.health_path.len() > 256 {
            return Err(("upstream.health_path".into(), "health_path is a path starting with `/`".into()));
        }
        let positive = [
            ("upstream.timeout_s", self.timeout_s),
            ("upstream.connect_timeout_s", self.connect_timeout_s),
            ("upstream.health_interval_s", self.health_interval_s),
            ("upstream.cooldown_s", self.cooldown_s),
        ];
        for (name, v) in positive {
            // Bounded so that Duration::from_secs_f64 and deadline arithmetic cannot overflow.
            if !(v > 0.0 && v <= MAX_SECONDS) {
                return Err((name.into(), format!("{name} must be a positive number of seconds, at most {MAX_SECONDS}")));
            }
        }
        if self.failure_threshold == 0 {
            return Err(("upstream.failure_threshold".into(), "failure_threshold must be at least 1".into()));
        }
        Ok(())
    }
}

/// Most endpoints (and retries) of one upstream version.
const MAX_ENDPOINTS: usize = 64;
/// Longest timeout, interval or cooldown: one day.
const MAX_SECONDS: f64 = 86_400.0;

impl UpstreamSpec {
    /// Upstreams registered over the API may only reach hosts the operator allowed
    /// (`--upstream-hosts`, `host` or `host:port`): otherwise an admin key could make the
    /// server fetch from loopback or private addresses and reflect the answers.
    pub fn check_hosts(&self, allowed: &[String]) -> Result<(), crate::service::error::ServiceError> {
        use crate::service::error::ServiceError;
        self.validate().map_err(|(p, m)| ServiceError::invalid(p, m))?;
        for (i, e) in self.endpoints.iter().enumerate() {
            let url = reqwest::Url::parse(e)
                .map_err(|_| ServiceError::invalid(format!("upstream.endpoints[{i}]"), format!("`{e}` is not a URL")))?;
            let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
            let port = url.port_or_known_default().unwrap_or(0);
            let permitted = allowed.iter().any(|a| {
                let a = a.trim().to_ascii_lowercase();
                a == host || a == format!("{host}:{port}") || a == format!("[{host}]:{port}")
            });
            if !permitted {
                return Err(ServiceError {
                    status: crate::service::error::StatusCode::FORBIDDEN,
                    kind: "permission_error",
                    code: Some("upstream_host_not_allowed"),
                    ..ServiceError::invalid(
                        format!("upstream.endpoints[{i}]"),
                        format!(
                            "upstream host `{host}:{port}` is not allowed; the server's operator lists the hosts \
                             upstreams may use with --upstream-hosts"
                        ),
                    )
                });
            }
        }
        Ok(())
    }
}

/// One upstream server and what the pool knows of it.
pub struct Endpoint {
    pub url: String,
    in_flight: AtomicUsize,
    healthy: AtomicBool,
    consecutive_failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Endpoint {
    fn new(url: &str) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            open_until: Mutex::new(None),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    fn circuit_open(&self, now: Instant) -> bool {
        self.open_until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| now < t)
    }
}

/// Why a request found no upstream answer.
#[derive(Debug)]
pub enum UpstreamError {
    /// Every endpoint is failing or its circuit is open.
    NoneAvailable(String),
    /// The last endpoint tried failed this way.
    Failed(String),
    Timeout(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::NoneAvailable(m) | UpstreamError::Failed(m) | UpstreamError::Timeout(m) => f.write_str(m),
        }
    }
}

/// An endpoint's state in the admin API's view of an upstream version.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EndpointView {
    pub url: String,
    /// The last health check passed.
    pub healthy: bool,
    pub circuit: Circuit,
    pub in_flight: u64,
    pub requests_ok: u64,
    pub requests_failed: u64,
}

/// An endpoint's circuit breaker: `open` sends it nothing until the cool-down ends, then
/// `half_open` lets one trial request through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

/// The endpoints of one version.
pub struct Pool {
    pub spec: UpstreamSpec,
    pub endpoints: Vec<Endpoint>,
    client: reqwest::Client,
    next: AtomicUsize,
    /// Upstream response-head latency, all endpoints.
    pub latency: Histogram,
}

/// Holds an endpoint's in-flight count up while a response (or its stream) is alive.
pub struct InFlight {
    pool: Arc<Pool>,
    index: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.pool.endpoints[self.index].in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlight {
    pub fn endpoint(&self) -> &str {
        &self.pool.endpoints[self.index].url
    }
}

const LATENCY_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

impl Pool {
    pub fn new(spec: UpstreamSpec) -> Result<Arc<Self>, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs_f64(spec.connect_timeout_s))
            .pool_idle_timeout(Duration::from_secs(30))
            // An upstream answers itself; a redirect could point anywhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Arc::new(Self {
            endpoints: spec.endpoints.iter().map(|u| Endpoint::new(u)).collect(),
            spec,
            client,
            next: AtomicUsize::new(0),
            latency: Histogram::new(LATENCY_BOUNDS),
        }))
    }

    /// The endpoint the next request goes to, skipping `tried`: least busy among the healthy
    /// ones with a closed (or half-open) circuit; failing that, any with a closed circuit.
    fn pick(&self, tried: &[usize], now: Instant) -> Option<usize> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates = |need_healthy: bool| {
            (0..n)
                .map(|k| (start + k) % n)
                .filter(|i| !tried.contains(i))
                .filter(|&i| !self.endpoints[i].circuit_open(now))
                .filter(|&i| !need_healthy || self.endpoints[i].healthy.load(Ordering::Relaxed))
                .min_by_key(|&i| self.endpoints[i].in_flight.load(Ordering::Relaxed))
        };
        candidates(true).or_else(|| candidates(false))
    }

    fn success(&self, i: usize) {
        let e = &self.endpoints[i];
        e.ok.fetch_add(1, Ordering::Relaxed);
        e.consecutive_failures.store(0, Ordering::Relaxed);
        *e.open_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn failure(&self, i: usize, why: &str) {
        let e = &self.endpoints[i];
        e.failed.fetch_add(1, Ordering::Relaxed);
        let n = e.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.spec.failure_threshold {
            let until = Instant::now() + Duration::from_secs_f64(self.spec.cooldown_s);
            *e.open_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
            tracing::warn!(endpoint = %e.url, failures = n, "upstream circuit open: {why}");
        }
    }

    /// POSTs `body` to `path` (e.g. `/v1/chat/completions`) on the pool's endpoints as the
    /// module docs describe; answers the response head and the guard of its endpoint.
    pub async fn post(self: &Arc<Self>, path: &str, body: &serde_json::Value) -> Result<(reqwest::Response, InFlight), UpstreamError> {
        let mut tried = Vec::new();
        let mut last: Option<UpstreamError> = None;
        let timeout = Duration::from_secs_f64(self.spec.timeout_s);
        for _ in 0..=self.spec.retries {
            let Some(i) = self.pick(&tried, Instant::now()) else { break };
            tried.push(i);
            let ep = &self.endpoints[i];
            ep.in_flight.fetch_add(1, Ordering::Relaxed);
            let guard = InFlight { pool: self.clone(), index: i };
            let mut req = self.client.post(format!("{}{path}", ep.url)).json(body);
            if let Some(key) = &self.spec.api_key {
                req = req.bearer_auth(key);
            }
            let t0 = Instant::now();
            match tokio::time::timeout(timeout, req.send()).await {
                Err(_) => {
                    self.failure(i, "timed out");
                    // The upstream may still be generating: do not run the request twice.
                    return Err(UpstreamError::Timeout(format!(
                        "upstream {} sent no response within {} s",
                        ep.url, self.spec.timeout_s
                    )));
                }
                Ok(Err(e)) => {
                    let why = format!("upstream {} failed: {}", ep.url, error_chain(&e));
                    self.failure(i, &why);
                    if e.is_connect() || e.is_request() {
                        last = Some(UpstreamError::Failed(why));
                        continue;
                    }
                    return Err(UpstreamError::Failed(why));
                }
                Ok(Ok(resp)) => {
                    self.latency.observe(t0.elapsed().as_secs_f64());
                    let status = resp.status().as_u16();
                    if matches!(status, 502..=504) {
                        let why = format!("upstream {} answered {status}", ep.url);
                        self.failure(i, &why);
                        last = Some(UpstreamError::Failed(why));
                        continue;
                    }
                    if status >= 500 {
                        self.failure(i, &format!("answered {status}"));
                    } else {
                        self.success(i);
                    }
                    return Ok((resp, guard));
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            UpstreamError::NoneAvailable(format!(
                "no upstream available: all {} endpoints are failing or their circuits are open",
                self.endpoints.len()
            ))
        }))
    }

    /// One round of health checks, all endpoints at once.
    pub async fn check_health(&self, client: &reqwest::Client) {
        let timeout = Duration::from_secs_f64(self.spec.health_interval_s.min(5.0));
        let checks = self.endpoints.iter().map(|ep| async move {
            let url = format!("{}{}", ep.url, self.spec.health_path);
            let ok = matches!(tokio::time::timeout(timeout, client.get(&url).send()).await, Ok(Ok(r)) if r.status().is_success());
            let was = ep.healthy.swap(ok, Ordering::Relaxed);
            if was != ok {
                tracing::warn!(endpoint = %ep.url, healthy = ok, "upstream health changed");
            }
        });
        futures::future::join_all(checks).await;
    }

    /// The endpoints' state for the admin API.
    pub fn describe(&self) -> Vec<EndpointView> {
        let now = Instant::now();
        self.endpoints
            .iter()
            .map(|e| EndpointView {
                url: e.url.clone(),
                healthy: e.healthy.load(Ordering::Relaxed),
                circuit: if e.circuit_open(now) {
                    Circuit::Open
                } else if e.consecutive_failures.load(Ordering::Relaxed) >= self.spec.failure_threshold {
                    Circuit::HalfOpen
                } else {
                    Circuit::Closed
                },
                in_flight: e.in_flight.load(Ordering::Relaxed) as u64,
                requests_ok: e.ok.load(Ordering::Relaxed),
                requests_failed: e.failed.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Prometheus series of the endpoints, labelled with `labels` (model and version) and the
    /// endpoint's position in the version's list: `/metrics` carries no internal addresses
    /// (the admin API's view of the version maps positions to URLs).
    pub fn render(&self, labels: &str, out: &mut crate::models::MetricsText) {
        let now = Instant::now();
        for (i, e) in self.endpoints.iter().enumerate() {
            let l = format!("{labels},endpoint=\"{i}\"");
            out.add("ragway_upstream_requests_total", &format!("{l},outcome=\"ok\""), e.ok.load(Ordering::Relaxed) as f64);
            out.add("ragway_upstream_requests_total", &format!("{l},outcome=\"failed\""), e.failed.load(Ordering::Relaxed) as f64);
            out.add("ragway_upstream_in_flight", &l, e.in_flight.load(Ordering::Relaxed) as f64);
            out.add("ragway_upstream_healthy", &l, f64::from(u8::from(e.healthy.load(Ordering::Relaxed))));
            out.add("ragway_upstream_circuit_open", &l, f64::from(u8::from(e.circuit_open(now))));
        }
    }
}

/// An error with its sources ("error sending request: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Rewrites the `model` of every `data: {...}` line of an SSE body to `model`, passing each
/// upstream chunk on as soon as its lines are complete.
pub struct SseRewriter {
    model: String,
    pending: Vec<u8>,
}

impl SseRewriter {
    pub fn new(model: &str) -> Self {
        Self { model: model.to_string(), pending: Vec::new() }
    }

    /// The complete lines of what has arrived so far, rewritten.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        let Some(last_nl) = self.pending.iter().rposition(|&b| b == b'\n') else { return Vec::new() };
        let rest = self.pending.split_off(last_nl + 1);
        let complete = std::mem::replace(&mut self.pending, rest);
        let mut out = Vec::with_capacity(complete.len() + 16);
        for line in complete.split_inclusive(|&b| b == b'\n') {
            out.extend_from_slice(&self.rewrite_line(line));
        }
        out
    }

    /// Whatever is left when the upstream closes.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.pending);
        self.rewrite_line(&rest)
    }

    fn rewrite_line(&self, line: &[u8]) -> Vec<u8> {
        let text = String::from_utf8_lossy(line);
        let body = text.trim_end_matches(['\n', '\r']);
        if let Some(json) = body.strip_prefix("data:").map(str::trim_start) {
            if let Ok(serde_json::Value::Object(mut m)) = serde_json::from_str::<serde_json::Value>(json) {
                if m.contains_key("model") {
                    m.insert("model".into(), self.model.clone().into());
                    let ending = &text[body.len()..];
                    return format!("data: {}{ending}", serde_json::Value::Object(m)).into_bytes();
                }
            }
        }
        line.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: usize) -> UpstreamSpec {
        serde_json::from_value(serde_json::json!({
            "endpoints": (0..n).map(|i| format!("http://127.0.0.1:{}", 1 + i)).collect::<Vec<_>>(),
            "failure_threshold": 2, "cooldown_s": 60.0
        }))
        .unwrap()
    }

    #[test]
    fn least_busy_healthy_endpoint_first_and_circuits_open_after_failures() {
        let pool = Pool::new(spec(3)).unwrap();
        let now = Instant::now();
        pool.endpoints[0].in_flight.store(2, Ordering::Relaxed);
        pool.endpoints[1].in_flight.store(1, Ordering::Relaxed);
        assert_eq!(pool.pick(&[], now), Some(2));
        assert_eq!(pool.pick(&[2], now), Some(1), "a tried endpoint is skipped");
        pool.endpoints[2].healthy.store(false, Ordering::Relaxed);
        assert_eq!(pool.pick(&[], now), Some(1), "a failed health check sends traffic elsewhere");
        pool.failure(1, "test");
        assert!(!pool.endpoints[1].circuit_open(Instant::now()), "one failure is below the threshold");
        pool.failure(1, "test");
        assert!(pool.endpoints[1].circuit_open(Instant::now()));
        assert_eq!(pool.pick(&[], Instant::now()), Some(0));
        // All circuits open but one unhealthy endpoint: it is still tried.
        pool.failure(0, "test");
        pool.failure(0, "test");
        assert_eq!(pool.pick(&[], Instant::now()), Some(2));
        pool.failure(2, "test");
        pool.failure(2, "test");
        assert_eq!(pool.pick(&[], Instant::now()), None);
        // Half-open after the cooldown, closed again by a success.
        assert!(!pool.endpoints[1].circuit_open(Instant::now() + Duration::from_secs(61)));
        pool.success(1);
        assert_eq!(pool.describe()[1].circuit, Circuit::Closed);
        assert_eq!(pool.describe()[0].circuit, Circuit::Open);
    }

    #[test]
    fn sse_model_rewritten_across_chunk_boundaries() {
        let mut r = SseRewriter::new("chat@v2");
        let mut out = r.feed(b"data: {\"id\":\"x\",\"model\":\"Smol");
        assert!(out.is_empty(), "half a line waits for the rest");
        out.extend(r.feed(b"LM2\",\"choices\":[]}\n\ndata: {\"choices\":[],\"model\":\"a\"}\r\n"));
        out.extend(r.feed(b"\ndata: [DONE]\n\n"));
        out.extend(r.finish());
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let first: serde_json::Value = serde_json::from_str(lines[0].strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(first["model"], "chat@v2");
        assert_eq!(first["id"], "x");
        assert!(lines[2].contains("\"model\":\"chat@v2\""));
        assert!(text.contains("\r\n"), "line endings kept");
        assert!(text.ends_with("data: [DONE]\n\n"));
    }

    #[test]
    fn spec_validation_names_the_field() {
        let mut s = spec(1);
        assert!(s.validate().is_ok());
        s.endpoints = vec!["localhost:8080".into()];
        assert_eq!(s.validate().unwrap_err().0, "upstream.endpoints[0]");
        s = spec(1);
        s.timeout_s = 0.0;
        assert_eq!(s.validate().unwrap_err().0, "upstream.timeout_s");
        let e = serde_json::from_value::<UpstreamSpec>(serde_json::json!({"endpoints": [], "retry": 1})).unwrap_err();
        assert!(e.to_string().contains("unknown field `retry`"), "{e}");
    }
}
