//! Query drift monitoring per collection: is today's traffic still what the index and the
//! models were built for?
//!
//! - **Profile** of the collection, taken when the reference is: the centroid of (a sample
//!   of) its chunk embeddings, `projections` seeded random unit directions, and summaries of
//!   the chunks' token lengths and centroid similarities.
//! - **Reference**: the observations of `baseline` queries — the first ones the collection
//!   serves (`source: live`), or queries an operator supplies (`source: queries`). Kept in
//!   `drift_reference.json` beside the collection so a restart does not forget it.
//! - **Window**: the observations of the last `window` live queries. An observation is the
//!   query's best dense score (the nearest chunk's similarity), its similarity to the
//!   centroid, its projections on the directions, and its token length.
//! - **Statistics**, window against reference: two-sample Kolmogorov–Smirnov on the
//!   nearest-chunk similarity, on the centroid similarity and on each projection (the largest
//!   statistic reported, its p-value Bonferroni-corrected); the population stability index of
//!   the token lengths (bins at the reference's deciles); the share of queries whose best
//!   score is below the relevance threshold, and how far it rose over the reference's share.
//! - **Alert** when, with at least `min_window` queries in the window, a KS statistic reaches
//!   `ks_threshold` with p below `ks_alpha`, the PSI reaches `psi_threshold`, or the
//!   low-score share rose by `low_score_rise` or more.
//!
//! RAG answers' grounding outcomes are tracked in a window of their own (`record_grounding`):
//! a model-quality signal beside the query-side statistics.

use crate::simd::{cosine, dot};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Thresholds and sizes of drift monitoring.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriftConfig {
    /// Live queries kept in the window.
    pub window: usize,
    /// Queries that make a reference taken from live traffic.
    pub baseline: usize,
    /// Random directions of the profile.
    pub projections: usize,
    /// Chunks sampled for the profile.
    pub profile_sample: usize,
    /// Window size below which no alert is raised.
    pub min_window: usize,
    pub ks_threshold: f64,
    pub ks_alpha: f64,
    pub psi_threshold: f64,
    /// Best scores below this count as low (the RAG relevance cut's default).
    pub low_score_threshold: f32,
    pub low_score_rise: f64,
    /// RAG answers kept in the grounding window.
    pub grounding_window: usize,
}

impl Default for DriftConfig {
    fn default() -> Self {
        Self {
            window: 500,
            baseline: 200,
            projections: 8,
            profile_sample: 2000,
            min_window: 30,
            ks_threshold: 0.3,
            ks_alpha: 0.01,
            psi_threshold: 0.25,
            low_score_threshold: 0.3,
            low_score_rise: 0.2,
            grounding_window: 500,
        }
    }
}

/// What one query looked like to the collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Best dense score (cosine to the nearest chunk for cosine collections).
    pub similarity: f32,
    pub centroid_similarity: f32,
    pub projections: Vec<f32>,
    pub tokens: u32,
}

/// The collection's summary the observations are measured in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub centroid: Vec<f32>,
    pub directions: Vec<Vec<f32>>,
    pub chunks_sampled: usize,
    /// Deciles (0%, 10%, ..., 100%) of the sampled chunks' token lengths.
    pub chunk_token_deciles: Vec<f64>,
    /// Deciles of the sampled chunks' similarity to the centroid.
    pub chunk_centroid_similarity_deciles: Vec<f64>,
    pub built_at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reference {
    source: String,
    profile: Profile,
    observations: Vec<Observation>,
}

/// A two-sample test's statistic and p-value.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ks {
    pub statistic: f64,
    pub p_value: f64,
}

/// The drift state of a collection, as the API and the metrics show it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize)]
pub struct DriftReport {
    /// `collecting_reference`, `collecting_window`, `ok` or `drift`.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub state: &'static str,
    pub alert: bool,
    pub reasons: Vec<String>,
    pub reference_source: Option<String>,
    pub reference_queries: usize,
    pub window_queries: usize,
    pub similarity_ks: Option<Ks>,
    pub centroid_ks: Option<Ks>,
    /// The largest KS statistic over the projections; p-value times their number.
    pub projection_ks: Option<Ks>,
    pub length_psi: Option<f64>,
    pub low_score_share: Option<f64>,
    pub reference_low_score_share: Option<f64>,
    pub mean_similarity: Option<f64>,
    pub reference_mean_similarity: Option<f64>,
    /// Share of the RAG answers in the grounding window flagged as not grounded.
    pub grounding_flagged_share: Option<f64>,
    pub grounding_answers: usize,
    pub profile: Option<ProfileSummary>,
    pub config: DriftConfig,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize)]
pub struct ProfileSummary {
    pub chunks_sampled: usize,
    pub projections: usize,
    pub chunk_token_deciles: Vec<f64>,
    pub chunk_centroid_similarity_deciles: Vec<f64>,
    pub built_at: u64,
}

struct Inner {
    config: DriftConfig,
    reference: Option<Reference>,
    /// The profile live observations are measured in until the reference is complete.
    pending_profile: Option<Profile>,
    pending: Vec<Observation>,
    window: VecDeque<Observation>,
    grounding: VecDeque<bool>,
}

/// One collection's drift monitor (see the module docs).
pub struct DriftMonitor {
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl DriftMonitor {
    /// The monitor of the collection in `dir`, with its saved reference if there is one.
    pub fn open(dir: &Path) -> Self {
        let path = dir.join("drift_reference.json");
        let reference = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Reference>(&b).ok());
        Self {
            path,
            inner: Mutex::new(Inner {
                config: DriftConfig::default(),
                reference,
                pending_profile: None,
                pending: Vec::new(),
                window: VecDeque::new(),
                grounding: VecDeque::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn configure(&self, config: DriftConfig) {
        self.lock().config = config;
    }

    pub fn config(&self) -> DriftConfig {
        self.lock().config.clone()
    }

    /// Installs the profile live observations start from (no-op when one exists).
    pub fn ensure_profile(&self, make: impl FnOnce() -> Option<Profile>) {
        let needed = {
            let g = self.lock();
            g.reference.is_none() && g.pending_profile.is_none()
        };
        if !needed {
            return;
        }
        // Built unlocked (`make` may read the config); the first of racing builders wins.
        let p = make();
        let mut g = self.lock();
        if g.reference.is_none() && g.pending_profile.is_none() {
            g.pending_profile = p;
        }
    }

    /// Adds a live query (its vector, best dense score and token length), measured in the
    /// current profile: to the reference while it is being collected, else to the window.
    /// Nothing is recorded before a profile exists.
    pub fn observe_query(&self, query: &[f32], similarity: f32, tokens: u32) {
        let mut g = self.lock();
        let Some(profile) = g.reference.as_ref().map(|r| &r.profile).or(g.pending_profile.as_ref()) else { return };
        let o = profile.observe(query, similarity, tokens);
        self.observe_locked(&mut g, o);
    }

    /// Adds an observation already made in the current profile.
    pub fn observe(&self, o: Observation) {
        let mut g = self.lock();
        self.observe_locked(&mut g, o);
    }

    fn observe_locked(&self, g: &mut Inner, o: Observation) {
        if g.reference.is_some() {
            g.window.push_back(o);
            while g.window.len() > g.config.window {
                g.window.pop_front();
            }
            return;
        }
        g.pending.push(o);
        if g.pending.len() >= g.config.baseline {
            if let Some(profile) = g.pending_profile.take() {
                let observations = std::mem::take(&mut g.pending);
                let r = Reference { source: "live".into(), profile, observations };
                self.save(&r);
                g.reference = Some(r);
            }
        }
    }

    /// Replaces the reference with observations of supplied queries (made in `profile`).
    pub fn set_reference(&self, profile: Profile, observations: Vec<Observation>) {
        let r = Reference { source: "queries".into(), profile, observations };
        self.save(&r);
        let mut g = self.lock();
        g.reference = Some(r);
        g.pending.clear();
        g.pending_profile = None;
        g.window.clear();
    }

    /// Forgets the reference (and the window): the next `baseline` live queries make a new one.
    pub fn reset(&self) {
        let _ = std::fs::remove_file(&self.path);
        let mut g = self.lock();
        g.reference = None;
        g.pending.clear();
        g.pending_profile = None;
        g.window.clear();
    }

    fn save(&self, r: &Reference) {
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, serde_json::to_vec(r).map_err(std::io::Error::other)?)?;
            std::fs::rename(&tmp, &self.path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %self.path.display(), "cannot save the drift reference: {e}");
        }
    }

    /// Counts a RAG answer's grounding outcome.
    pub fn record_grounding(&self, flagged: bool) {
        let mut g = self.lock();
        g.grounding.push_back(flagged);
        while g.grounding.len() > g.config.grounding_window {
            g.grounding.pop_front();
        }
    }

    pub fn report(&self) -> DriftReport {
        let g = self.lock();
        let c = &g.config;
        let mut rep = DriftReport {
            state: "collecting_reference",
            alert: false,
            reasons: Vec::new(),
            reference_source: g.reference.as_ref().map(|r| r.source.clone()),
            reference_queries: g.reference.as_ref().map_or(g.pending.len(), |r| r.observations.len()),
            window_queries: g.window.len(),
            similarity_ks: None,
            centroid_ks: None,
            projection_ks: None,
            length_psi: None,
            low_score_share: None,
            reference_low_score_share: None,
            mean_similarity: None,
            reference_mean_similarity: None,
            grounding_flagged_share: (!g.grounding.is_empty())
                .then(|| g.grounding.iter().filter(|f| **f).count() as f64 / g.grounding.len() as f64),
            grounding_answers: g.grounding.len(),
            profile: g.reference.as_ref().map(|r| &r.profile).or(g.pending_profile.as_ref()).map(|p| ProfileSummary {
                chunks_sampled: p.chunks_sampled,
                projections: p.directions.len(),
                chunk_token_deciles: p.chunk_token_deciles.clone(),
                chunk_centroid_similarity_deciles: p.chunk_centroid_similarity_deciles.clone(),
                built_at: p.built_at,
            }),
            config: c.clone(),
        };
        let Some(reference) = &g.reference else { return rep };
        let refs = &reference.observations;
        let win: Vec<&Observation> = g.window.iter().collect();
        if refs.is_empty() || win.is_empty() {
            rep.state = "collecting_window";
            return rep;
        }
        let col = |xs: &[&Observation], f: &dyn Fn(&Observation) -> f64| -> Vec<f64> { xs.iter().map(|o| f(o)).collect() };
        let refs: Vec<&Observation> = refs.iter().collect();
        let sim = |o: &Observation| o.similarity as f64;
        rep.similarity_ks = Some(ks_2samp(&col(&refs, &sim), &col(&win, &sim)));
        let cen = |o: &Observation| o.centroid_similarity as f64;
        rep.centroid_ks = Some(ks_2samp(&col(&refs, &cen), &col(&win, &cen)));
        let k = reference.profile.directions.len();
        rep.projection_ks = (0..k)
            .map(|i| {
                let p = move |o: &Observation| o.projections.get(i).copied().unwrap_or(0.0) as f64;
                ks_2samp(&col(&refs, &p), &col(&win, &p))
            })
            .max_by(|a, b| a.statistic.total_cmp(&b.statistic))
            .map(|m| Ks { statistic: m.statistic, p_value: (m.p_value * k as f64).min(1.0) });
        let len = |o: &Observation| o.tokens as f64;
        rep.length_psi = Some(psi(&col(&refs, &len), &col(&win, &len)));
        let low = |xs: &[&Observation]| xs.iter().filter(|o| o.similarity < c.low_score_threshold).count() as f64 / xs.len() as f64;
        rep.low_score_share = Some(low(&win));
        rep.reference_low_score_share = Some(low(&refs));
        let mean = |xs: &[&Observation]| xs.iter().map(|o| o.similarity as f64).sum::<f64>() / xs.len() as f64;
        rep.mean_similarity = Some(mean(&win));
        rep.reference_mean_similarity = Some(mean(&refs));
        if win.len() < c.min_window {
            rep.state = "collecting_window";
            return rep;
        }
        let mut reasons = Vec::new();
        for (name, ks) in [("nearest-chunk similarity", rep.similarity_ks), ("centroid similarity", rep.centroid_ks), ("projection", rep.projection_ks)] {
            if let Some(ks) = ks {
                if ks.statistic >= c.ks_threshold && ks.p_value < c.ks_alpha {
                    reasons.push(format!("{name} KS {:.3} (p {:.2e})", ks.statistic, ks.p_value));
                }
            }
        }
        if let Some(p) = rep.length_psi.filter(|p| *p >= c.psi_threshold) {
            reasons.push(format!("query length PSI {p:.3}"));
        }
        if let (Some(now), Some(then)) = (rep.low_score_share, rep.reference_low_score_share) {
            if now - then >= c.low_score_rise {
                reasons.push(format!("low-score share {now:.2} (reference {then:.2})"));
            }
        }
        rep.alert = !reasons.is_empty();
        rep.state = if rep.alert { "drift" } else { "ok" };
        rep.reasons = reasons;
        rep
    }
}

/// The profile of a sample of chunk vectors (unit-normalized for the centroid) and their
/// token lengths; directions are seeded so every profile of a dimension shares them.
pub fn build_profile(vectors: &[&[f32]], tokens: &[u32], projections: usize, built_at: u64) -> Option<Profile> {
    let dim = vectors.first()?.len();
    let mut centroid = vec![0f64; dim];
    for v in vectors {
        let n = norm(v).max(1e-12);
        for (c, x) in centroid.iter_mut().zip(v.iter()) {
            *c += *x as f64 / n;
        }
    }
    let cn = centroid.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    let centroid: Vec<f32> = centroid.iter().map(|x| (x / cn) as f32).collect();
    let mut rng = ragway_engine::rng::SplitMix64::new(0x5eed_d21f_u64 ^ dim as u64);
    let directions: Vec<Vec<f32>> = (0..projections)
        .map(|_| {
            let d: Vec<f64> = (0..dim).map(|_| rng.normal()).collect();
            let n = d.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            d.iter().map(|x| (x / n) as f32).collect()
        })
        .collect();
    let sims: Vec<f64> = vectors.iter().map(|v| cosine(v, &centroid) as f64).collect();
    let lens: Vec<f64> = tokens.iter().map(|&t| t as f64).collect();
    Some(Profile {
        centroid,
        directions,
        chunks_sampled: vectors.len(),
        chunk_token_deciles: deciles(&lens),
        chunk_centroid_similarity_deciles: deciles(&sims),
        built_at,
    })
}

impl Profile {
    /// The observation of a query vector with its best dense score and token length.
    pub fn observe(&self, query: &[f32], similarity: f32, tokens: u32) -> Observation {
        let n = norm(query).max(1e-12) as f32;
        Observation {
            similarity,
            centroid_similarity: cosine(query, &self.centroid),
            projections: self.directions.iter().map(|d| dot(query, d) / n).collect(),
            tokens,
        }
    }
}

fn norm(a: &[f32]) -> f64 {
    a.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt()
}

fn deciles(xs: &[f64]) -> Vec<f64> {
    if xs.is_empty() {
        return Vec::new();
    }
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    (0..=10).map(|i| s[((i as f64 / 10.0) * (s.len() - 1) as f64).round() as usize]).collect()
}

/// Two-sample Kolmogorov–Smirnov: the largest gap between the empirical CDFs (scipy's
/// `ks_2samp` statistic), and the asymptotic p-value from the limiting Kolmogorov
/// distribution, `scipy.stats.kstwobign.sf(D·sqrt(n·m/(n+m)))` (scipy's own `asymp` method
/// uses the finite-n distribution at the rounded effective size, which differs for small
/// samples; drift windows hold hundreds).
pub fn ks_2samp(a: &[f64], b: &[f64]) -> Ks {
    if a.is_empty() || b.is_empty() {
        return Ks { statistic: 0.0, p_value: 1.0 };
    }
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (n, m) = (a.len(), b.len());
    let (mut i, mut j, mut d) = (0usize, 0usize, 0f64);
    while i < n && j < m {
        let x = a[i].min(b[j]);
        while i < n && a[i] <= x {
            i += 1;
        }
        while j < m && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n as f64 - j as f64 / m as f64).abs());
    }
    let en = (n * m) as f64 / (n + m) as f64;
    Ks { statistic: d, p_value: kolmogorov_sf(d * en.sqrt()) }
}

/// P(K > z) of the Kolmogorov distribution.
fn kolmogorov_sf(z: f64) -> f64 {
    if z < 0.27 {
        return 1.0;
    }
    if z < 1.0 {
        // The CDF's theta-function form converges fast for small z.
        let t = (-std::f64::consts::PI.powi(2) / (8.0 * z * z)).exp();
        let cdf = (std::f64::consts::TAU).sqrt() / z * (t + t.powi(9) + t.powi(25) + t.powi(49));
        return (1.0 - cdf).clamp(0.0, 1.0);
    }
    let mut s = 0.0;
    for k in 1..=100 {
        let term = (-2.0 * (k * k) as f64 * z * z).exp();
        s += if k % 2 == 1 { term } else { -term };
        if term < 1e-16 {
            break;
        }
    }
    (2.0 * s).clamp(0.0, 1.0)
}

/// Population stability index of `current` against `reference`: bins at the reference's
/// deciles (duplicates merged), shares floored at 1e-4.
pub fn psi(reference: &[f64], current: &[f64]) -> f64 {
    if reference.is_empty() || current.is_empty() {
        return 0.0;
    }
    let mut edges = deciles(reference)[1..10].to_vec();
    edges.dedup_by(|a, b| a == b);
    let bin = |x: f64| edges.iter().take_while(|&&e| x > e).count();
    let shares = |xs: &[f64]| {
        let mut c = vec![0f64; edges.len() + 1];
        for &x in xs {
            c[bin(x)] += 1.0;
        }
        c.iter().map(|k| (k / xs.len() as f64).max(1e-4)).collect::<Vec<_>>()
    };
    let (r, c) = (shares(reference), shares(current));
    r.iter().zip(&c).map(|(r, c)| (c - r) * (c / r).ln()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ks_matches_scipy() {
        // scipy 1.17: ks_2samp(a, b).statistic == 0.5 and kstwobign.sf(0.5 * sqrt(5)).
        let a = [0.1, 0.5, 0.9, 1.3, 2.0, 2.2, 3.1, 3.3, 4.0, 5.5];
        let b = [1.9, 2.5, 3.0, 3.4, 4.2, 4.4, 5.0, 6.1, 7.0, 8.8];
        let ks = ks_2samp(&a, &b);
        assert!((ks.statistic - 0.5).abs() < 1e-12, "{ks:?}");
        assert!((ks.p_value - 0.164_079_197_726_652_1).abs() < 1e-9, "{ks:?}");
        // Ties across the samples are stepped over together.
        let ks = ks_2samp(&[1.0, 1.0, 2.0, 3.0], &[1.0, 2.0, 2.0, 2.0, 4.0]);
        assert!((ks.statistic - 0.3).abs() < 1e-12, "{ks:?}");
        assert!((ks.p_value - 0.988_261_077_643_524_4).abs() < 1e-9, "{ks:?}");
        assert!((kolmogorov_sf(1.0) - 0.269_999_671_677_354_56).abs() < 1e-9);
        assert!((kolmogorov_sf(0.5) - 0.963_945_243_664_875_1).abs() < 1e-9);
        assert!((kolmogorov_sf(2.0) - 0.000_670_925_255_779_695_3).abs() < 1e-12);
    }

    #[test]
    fn psi_of_the_same_distribution_is_small_and_of_a_shift_large() {
        let reference: Vec<f64> = (0..1000).map(|i| (i % 40) as f64).collect();
        let same: Vec<f64> = (0..500).map(|i| ((i * 7) % 40) as f64).collect();
        assert!(psi(&reference, &same) < 0.02, "{}", psi(&reference, &same));
        let longer: Vec<f64> = (0..500).map(|i| 30.0 + (i % 40) as f64).collect();
        assert!(psi(&reference, &longer) > 1.0, "{}", psi(&reference, &longer));
        // By hand: the deciles of 0..=9 are 0,1,2,3,4,5,5,6,7,8,9, so the bins are {0,1},
        // {2}, ..., {8} and {9}; all of current falls in the top one.
        let r: Vec<f64> = (0..10).map(f64::from).collect();
        let c = vec![9.0; 10];
        let expected = (1e-4 - 0.2) * (1e-4f64 / 0.2).ln()
            + 7.0 * ((1e-4 - 0.1) * (1e-4f64 / 0.1).ln())
            + (1.0 - 0.1) * (1.0f64 / 0.1).ln();
        assert!((psi(&r, &c) - expected).abs() < 1e-9, "{} vs {expected}", psi(&r, &c));
    }

    fn obs(similarity: f32, tokens: u32) -> Observation {
        Observation { similarity, centroid_similarity: similarity, projections: vec![similarity; 2], tokens }
    }

    #[test]
    fn reference_from_live_traffic_then_alert_on_a_shift_and_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let m = DriftMonitor::open(dir.path());
        m.configure(DriftConfig { baseline: 50, window: 60, min_window: 30, ..Default::default() });
        let v = [1.0f32, 0.0];
        m.ensure_profile(|| build_profile(&[&v], &[10], 2, 0));
        for i in 0..50 {
            m.observe(obs(0.6 + (i % 10) as f32 * 0.01, 8 + i % 5));
        }
        assert_eq!(m.report().state, "collecting_window");
        for i in 0..40 {
            m.observe(obs(0.6 + ((i * 3) % 10) as f32 * 0.01, 8 + (i * 2) % 5));
        }
        let r = m.report();
        assert_eq!(r.state, "ok", "{r:?}");
        assert!(!r.alert);
        // Off-domain: low similarity, long queries.
        for _ in 0..60 {
            m.observe(obs(0.1, 40));
        }
        let r = m.report();
        assert!(r.alert, "{r:?}");
        assert!(r.reasons.iter().any(|x| x.contains("nearest-chunk")), "{:?}", r.reasons);
        assert!(r.reasons.iter().any(|x| x.contains("PSI")), "{:?}", r.reasons);
        assert!(r.reasons.iter().any(|x| x.contains("low-score share 1.00")), "{:?}", r.reasons);
        // The reference survives a reopen; the window does not.
        let again = DriftMonitor::open(dir.path());
        let r = again.report();
        assert_eq!((r.reference_source.as_deref(), r.reference_queries, r.window_queries), (Some("live"), 50, 0));
        again.reset();
        assert_eq!(DriftMonitor::open(dir.path()).report().state, "collecting_reference");
    }

    #[test]
    fn grounding_window_share() {
        let dir = tempfile::tempdir().unwrap();
        let m = DriftMonitor::open(dir.path());
        m.configure(DriftConfig { grounding_window: 4, ..Default::default() });
        for f in [true, true, false, false, false, false] {
            m.record_grounding(f);
        }
        let r = m.report();
        assert_eq!((r.grounding_answers, r.grounding_flagged_share), (4, Some(0.0)));
    }

    #[test]
    fn profile_is_seeded_and_observations_use_it() {
        let a = [1.0f32, 0.0, 0.0];
        let b = [0.0f32, 1.0, 0.0];
        let p1 = build_profile(&[&a, &b], &[3, 5], 4, 0).unwrap();
        let p2 = build_profile(&[&b, &a], &[5, 3], 4, 0).unwrap();
        assert_eq!(p1.directions, p2.directions);
        for d in &p1.directions {
            assert!((norm(d) - 1.0).abs() < 1e-6);
        }
        let o = p1.observe(&[2.0, 2.0, 0.0], 0.9, 7);
        assert!((o.centroid_similarity - 1.0).abs() < 1e-6);
        assert_eq!(o.projections.len(), 4);
        assert_eq!(p1.chunk_token_deciles.first(), Some(&3.0));
    }
}
