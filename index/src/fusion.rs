//! Fusing the dense and keyword rankings into one.
//!
//! - `rrf` (reciprocal rank fusion, Cormack et al. 2009): `score = Σ w_s / (k + rank_s)`
//!   over the sources that returned the item, ranks starting at 1. Uses ranks only, so the
//!   two halves' score scales never matter.
//! - `convex`: min-max normalize each source's scores over its own result list to [0, 1]
//!   (a list of one, or of equal scores, normalizes to 1), then
//!   `score = w_dense · dense + w_keyword · keyword`, an absent source contributing 0.
//! - `dbsf` (distribution-based score fusion, as Qdrant defines it): like `convex`, but each
//!   source's scores are scaled between `mean − 3σ` and `mean + 3σ` of its own list (σ the
//!   sample standard deviation) instead of its minimum and maximum, so neither one outlying
//!   top score nor the depth of the candidate list sets the scale. A list of one, or of
//!   equal scores, scales to 0.5. Scores are not clamped: one far above the rest exceeds 1.
//!
//! Ties are broken by the smaller id, so results are deterministic.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FusionMethod {
    Rrf,
    Convex,
    #[default]
    Dbsf,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FusionParams {
    pub method: FusionMethod,
    /// RRF's rank constant.
    pub rrf_k: f32,
    pub dense_weight: f32,
    pub keyword_weight: f32,
}

impl Default for FusionParams {
    /// Tuned on SciFact's train split (see docs/benchmarks.md): score fusion with equal
    /// weights beat RRF at every `k` tried there, and `dbsf` keeps gaining with deeper
    /// candidate lists where `convex` (whose scale is set by each list's last score) does
    /// not: at the default depth of 300, nDCG@10 0.7350 against 0.7324.
    fn default() -> Self {
        Self { method: FusionMethod::Dbsf, rrf_k: 60.0, dense_weight: 0.5, keyword_weight: 0.5 }
    }
}

/// Largest `rrf_k` and weight a request may set: far past any useful value, small enough
/// that no sum of fused scores overflows.
pub const MAX_FUSION_CONSTANT: f32 = 1e6;

impl FusionParams {
    /// Checks a request's constants: finite, 0 to [`MAX_FUSION_CONSTANT`]. The error names
    /// the field (`fusion.rrf_k`, ...).
    pub fn validate(&self) -> crate::error::Result<()> {
        for (name, value) in [
            ("fusion.rrf_k", self.rrf_k),
            ("fusion.dense_weight", self.dense_weight),
            ("fusion.keyword_weight", self.keyword_weight),
        ] {
            if !(0.0..=MAX_FUSION_CONSTANT).contains(&value) {
                let message = format!("{name} must be between 0 and {MAX_FUSION_CONSTANT}, not {value}");
                return Err(crate::error::IndexError::invalid(name, message));
            }
        }
        Ok(())
    }
}

/// One source's verdict on a fused item: 1-based rank and raw score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SourceHit {
    pub rank: usize,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fused {
    pub id: u64,
    pub score: f32,
    pub dense: Option<SourceHit>,
    pub keyword: Option<SourceHit>,
}

/// Fuses two best-first lists of (id, score).
pub fn fuse(params: &FusionParams, dense: &[(u64, f32)], keyword: &[(u64, f32)]) -> Vec<Fused> {
    let mut items: HashMap<u64, Fused> = HashMap::with_capacity(dense.len() + keyword.len());
    let mut add = |list: &[(u64, f32)], is_dense: bool| {
        let scale = Scale::of(params.method, list);
        let weight = if is_dense { params.dense_weight } else { params.keyword_weight };
        for (i, &(id, score)) in list.iter().enumerate() {
            let hit = SourceHit { rank: i + 1, score };
            let entry = items.entry(id).or_insert(Fused { id, score: 0.0, dense: None, keyword: None });
            let slot = if is_dense { &mut entry.dense } else { &mut entry.keyword };
            if slot.is_some() {
                continue; // a source lists an id once; keep its best rank
            }
            *slot = Some(hit);
            entry.score += weight
                * match params.method {
                    FusionMethod::Rrf => 1.0 / (params.rrf_k + hit.rank as f32),
                    FusionMethod::Convex | FusionMethod::Dbsf => scale.apply(score),
                };
        }
    };
    add(dense, true);
    add(keyword, false);
    let mut out: Vec<Fused> = items.into_values().collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
    out
}

/// How one source's raw scores map onto a common scale: `(score − lo) / (hi − lo)`, or
/// `flat` when the list gives no spread.
struct Scale {
    lo: f32,
    hi: f32,
    flat: f32,
}

impl Scale {
    fn of(method: FusionMethod, list: &[(u64, f32)]) -> Self {
        match method {
            FusionMethod::Dbsf => {
                if list.len() < 2 {
                    return Self { lo: 0.0, hi: 0.0, flat: 0.5 };
                }
                // In f64: BM25 scores can be large and the lists long.
                let n = list.len() as f64;
                let mean = list.iter().map(|x| x.1 as f64).sum::<f64>() / n;
                let var = list.iter().map(|x| (x.1 as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
                let three_sigma = 3.0 * var.sqrt();
                Self { lo: (mean - three_sigma) as f32, hi: (mean + three_sigma) as f32, flat: 0.5 }
            }
            _ => {
                let (lo, hi) =
                    list.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), x| (lo.min(x.1), hi.max(x.1)));
                Self { lo, hi, flat: 1.0 }
            }
        }
    }

    fn apply(&self, score: f32) -> f32 {
        if self.hi > self.lo {
            (score - self.lo) / (self.hi - self.lo)
        } else {
            self.flat
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrf_by_hand() {
        let p = FusionParams { method: FusionMethod::Rrf, rrf_k: 60.0, dense_weight: 1.0, keyword_weight: 1.0 };
        let out = fuse(&p, &[(1, 0.9), (2, 0.8)], &[(2, 12.0), (3, 5.0)]);
        let ids: Vec<u64> = out.iter().map(|f| f.id).collect();
        assert_eq!(ids, vec![2, 1, 3]);
        assert!((out[0].score - (1.0 / 62.0 + 1.0 / 61.0)).abs() < 1e-7);
        assert!((out[1].score - 1.0 / 61.0).abs() < 1e-7);
        assert_eq!(out[0].dense, Some(SourceHit { rank: 2, score: 0.8 }));
        assert_eq!(out[0].keyword, Some(SourceHit { rank: 1, score: 12.0 }));
        assert_eq!(out[2].dense, None);
        // 1 and 3 tie on 1/61 without 2; the smaller id wins.
        let tie = fuse(&p, &[(3, 0.5)], &[(1, 2.0)]);
        assert_eq!(tie.iter().map(|f| f.id).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn weights_and_convex_combination() {
        let p = FusionParams { method: FusionMethod::Convex, dense_weight: 0.7, keyword_weight: 0.3, ..Default::default() };
        let out = fuse(&p, &[(1, 0.9), (2, 0.5), (3, 0.1)], &[(3, 10.0), (1, 0.0)]);
        let by_id = |id| out.iter().find(|f| f.id == id).unwrap().score;
        assert!((by_id(1) - 0.7).abs() < 1e-6); // dense 1.0, keyword 0.0
        assert!((by_id(2) - 0.35).abs() < 1e-6); // dense 0.5
        assert!((by_id(3) - 0.3).abs() < 1e-6); // dense 0.0, keyword 1.0
        let dense_only = FusionParams { method: FusionMethod::Rrf, dense_weight: 1.0, keyword_weight: 0.0, ..Default::default() };
        let out = fuse(&dense_only, &[(5, 0.1), (4, 0.05)], &[(4, 9.0)]);
        assert_eq!(out[0].id, 5);
    }

    #[test]
    fn constants_out_of_bounds_are_named() {
        use crate::error::IndexError;
        assert!(FusionParams::default().validate().is_ok());
        let zero = FusionParams { method: FusionMethod::Rrf, rrf_k: 0.0, dense_weight: 0.0, keyword_weight: 0.0 };
        assert!(zero.validate().is_ok());
        for (bad, field) in [
            (FusionParams { rrf_k: -1.0, ..zero }, "fusion.rrf_k"),
            (FusionParams { dense_weight: f32::INFINITY, ..zero }, "fusion.dense_weight"),
            (FusionParams { keyword_weight: f32::NAN, ..zero }, "fusion.keyword_weight"),
            (FusionParams { keyword_weight: 2e6, ..zero }, "fusion.keyword_weight"),
        ] {
            match bad.validate() {
                Err(IndexError::InvalidRequest { param, .. }) => assert_eq!(param.as_deref(), Some(field)),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn dbsf_by_hand() {
        let p =
            FusionParams { method: FusionMethod::Dbsf, dense_weight: 1.0, keyword_weight: 2.0, ..Default::default() };
        // Dense 0.9, 0.6, 0.3: mean 0.6, sample σ 0.3, so the scale runs from −0.3 to 1.5.
        // Keyword 10, 2: mean 6, sample σ √32, so the scale is 6 ± 3√32.
        let out = fuse(&p, &[(1, 0.9), (2, 0.6), (3, 0.3)], &[(3, 10.0), (4, 2.0)]);
        let by_id = |id| out.iter().find(|f| f.id == id).unwrap().score;
        let kw = |s: f32| (s - (6.0 - 3.0 * 32f32.sqrt())) / (6.0 * 32f32.sqrt());
        assert!((by_id(1) - 1.2 / 1.8).abs() < 1e-6, "{}", by_id(1));
        assert!((by_id(2) - 0.5).abs() < 1e-6);
        assert!((by_id(3) - (0.6 / 1.8 + 2.0 * kw(10.0))).abs() < 1e-6, "{}", by_id(3));
        assert!((by_id(4) - 2.0 * kw(2.0)).abs() < 1e-6);
        assert_eq!(out.iter().map(|f| f.id).collect::<Vec<_>>(), vec![3, 4, 1, 2]);
        // One score, or equal scores, scale to 0.5 (min-max gives 1).
        let out = fuse(&p, &[(7, 0.4)], &[(8, 3.0), (9, 3.0)]);
        assert_eq!(out.iter().map(|f| (f.id, f.score)).collect::<Vec<_>>(), vec![(8, 1.0), (9, 1.0), (7, 0.5)]);
        let convex = FusionParams { method: FusionMethod::Convex, ..p };
        assert_eq!(fuse(&convex, &[(7, 0.4)], &[])[0].score, 1.0);
        // The method's name in the API.
        assert_eq!(serde_json::from_str::<FusionMethod>("\"dbsf\"").unwrap(), FusionMethod::Dbsf);
    }
}
