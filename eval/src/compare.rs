//! Two runs side by side: per-metric deltas over the samples both evaluated, a paired
//! bootstrap interval and a paired permutation test for each, whether the runs' own
//! intervals overlap, and the samples that flipped.

use crate::report::{ci_of, metrics_of};
use crate::stats;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;

pub fn load_run(dir: &Path) -> Result<(Value, Vec<Value>)> {
    let summary: Value = serde_json::from_slice(&std::fs::read(dir.join("summary.json")).with_context(|| format!("{} has no summary.json (not a finished run?)", dir.display()))?)?;
    let f = std::fs::File::open(dir.join("samples.jsonl")).with_context(|| format!("{} has no samples.jsonl", dir.display()))?;
    let mut records = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        records.push(serde_json::from_str(&line).with_context(|| format!("{}/samples.jsonl line {}", dir.display(), i + 1))?);
    }
    Ok((summary, records))
}

pub fn compare(a_dir: &Path, b_dir: &Path, resamples: usize, seed: u64) -> Result<Value> {
    let (sa, ra) = load_run(a_dir)?;
    let (sb, rb) = load_run(b_dir)?;
    let (ka, kb) = (sa["run"]["kind"].as_str().unwrap_or_default(), sb["run"]["kind"].as_str().unwrap_or_default());
    if ka != kb {
        bail!("cannot compare a {ka} run with a {kb} run");
    }
    let kind = crate::runner::EvalKind::parse(ka).unwrap_or(crate::runner::EvalKind::Rag);
    let by_id: HashMap<&str, &Value> = ra.iter().filter_map(|r| r["id"].as_str().map(|id| (id, r))).collect();
    let pairs: Vec<(&Value, &Value)> = rb.iter().filter_map(|b| b["id"].as_str().and_then(|id| by_id.get(id)).map(|a| (*a, b))).collect();
    let mut metrics = Vec::new();
    for (i, (k, _)) in metrics_of(&sb).iter().enumerate() {
        if sa.get(k).and_then(Value::as_f64).is_none() {
            continue;
        }
        let (xa, xb): (Vec<f64>, Vec<f64>) = pairs.iter().filter_map(|(a, b)| Some((a["metrics"][k].as_f64()?, b["metrics"][k].as_f64()?))).unzip();
        let p = stats::paired(&xa, &xb, resamples, seed.wrapping_add(i as u64));
        let overlap = match (ci_of(&sa, k), ci_of(&sb, k)) {
            (Some(a), Some(b)) => a.0 <= b.1 && b.0 <= a.1,
            _ => true,
        };
        metrics.push(json!({
            "metric": k, "a": sa[k], "b": sb[k], "delta": sb[k].as_f64().unwrap_or(0.0) - sa[k].as_f64().unwrap_or(0.0),
            "paired_delta": p.delta, "delta_ci95": [p.ci95.0, p.ci95.1], "p_value": p.p_value, "ci_overlap": overlap, "n": p.n,
        }));
    }
    let flip = kind.flip_metric();
    let (mut improved, mut regressed) = (Vec::new(), Vec::new());
    for (a, b) in &pairs {
        let (Some(x), Some(y)) = (a["metrics"][flip].as_f64(), b["metrics"][flip].as_f64()) else { continue };
        if x != y {
            let input = b["inputs"]["query"].as_str().or(b["inputs"]["question"].as_str()).unwrap_or_default();
            let f = json!({"id": b["id"], "a": x, "b": y, "input": input});
            if y > x {
                improved.push(f);
            } else {
                regressed.push(f);
            }
        }
    }
    Ok(json!({
        "a": a_dir.display().to_string(), "b": b_dir.display().to_string(), "kind": ka,
        "paired_samples": pairs.len(), "metrics": metrics, "flip_metric": flip,
        "flipped": {"improved": improved, "regressed": regressed},
    }))
}

/// The comparison as a text table.
pub fn table(cmp: &Value) -> String {
    let mut s = format!("{:<24} {:>9} {:>9} {:>9} {:>22} {:>8} {:>8}\n", "metric", "A", "B", "delta", "delta 95% CI", "p", "overlap");
    for m in cmp["metrics"].as_array().map(Vec::as_slice).unwrap_or_default() {
        s += &format!(
            "{:<24} {:>9.4} {:>9.4} {:>+9.4} {:>22} {:>8.4} {:>8}\n",
            m["metric"].as_str().unwrap_or_default(),
            m["a"].as_f64().unwrap_or(f64::NAN),
            m["b"].as_f64().unwrap_or(f64::NAN),
            m["delta"].as_f64().unwrap_or(f64::NAN),
            format!("[{:+.4}, {:+.4}]", m["delta_ci95"][0].as_f64().unwrap_or(f64::NAN), m["delta_ci95"][1].as_f64().unwrap_or(f64::NAN)),
            m["p_value"].as_f64().unwrap_or(f64::NAN),
            if m["ci_overlap"].as_bool().unwrap_or(true) { "yes" } else { "no" },
        );
    }
    s += &format!(
        "{} paired samples; {} flipped to better and {} to worse on {}\n",
        cmp["paired_samples"],
        cmp["flipped"]["improved"].as_array().map_or(0, Vec::len),
        cmp["flipped"]["regressed"].as_array().map_or(0, Vec::len),
        cmp["flip_metric"].as_str().unwrap_or_default()
    );
    s
}
