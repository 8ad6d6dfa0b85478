//! Self-contained HTML reports: inline CSS and SVG charts, no scripts or network fetches.

use serde_json::Value;
use std::fmt::Write;

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}\
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}\
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}.meta{color:#555}\
.good{color:#1a7f37}.bad{color:#c62828}svg{display:block;margin:.5em 0}code{background:#f4f4f4;padding:0 3px}";

/// A bar: label, value, optional 95% interval.
pub type Bar = (String, f64, Option<(f64, f64)>);

/// Horizontal bars in [0, max] with CI whiskers.
pub fn bar_chart(items: &[Bar]) -> String {
    let max = items.iter().map(|(_, v, ci)| ci.map_or(*v, |c| c.1).max(*v)).fold(1.0f64, f64::max);
    let (w, row, left) = (760.0, 22.0, 190.0);
    let h = row * items.len() as f64 + 30.0;
    let x = |v: f64| left + (v / max).clamp(0.0, 1.0) * (w - left - 60.0);
    let mut s = format!("<svg width=\"{w}\" height=\"{h}\" role=\"img\"><title>metrics with 95% intervals</title>");
    for t in 0..=4 {
        let v = max * t as f64 / 4.0;
        let _ = write!(s, "<line x1=\"{0}\" x2=\"{0}\" y1=\"0\" y2=\"{1}\" stroke=\"#eee\"/><text x=\"{0}\" y=\"{2}\" font-size=\"10\" text-anchor=\"middle\">{3:.2}</text>", x(v), h - 20.0, h - 6.0, v);
    }
    for (i, (label, v, ci)) in items.iter().enumerate() {
        let y = i as f64 * row + 4.0;
        let _ = write!(s, "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"end\">{}</text>", left - 6.0, y + 13.0, esc(label));
        if v.is_finite() {
            let _ = write!(s, "<rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"16\" fill=\"#5b8def\"><title>{}: {v:.4}</title></rect>", x(*v) - left, esc(label));
            if let Some((lo, hi)) = ci.filter(|c| c.0.is_finite() && c.1.is_finite()) {
                let _ = write!(s, "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{2}\" y2=\"{2}\" stroke=\"#222\"/><line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{3}\" y2=\"{4}\" stroke=\"#222\"/><line x1=\"{1:.1}\" x2=\"{1:.1}\" y1=\"{3}\" y2=\"{4}\" stroke=\"#222\"/>", x(lo), x(hi), y + 8.0, y + 3.0, y + 13.0);
            }
            let _ = write!(s, "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\">{v:.3}</text>", x(ci.map_or(*v, |c| c.1.max(*v))) + 4.0, y + 12.0);
        }
    }
    s + "</svg>"
}

/// Lines over categorical x positions (e.g. k = 1, 3, 5, 10, 100).
pub fn line_chart(xs: &[String], series: &[(String, Vec<f64>)]) -> String {
    let (w, h, l, b) = (640.0, 260.0, 50.0, 40.0);
    let colors = ["#5b8def", "#e8793a", "#2ca02c", "#9467bd", "#d62728", "#8c564b"];
    let px = |i: usize| l + (w - l - 130.0) * if xs.len() > 1 { i as f64 / (xs.len() - 1) as f64 } else { 0.5 };
    let py = |v: f64| (h - b) - v.clamp(0.0, 1.0) * (h - b - 10.0);
    let mut s = format!("<svg width=\"{w}\" height=\"{h}\" role=\"img\"><title>metrics at k</title>");
    for t in 0..=4 {
        let v = t as f64 / 4.0;
        let _ = write!(s, "<line x1=\"{l}\" x2=\"{0}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#eee\"/><text x=\"{2}\" y=\"{3:.1}\" font-size=\"10\" text-anchor=\"end\">{v:.2}</text>", w - 130.0, py(v), l - 4.0, py(v) + 3.0);
    }
    for (i, x) in xs.iter().enumerate() {
        let _ = write!(s, "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>", px(i), h - b + 16.0, esc(x));
    }
    let _ = write!(s, "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">k</text>", (l + w - 130.0) / 2.0, h - 6.0);
    for (si, (name, ys)) in series.iter().enumerate() {
        let c = colors[si % colors.len()];
        let pts: Vec<String> = ys.iter().enumerate().filter(|(_, y)| y.is_finite()).map(|(i, y)| format!("{:.1},{:.1}", px(i), py(*y))).collect();
        let _ = write!(s, "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>", pts.join(" "));
        for (i, y) in ys.iter().enumerate().filter(|(_, y)| y.is_finite()) {
            let _ = write!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"><title>{}@{}: {y:.4}</title></circle>", px(i), py(*y), esc(name), esc(&xs[i]));
        }
        let _ = write!(s, "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" fill=\"{c}\"/><text x=\"{}\" y=\"{}\" font-size=\"12\">{}</text>", w - 120.0, 10.0 + si as f64 * 18.0, w - 105.0, 19.0 + si as f64 * 18.0, esc(name));
    }
    s + "</svg>"
}

/// A histogram of values over [lo, hi] in `bins` bins.
pub fn histogram(title: &str, values: &[f64], lo: f64, hi: f64, bins: usize) -> String {
    let mut counts = vec![0usize; bins];
    for v in values.iter().filter(|v| v.is_finite()) {
        let i = if hi > lo { (((v - lo) / (hi - lo)) * bins as f64).floor() as isize } else { 0 };
        counts[i.clamp(0, bins as isize - 1) as usize] += 1;
    }
    let max = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let (w, h, l, b) = (520.0, 200.0, 40.0, 34.0);
    let bw = (w - l - 10.0) / bins as f64;
    let mut s = format!("<svg width=\"{w}\" height=\"{h}\" role=\"img\"><title>{}</title>", esc(title));
    for (i, c) in counts.iter().enumerate() {
        let bh = (*c as f64 / max) * (h - b - 10.0);
        let (a, z) = (lo + (hi - lo) * i as f64 / bins as f64, lo + (hi - lo) * (i + 1) as f64 / bins as f64);
        let _ = write!(s, "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#5b8def\"><title>[{a:.2}, {z:.2}): {c}</title></rect>", l + i as f64 * bw + 1.0, h - b - bh, bw - 2.0);
    }
    for t in 0..=4 {
        let v = lo + (hi - lo) * t as f64 / 4.0;
        let _ = write!(s, "<text x=\"{:.1}\" y=\"{}\" font-size=\"10\" text-anchor=\"middle\">{v:.2}</text>", l + (w - l - 10.0) * t as f64 / 4.0, h - b + 14.0);
    }
    let _ = write!(s, "<text x=\"{}\" y=\"12\" font-size=\"10\" text-anchor=\"end\">{}</text><text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>", l - 4.0, max as usize, (l + w) / 2.0, h - 4.0, esc(title));
    s + "</svg>"
}

/// The numeric top-level entries of a summary (the metrics), sorted.
pub fn metrics_of(summary: &Value) -> Vec<(String, f64)> {
    let mut m: Vec<(String, f64)> = summary
        .as_object()
        .map(|o| o.iter().filter_map(|(k, v)| v.as_f64().filter(|_| k != "n").map(|x| (k.clone(), x))).collect())
        .unwrap_or_default();
    m.sort_by_key(|a| metric_order(&a.0));
    m
}

/// `ndcg@10` sorts by name then by k numerically.
fn metric_order(k: &str) -> (String, u64) {
    match k.split_once('@') {
        Some((n, c)) => (n.to_string(), c.parse().unwrap_or(0)),
        None => (k.to_string(), 0),
    }
}

pub fn ci_of(summary: &Value, k: &str) -> Option<(f64, f64)> {
    let c = &summary["ci95"][k];
    Some((c[0].as_f64()?, c[1].as_f64()?))
}

fn head(title: &str) -> String {
    format!("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>", esc(title))
}

fn per_sample(records: &[Value], metric: &str) -> Vec<f64> {
    records.iter().filter_map(|r| r["metrics"][metric].as_f64()).collect()
}

/// The report of one run.
pub fn run_report(summary: &Value, records: &[Value]) -> String {
    let run = &summary["run"];
    let kind = run["kind"].as_str().unwrap_or_default();
    let primary = summary["primary"].as_str().unwrap_or("f1");
    let mut s = head(&format!("ragway eval: {kind}"));
    let _ = write!(
        s,
        "<h1>ragway eval — {}</h1><p class=\"meta\">dataset <code>{}</code> · {} samples evaluated of {} · {} errors · {:.1} s · configuration <code>{}</code></p>",
        esc(kind),
        esc(run["dataset"].as_str().unwrap_or_default()),
        run["evaluated"],
        run["samples"],
        run["errors"],
        run["duration_s"].as_f64().unwrap_or(0.0),
        esc(run["config_hash"].as_str().unwrap_or_default())
    );
    if let Some(e) = run["empty_queries"].as_str() {
        let _ = write!(s, "<p class=\"meta\">Empty queries: {}.</p>", esc(e));
    }
    if summary["judge"].is_object() {
        let j = &summary["judge"];
        let _ = write!(s, "<p class=\"meta\">Judge: {} calls, {} unparseable verdicts ({:.1}%), counted and left out of the metrics they would feed.</p>", j["calls"], j["unparseable"], 100.0 * j["unparseable_rate"].as_f64().unwrap_or(0.0));
    }
    let metrics = metrics_of(summary);
    s.push_str("<h2>Summary</h2><table><tr><th>metric</th><th>value</th><th>95% CI (bootstrap)</th><th>n</th></tr>");
    for (k, v) in &metrics {
        let ci = ci_of(summary, k).map_or(String::new(), |(a, b)| format!("[{a:.4}, {b:.4}]"));
        let _ = write!(s, "<tr><td>{}</td><td class=\"n\">{v:.4}</td><td class=\"n\">{ci}</td><td class=\"n\">{}</td></tr>", esc(k), summary["n_by_metric"][k]);
    }
    s.push_str("</table>");
    // Bars: every metric for rag / halueval; the @10 ones for retrieval (the rest are curves).
    let bars: Vec<Bar> = metrics
        .iter()
        .filter(|(k, _)| kind != "retrieval" || k.ends_with("@10"))
        .map(|(k, v)| (k.clone(), *v, ci_of(summary, k)))
        .collect();
    s.push_str("<h2>Metrics with 95% intervals</h2>");
    s.push_str(&bar_chart(&bars));
    if kind == "retrieval" {
        let ks: Vec<String> = crate::retrieval::CUTOFFS.iter().map(|k| k.to_string()).collect();
        let series: Vec<(String, Vec<f64>)> = ["recall", "ndcg", "map", "precision", "mrr", "hit"]
            .iter()
            .map(|m| (m.to_string(), crate::retrieval::CUTOFFS.iter().map(|k| summary[format!("{m}@{k}")].as_f64().unwrap_or(f64::NAN)).collect()))
            .collect();
        s.push_str("<h2>Metrics at k (recall@k curve)</h2>");
        s.push_str(&line_chart(&ks, &series));
    }
    s.push_str("<h2>Score distributions</h2>");
    s.push_str(&histogram(&format!("per-sample {primary}"), &per_sample(records, primary), 0.0, 1.0, 20));
    match kind {
        "retrieval" => {
            let top: Vec<f64> = records.iter().filter_map(|r| r["outputs"]["top_score"].as_f64()).collect();
            let (lo, hi) = top.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
            if lo.is_finite() {
                s.push_str(&histogram("top-1 retrieval score", &top, lo, if hi > lo { hi } else { lo + 1.0 }, 20));
            }
        }
        "rag" => {
            s.push_str(&histogram("grounding score", &per_sample(records, "grounding"), 0.0, 1.0, 20));
            s.push_str(&histogram("faithfulness", &per_sample(records, "faithfulness"), 0.0, 1.0, 10));
        }
        _ => {
            // Confusion matrix of the verdicts.
            let mut cm = std::collections::BTreeMap::new();
            for r in records {
                let key = (r["outputs"]["truth"].as_str().unwrap_or("?").to_string(), r["outputs"]["verdict"].as_str().unwrap_or("?").to_string());
                *cm.entry(key).or_insert(0usize) += 1;
            }
            s.push_str("<table><tr><th>truth \\ verdict</th><th>yes (hallucinated)</th><th>no (supported)</th><th>unparseable</th></tr>");
            for truth in ["yes", "no"] {
                let _ = write!(s, "<tr><th>{}</th>", if truth == "yes" { "hallucinated answer" } else { "right answer" });
                for v in ["yes", "no", "unparseable"] {
                    let _ = write!(s, "<td class=\"n\">{}</td>", cm.get(&(truth.to_string(), v.to_string())).copied().unwrap_or(0));
                }
                s.push_str("</tr>");
            }
            s.push_str("</table>");
        }
    }
    s.push_str(&worst_samples(records, primary, 20));
    s.push_str("</body></html>");
    s
}

fn sample_text(r: &Value) -> (String, String) {
    let i = &r["inputs"];
    let o = &r["outputs"];
    let input = i["query"].as_str().or(i["question"].as_str()).unwrap_or_default().to_string();
    let output = if let Some(a) = o["answer"].as_str() {
        let gold = i["answers"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" | ")).unwrap_or_default();
        format!("{}  — gold: {gold}", short(a, 300))
    } else if let Some(v) = o["verdict"].as_str() {
        format!("shown {} answer “{}”; verdict {v} ({})", i["shown"].as_str().unwrap_or("?"), short(i["answer"].as_str().unwrap_or_default(), 120), short(o["raw"].as_str().unwrap_or_default(), 40))
    } else {
        let top: Vec<String> = r["retrieved"].as_array().map(Vec::as_slice).unwrap_or_default().iter().take(5).filter_map(|h| h["doc_id"].as_str().map(str::to_string)).collect();
        let rel: Vec<String> = i["relevant"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        format!("top 5: {} — relevant: {}", top.join(", "), rel.join(", "))
    };
    (input, output)
}

fn worst_samples(records: &[Value], primary: &str, n: usize) -> String {
    let mut scored: Vec<(f64, &Value)> = records.iter().filter_map(|r| r["metrics"][primary].as_f64().map(|v| (v, r))).collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1["id"].as_str().cmp(&b.1["id"].as_str())));
    let mut s = format!("<h2>Worst {} samples by {}</h2><table><tr><th>id</th><th>{}</th><th>input</th><th>output</th></tr>", n.min(scored.len()), esc(primary), esc(primary));
    for (v, r) in scored.iter().take(n) {
        let (input, output) = sample_text(r);
        let _ = write!(s, "<tr><td>{}</td><td class=\"n\">{v:.3}</td><td>{}</td><td>{}</td></tr>", esc(r["id"].as_str().unwrap_or_default()), esc(&short(&input, 200)), esc(&output));
    }
    s + "</table>"
}

/// The comparison page of two runs.
pub fn compare_report(cmp: &Value) -> String {
    let mut s = head("ragway eval compare");
    let _ = write!(
        s,
        "<h1>ragway eval — compare</h1><p class=\"meta\">A = <code>{}</code> · B = <code>{}</code> · {} paired samples · deltas are B − A; p from a paired permutation test, CI from a paired bootstrap</p>",
        esc(cmp["a"].as_str().unwrap_or_default()),
        esc(cmp["b"].as_str().unwrap_or_default()),
        cmp["paired_samples"]
    );
    s.push_str("<table><tr><th>metric</th><th>A</th><th>B</th><th>Δ (B−A)</th><th>Δ 95% CI</th><th>p</th><th>CIs overlap</th><th>n</th></tr>");
    let mut bars = Vec::new();
    for m in cmp["metrics"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let d = m["delta"].as_f64().unwrap_or(f64::NAN);
        let p = m["p_value"].as_f64().unwrap_or(f64::NAN);
        let class = if p < 0.05 { if d > 0.0 { "good" } else { "bad" } } else { "" };
        let _ = write!(
            s,
            "<tr><td>{}</td><td class=\"n\">{:.4}</td><td class=\"n\">{:.4}</td><td class=\"n {class}\">{d:+.4}</td><td class=\"n\">[{:+.4}, {:+.4}]</td><td class=\"n {class}\">{p:.4}</td><td>{}</td><td class=\"n\">{}</td></tr>",
            esc(m["metric"].as_str().unwrap_or_default()),
            m["a"].as_f64().unwrap_or(f64::NAN),
            m["b"].as_f64().unwrap_or(f64::NAN),
            m["delta_ci95"][0].as_f64().unwrap_or(f64::NAN),
            m["delta_ci95"][1].as_f64().unwrap_or(f64::NAN),
            if m["ci_overlap"].as_bool().unwrap_or(true) { "yes" } else { "no" },
            m["n"]
        );
        bars.push((format!("{} A", m["metric"].as_str().unwrap_or_default()), m["a"].as_f64().unwrap_or(f64::NAN), None));
        bars.push((format!("{} B", m["metric"].as_str().unwrap_or_default()), m["b"].as_f64().unwrap_or(f64::NAN), None));
    }
    s.push_str("</table><h2>A and B</h2>");
    s.push_str(&bar_chart(&bars));
    let flip = cmp["flip_metric"].as_str().unwrap_or_default();
    for (key, title) in [("improved", "fixed in B"), ("regressed", "broken in B")] {
        let list = cmp["flipped"][key].as_array().map(Vec::as_slice).unwrap_or_default();
        let _ = write!(s, "<h2>{} samples {title} ({})</h2><table><tr><th>id</th><th>A</th><th>B</th><th>input</th></tr>", list.len(), esc(flip));
        for f in list.iter().take(100) {
            let _ = write!(s, "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>", esc(f["id"].as_str().unwrap_or_default()), f["a"], f["b"], esc(&short(f["input"].as_str().unwrap_or_default(), 200)));
        }
        s.push_str("</table>");
    }
    s + "</body></html>"
}
