//! Routing policies of a public model name, with no I/O so they can be tested by statistics:
//! which version serves a request (single, weighted A/B, canary), whether it is mirrored to a
//! shadow version, and the sliding window a canary is judged on.

use ragway_prompts::registry::{key_of, uniform_from_key, weighted_index};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How a public name's traffic is spread over its versions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// `single` (one version), `ab` (weighted arms) or `canary`.
    pub policy: PolicyKind,
    /// `single`: the version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `ab`: the arms and their relative weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arms: Vec<Arm>,
    /// `canary`: the version most traffic stays on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable: Option<String>,
    /// `canary`: the version under trial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<String>,
    /// `canary`: the share of traffic sent to the canary, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<f64>,
    /// `canary`: a request header that sends a request to the canary when present (`name`)
    /// or when it has a value (`name=value`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// `canary`: API key names whose requests always go to the canary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<String>,
    /// `canary`: when the canary is rolled back automatically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackRule>,
    /// Any policy: mirror a share of requests to another version and discard its answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    #[default]
    Single,
    Ab,
    Canary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    pub version: String,
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    pub version: String,
    /// Share of requests mirrored, in [0, 1].
    #[serde(default = "one")]
    pub share: f64,
}

fn one() -> f64 {
    1.0
}

/// A canary is rolled back when, over the last `window_s` seconds and at least
/// `min_requests` of its requests, its error share exceeds `max_error_rate` or its p95
/// latency exceeds `max_p95_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RollbackRule {
    pub window_s: f64,
    pub min_requests: usize,
    pub max_error_rate: f64,
    pub max_p95_ms: Option<f64>,
}

impl Default for RollbackRule {
    fn default() -> Self {
        Self { window_s: 300.0, min_requests: 20, max_error_rate: 0.05, max_p95_ms: None }
    }
}

/// Who is asking, as far as routing cares.
#[derive(Debug, Default, Clone, Copy)]
pub struct Caller<'a> {
    /// The request's `user` field.
    pub user: Option<&'a str>,
    /// The API key's name (absent with authentication off).
    pub api_key: Option<&'a str>,
    /// Whether the request carries the canary header.
    pub canary_header: bool,
}

/// Which role the chosen version plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The only version, or the one the request pinned (`name@version`).
    Primary,
    /// One arm of an A/B split.
    Arm,
    Stable,
    Canary,
    Shadow,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Arm => "arm",
            Role::Stable => "stable",
            Role::Canary => "canary",
            Role::Shadow => "shadow",
        }
    }
}

impl Routing {
    pub fn single(version: &str) -> Self {
        Routing { policy: PolicyKind::Single, version: Some(version.to_string()), ..Default::default() }
    }

    /// Checks the policy's fields; `known` tells whether a version exists. Errors name the field.
    pub fn validate(&self, known: impl Fn(&str) -> bool) -> Result<(), (String, String)> {
        let err = |field: &str, msg: String| Err((field.to_string(), msg));
        let check = |field: &str, v: &Option<String>| -> Result<(), (String, String)> {
            match v {
                None => Err((field.to_string(), format!("`{field}` is required by this policy"))),
                Some(v) if !known(v) => Err((field.to_string(), format!("unknown version `{v}`"))),
                Some(_) => Ok(()),
            }
        };
        match self.policy {
            PolicyKind::Single => check("version", &self.version)?,
            PolicyKind::Ab => {
                if self.arms.len() < 2 {
                    return err("arms", "an A/B split needs at least two arms".into());
                }
                for (i, a) in self.arms.iter().enumerate() {
                    if !known(&a.version) {
                        return err(&format!("arms[{i}].version"), format!("unknown version `{}`", a.version));
                    }
                }
                let weights: Vec<f64> = self.arms.iter().map(|a| a.weight).collect();
                if weighted_index(&weights, 0.5).is_none() {
                    return err("arms", "weights must be non-negative and finite, with a positive sum".into());
                }
            }
            PolicyKind::Canary => {
                check("stable", &self.stable)?;
                check("canary", &self.canary)?;
                if self.stable == self.canary {
                    return err("canary", "the canary must differ from the stable version".into());
                }
                match self.share {
                    Some(s) if (0.0..=1.0).contains(&s) => {}
                    Some(s) => return err("share", format!("share must be in [0, 1], got {s}")),
                    None if self.header.is_some() || !self.api_keys.is_empty() => {}
                    None => return err("share", "a canary needs a `share`, a `header` or `api_keys`".into()),
                }
                if let Some(r) = &self.rollback {
                    if r.window_s.is_nan() || r.window_s <= 0.0 || !(0.0..=1.0).contains(&r.max_error_rate) || r.min_requests == 0 {
                        return err(
                            "rollback",
                            "rollback needs window_s > 0, max_error_rate in [0, 1] and min_requests >= 1".into(),
                        );
                    }
                }
            }
        }
        if self.policy != PolicyKind::Canary
            && (self.stable.is_some() || self.canary.is_some() || self.share.is_some() || self.header.is_some())
        {
            return err("policy", "stable, canary, share and header belong to the `canary` policy".into());
        }
        if let Some(s) = &self.shadow {
            if !known(&s.version) {
                return err("shadow.version", format!("unknown version `{}`", s.version));
            }
            if !(0.0..=1.0).contains(&s.share) {
                return err("shadow.share", format!("share must be in [0, 1], got {}", s.share));
            }
        }
        Ok(())
    }

    /// The versions this policy can send traffic to (shadow included).
    pub fn references(&self) -> Vec<&str> {
        let mut v: Vec<&str> = [&self.version, &self.stable, &self.canary].into_iter().flatten().map(String::as_str).collect();
        v.extend(self.arms.iter().map(|a| a.version.as_str()));
        v.extend(self.shadow.iter().map(|s| s.version.as_str()));
        v
    }

    /// The canary header as (name, value).
    pub fn canary_header(&self) -> Option<(&str, Option<&str>)> {
        let h = self.header.as_deref()?;
        Some(match h.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (h.trim(), None),
        })
    }

    /// The version a request goes to. `name` salts the sticky hash (a user lands on
    /// independent arms of different models); `draw` is a uniform [0, 1) number used when the
    /// caller gives no key; `rolled_back` sends a canary's traffic to the stable version.
    pub fn pick(&self, name: &str, caller: &Caller, draw: f64, rolled_back: bool) -> (String, Role) {
        let u = sticky_draw(name, caller).unwrap_or(draw);
        match self.policy {
            PolicyKind::Single => (self.version.clone().unwrap_or_default(), Role::Primary),
            PolicyKind::Ab => {
                let weights: Vec<f64> = self.arms.iter().map(|a| a.weight).collect();
                let i = weighted_index(&weights, u).unwrap_or(0);
                (self.arms[i].version.clone(), Role::Arm)
            }
            PolicyKind::Canary => {
                let stable = (self.stable.clone().unwrap_or_default(), Role::Stable);
                if rolled_back {
                    return stable;
                }
                let forced = caller.canary_header || caller.api_key.is_some_and(|k| self.api_keys.iter().any(|a| a == k));
                if forced || u < self.share.unwrap_or(0.0) {
                    (self.canary.clone().unwrap_or_default(), Role::Canary)
                } else {
                    stable
                }
            }
        }
    }

    /// The shadow version a request is mirrored to, if any (`draw` uniform in [0, 1)).
    pub fn shadow_for(&self, chosen: &str, draw: f64) -> Option<&str> {
        let s = self.shadow.as_ref()?;
        (s.version != chosen && draw < s.share).then_some(s.version.as_str())
    }

    /// The configured share of traffic each version gets (the canary's as configured, before
    /// header and key overrides; after a rollback the stable version has it all).
    pub fn shares(&self, rolled_back: bool) -> Vec<(String, f64)> {
        match self.policy {
            PolicyKind::Single => vec![(self.version.clone().unwrap_or_default(), 1.0)],
            PolicyKind::Ab => {
                let total: f64 = self.arms.iter().map(|a| a.weight).sum();
                self.arms.iter().map(|a| (a.version.clone(), a.weight / total)).collect()
            }
            PolicyKind::Canary => {
                let share = if rolled_back { 0.0 } else { self.share.unwrap_or(0.0) };
                vec![
                    (self.stable.clone().unwrap_or_default(), 1.0 - share),
                    (self.canary.clone().unwrap_or_default(), share),
                ]
            }
        }
    }
}

/// The per-caller draw of sticky routing: the user when the request names one, else the API
/// key, hashed with the model name.
fn sticky_draw(name: &str, caller: &Caller) -> Option<f64> {
    let key = caller.user.map(|u| format!("user:{u}")).or_else(|| caller.api_key.map(|k| format!("key:{k}")))?;
    Some(uniform_from_key(key_of(&format!("{name}\u{0}{key}"))))
}

/// Outcomes of one version's recent requests: (when, succeeded, seconds).
#[derive(Debug, Default)]
pub struct Window {
    events: VecDeque<(Instant, bool, f64)>,
}

/// What a window holds right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowStats {
    pub requests: usize,
    pub error_rate: f64,
    pub p95_ms: f64,
}

impl Window {
    pub fn push(&mut self, at: Instant, ok: bool, secs: f64) {
        self.events.push_back((at, ok, secs));
        // A bound on memory whatever the window length.
        if self.events.len() > 100_000 {
            self.events.pop_front();
        }
    }

    /// The requests of the last `span` before `now`.
    pub fn stats(&mut self, now: Instant, span: Duration) -> WindowStats {
        while self.events.front().is_some_and(|(t, _, _)| now.saturating_duration_since(*t) > span) {
            self.events.pop_front();
        }
        let n = self.events.len();
        if n == 0 {
            return WindowStats { requests: 0, error_rate: 0.0, p95_ms: 0.0 };
        }
        let errors = self.events.iter().filter(|e| !e.1).count();
        let mut lat: Vec<f64> = self.events.iter().map(|e| e.2).collect();
        lat.sort_by(f64::total_cmp);
        // Nearest-rank p95.
        let rank = ((0.95 * n as f64).ceil() as usize).clamp(1, n);
        WindowStats { requests: n, error_rate: errors as f64 / n as f64, p95_ms: lat[rank - 1] * 1000.0 }
    }
}

impl RollbackRule {
    /// Why the canary must go, if it must.
    pub fn verdict(&self, s: &WindowStats) -> Option<String> {
        if s.requests < self.min_requests {
            return None;
        }
        if s.error_rate > self.max_error_rate {
            return Some(format!(
                "error rate {:.3} over {} requests exceeds {}",
                s.error_rate, s.requests, self.max_error_rate
            ));
        }
        match self.max_p95_ms {
            Some(max) if s.p95_ms > max => {
                Some(format!("p95 latency {:.0} ms over {} requests exceeds {max} ms", s.p95_ms, s.requests))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragway_eval::stats::Rng;

    fn ab(w1: f64, w2: f64) -> Routing {
        Routing {
            policy: PolicyKind::Ab,
            arms: vec![Arm { version: "v1".into(), weight: w1 }, Arm { version: "v2".into(), weight: w2 }],
            ..Default::default()
        }
    }

    #[test]
    fn seeded_ab_split_matches_weights() {
        let r = ab(0.8, 0.2);
        let mut rng = Rng::new(7);
        let n = 20_000;
        let v2 = (0..n).filter(|_| r.pick("chat", &Caller::default(), rng.uniform(), false).0 == "v2").count();
        // Binomial(n, 0.2): sd = sqrt(n p (1 - p)) ≈ 56.6; allow 5 sd.
        let expected = n as f64 * 0.2;
        assert!((v2 as f64 - expected).abs() < 5.0 * (n as f64 * 0.2 * 0.8).sqrt(), "{v2} of {n} on v2");
    }

    #[test]
    fn keyed_callers_split_by_weight_and_stick() {
        let r = ab(0.5, 0.5);
        let mut rng = Rng::new(1);
        let users: Vec<String> = (0..4000).map(|i| format!("user-{i}")).collect();
        let first: Vec<String> = users
            .iter()
            .map(|u| r.pick("chat", &Caller { user: Some(u), ..Default::default() }, rng.uniform(), false).0)
            .collect();
        // Sticky: the same user gets the same version whatever the random draw.
        for (u, v) in users.iter().zip(&first) {
            let again = r.pick("chat", &Caller { user: Some(u), ..Default::default() }, rng.uniform(), false).0;
            assert_eq!(&again, v, "{u} moved");
        }
        let v1 = first.iter().filter(|v| *v == "v1").count();
        assert!((v1 as f64 - 2000.0).abs() < 5.0 * 1000f64.sqrt() / 1.0, "{v1} of 4000 users on v1");
        // The API key is the key when there is no user; the user wins over the key.
        let mut by_key = |k: &str| r.pick("chat", &Caller { api_key: Some(k), ..Default::default() }, rng.uniform(), false).0;
        let (first, again) = (by_key("team-a"), by_key("team-a"));
        assert_eq!(first, again);
        let keys_on_v1 = (0..2000).filter(|i| by_key(&format!("k{i}")) == "v1").count();
        assert!((keys_on_v1 as f64 - 1000.0).abs() < 5.0 * 500f64.sqrt(), "{keys_on_v1}");
    }

    #[test]
    fn canary_share_header_keys_and_rollback() {
        let r = Routing {
            policy: PolicyKind::Canary,
            stable: Some("v1".into()),
            canary: Some("v2".into()),
            share: Some(0.1),
            header: Some("x-canary=1".into()),
            api_keys: vec!["testers".into()],
            ..Default::default()
        };
        r.validate(|v| v == "v1" || v == "v2").unwrap();
        let mut rng = Rng::new(3);
        let n = 20_000;
        let c = (0..n).filter(|_| r.pick("chat", &Caller::default(), rng.uniform(), false).1 == Role::Canary).count();
        assert!((c as f64 - 2000.0).abs() < 5.0 * (n as f64 * 0.09).sqrt(), "{c} canary of {n}");
        let forced = Caller { canary_header: true, ..Default::default() };
        assert_eq!(r.pick("chat", &forced, 0.99, false), ("v2".to_string(), Role::Canary));
        let tester = Caller { api_key: Some("testers"), ..Default::default() };
        assert_eq!(r.pick("chat", &tester, 0.99, false).0, "v2");
        // Rolled back: everything on the stable version, forced or not.
        assert_eq!(r.pick("chat", &forced, 0.0, true), ("v1".to_string(), Role::Stable));
        assert_eq!(r.shares(true), vec![("v1".to_string(), 1.0), ("v2".to_string(), 0.0)]);
        assert_eq!(r.canary_header(), Some(("x-canary", Some("1"))));
    }

    #[test]
    fn shadow_share_and_validation_errors() {
        let mut r = Routing::single("v1");
        r.shadow = Some(Shadow { version: "v2".into(), share: 0.25 });
        let mut rng = Rng::new(9);
        let n = 20_000;
        let s = (0..n).filter(|_| r.shadow_for("v1", rng.uniform()).is_some()).count();
        assert!((s as f64 - 5000.0).abs() < 5.0 * (n as f64 * 0.1875).sqrt(), "{s}");
        assert_eq!(r.shadow_for("v2", 0.0), None, "a request already on the shadow version is not mirrored");
        let known = |v: &str| v == "v1" || v == "v2";
        assert!(r.validate(known).is_ok());
        assert_eq!(Routing::single("v9").validate(known).unwrap_err().0, "version");
        assert_eq!(ab(1.0, -1.0).validate(known).unwrap_err().0, "arms");
        let bad = Routing { policy: PolicyKind::Canary, stable: Some("v1".into()), canary: Some("v1".into()), share: Some(0.1), ..Default::default() };
        assert_eq!(bad.validate(known).unwrap_err().0, "canary");
        let bad = Routing { policy: PolicyKind::Canary, stable: Some("v1".into()), canary: Some("v2".into()), share: Some(1.5), ..Default::default() };
        assert_eq!(bad.validate(known).unwrap_err().0, "share");
        let bad = Routing { share: Some(0.5), ..Routing::single("v1") };
        assert_eq!(bad.validate(known).unwrap_err().0, "policy");
    }

    #[test]
    fn window_forgets_old_requests_and_judges_the_canary() {
        let t0 = Instant::now();
        let mut w = Window::default();
        let rule = RollbackRule { window_s: 60.0, min_requests: 5, max_error_rate: 0.2, max_p95_ms: Some(500.0) };
        for i in 0..4 {
            w.push(t0 + Duration::from_secs(i), false, 0.1);
        }
        let span = Duration::from_secs_f64(rule.window_s);
        // Four failures: too few requests to judge.
        assert_eq!(rule.verdict(&w.stats(t0 + Duration::from_secs(5), span)), None);
        w.push(t0 + Duration::from_secs(5), true, 0.1);
        let s = w.stats(t0 + Duration::from_secs(6), span);
        assert_eq!(s.requests, 5);
        assert!((s.error_rate - 0.8).abs() < 1e-12);
        assert!(rule.verdict(&s).unwrap().contains("error rate 0.800"));
        // A minute later the failures have left the window.
        for i in 0..5 {
            w.push(t0 + Duration::from_secs(70 + i), true, 0.2);
        }
        let s = w.stats(t0 + Duration::from_secs(75), span);
        assert_eq!((s.requests, s.error_rate), (5, 0.0));
        assert_eq!(rule.verdict(&s), None);
        // Slow but correct: the latency rule fires (nearest-rank p95 of 6 values is the max).
        w.push(t0 + Duration::from_secs(76), true, 0.9);
        let s = w.stats(t0 + Duration::from_secs(76), span);
        assert!((s.p95_ms - 900.0).abs() < 1e-9);
        assert!(rule.verdict(&s).unwrap().contains("p95 latency"));
    }
}
