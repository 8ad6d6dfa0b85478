//! Request-level metrics the gateway keeps itself (the engine and the index keep their own):
//! requests by route, method and status with a duration histogram, and rejected requests by
//! reason.

use ragway_engine::generate::scheduler::Histogram;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Request duration buckets, seconds.
pub const REQUEST_BOUNDS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Why a request was refused (the `reason` label of `ragway_requests_rejected_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rejection {
    Unauthenticated,
    Forbidden,
    RateLimited,
    QueueFull,
    BodyTooLarge,
    InvalidRequest,
    NotReady,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Unauthenticated => "unauthenticated",
            Rejection::Forbidden => "forbidden",
            Rejection::RateLimited => "rate_limited",
            Rejection::QueueFull => "queue_full",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::InvalidRequest => "invalid_request",
            Rejection::NotReady => "not_ready",
        }
    }
}

#[derive(Default)]
pub struct RequestMetrics {
    /// (route pattern, method, status) → duration histogram (its count is the request count).
    requests: Mutex<BTreeMap<(String, String, u16), Histogram>>,
    rejected: Mutex<BTreeMap<Rejection, u64>>,
}

impl RequestMetrics {
    pub fn observe(&self, route: &str, method: &str, status: u16, secs: f64) {
        let mut map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((route.to_string(), method.to_string(), status))
            .or_insert_with(|| Histogram::new(REQUEST_BOUNDS))
            .observe(secs);
    }

    pub fn reject(&self, why: Rejection) {
        *self.rejected.lock().unwrap_or_else(|e| e.into_inner()).entry(why).or_insert(0) += 1;
    }

    /// Appends the Prometheus text of these metrics.
    pub fn render(&self, out: &mut String) {
        let map = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP ragway_http_requests_total HTTP requests by route, method and status.");
        let _ = writeln!(out, "# TYPE ragway_http_requests_total counter");
        let label = |(route, method, status): &(String, String, u16)| {
            format!("route=\"{}\",method=\"{method}\",status=\"{status}\"", escape(route))
        };
        for (key, h) in map.iter() {
            let (counts, _) = h.snapshot();
            let _ = writeln!(out, "ragway_http_requests_total{{{}}} {}", label(key), counts.iter().sum::<u64>());
        }
        let name = "ragway_http_request_duration_seconds";
        let _ = writeln!(out, "# HELP {name} HTTP request duration (to the response head; streams continue after).");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (key, h) in map.iter() {
            write_histogram_series(out, name, &label(key), h);
        }
        drop(map);
        let rejected = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP ragway_requests_rejected_total Requests refused, by reason.");
        let _ = writeln!(out, "# TYPE ragway_requests_rejected_total counter");
        for (why, n) in rejected.iter() {
            let _ = writeln!(out, "ragway_requests_rejected_total{{reason=\"{}\"}} {n}", why.as_str());
        }
    }
}

/// Grounding score buckets.
pub const GROUNDING_BOUNDS: &[f64] = &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// RAG answers by template version: how they ended (`answered`, `dont_know`, `abstained`),
/// how many were flagged ungrounded, and their grounding scores — the online half of
/// hallucination monitoring.
#[derive(Default)]
pub struct RagMetrics {
    answers: Mutex<BTreeMap<(String, u32, &'static str), u64>>,
    flagged: Mutex<BTreeMap<(String, u32), u64>>,
    scores: Mutex<BTreeMap<(String, u32), Histogram>>,
}

impl RagMetrics {
    pub fn observe(&self, a: &ragway_prompts::rag::RagAnswer) {
        let key = (a.template.name.clone(), a.template.version);
        let outcome = if a.dont_know {
            "dont_know"
        } else if a.grounding.abstained {
            "abstained"
        } else {
            "answered"
        };
        *self.answers.lock().unwrap_or_else(|e| e.into_inner()).entry((key.0.clone(), key.1, outcome)).or_insert(0) += 1;
        if outcome == "answered" {
            let mut f = self.flagged.lock().unwrap_or_else(|e| e.into_inner());
            *f.entry(key.clone()).or_insert(0) += u64::from(a.grounding.flagged);
            self.scores
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key)
                .or_insert_with(|| Histogram::new(GROUNDING_BOUNDS))
                .observe(a.grounding.score as f64);
        }
    }

    pub fn render(&self, out: &mut String) {
        let label = |t: &str, v: u32| format!("template=\"{}\",version=\"{v}\"", escape(t));
        let _ = writeln!(out, "# HELP ragway_rag_answers_total RAG answers by template version and outcome.");
        let _ = writeln!(out, "# TYPE ragway_rag_answers_total counter");
        for ((t, v, o), n) in self.answers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "ragway_rag_answers_total{{{},outcome=\"{o}\"}} {n}", label(t, *v));
        }
        let _ = writeln!(out, "# HELP ragway_rag_flagged_total RAG answers flagged as not grounded in their passages.");
        let _ = writeln!(out, "# TYPE ragway_rag_flagged_total counter");
        for ((t, v), n) in self.flagged.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "ragway_rag_flagged_total{{{}}} {n}", label(t, *v));
        }
        let name = "ragway_rag_grounding_score";
        let _ = writeln!(out, "# HELP {name} Grounding score of RAG answers (abstentions excluded).");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for ((t, v), h) in self.scores.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            write_histogram_series(out, name, &label(t, *v), h);
        }
    }
}

/// Label values escaped as the exposition format wants.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The `_bucket`, `_sum` and `_count` lines of one histogram series.
/// Writes one metric family: HELP, TYPE and its samples (labels without braces).
pub fn write_family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

pub fn write_histogram_series(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    let (counts, sum) = h.snapshot();
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (bound, c) in h.bounds.iter().zip(&counts) {
        cumulative += c;
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}");
    }
    cumulative += counts.last().copied().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {cumulative}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = RequestMetrics::default();
        m.observe("/v1/models", "GET", 200, 0.002);
        m.observe("/v1/models", "GET", 200, 0.2);
        m.observe("/v1/models/{id}", "GET", 404, 0.0005);
        m.reject(Rejection::RateLimited);
        m.reject(Rejection::RateLimited);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("ragway_http_requests_total{route=\"/v1/models\",method=\"GET\",status=\"200\"} 2"), "{out}");
        assert!(out.contains(
            "ragway_http_request_duration_seconds_bucket{route=\"/v1/models\",method=\"GET\",status=\"200\",le=\"0.005\"} 1"
        ));
        assert!(out.contains(
            "ragway_http_request_duration_seconds_bucket{route=\"/v1/models\",method=\"GET\",status=\"200\",le=\"+Inf\"} 2"
        ));
        assert!(out.contains("ragway_requests_rejected_total{reason=\"rate_limited\"} 2"));
    }
}
