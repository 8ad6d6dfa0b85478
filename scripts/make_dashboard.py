"""Writes deploy/grafana/dashboards/ragway.json, the provisioned Grafana dashboard.

Edit the panels here and rerun; the gateway's deploy test checks that every metric a panel
queries exists in ragway's /metrics."""
import json

DS = {"type": "prometheus", "uid": "prometheus"}
panels = []


def row(title):
    panels.append({"type": "row", "title": title, "collapsed": False, "panels": [],
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": len(panels) * 8}})


def ts(title, targets, unit="short", w=12, description=""):
    x = 0 if sum(1 for p in panels if p["type"] != "row") % 2 == 0 or w == 24 else 12
    panels.append({
        "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}},
        "targets": [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)} for i, (e, l) in enumerate(targets)],
        "gridPos": {"h": 8, "w": w, "x": x, "y": len(panels) * 8},
    })


row("Traffic")
ts("Request rate by route", [('sum by (route) (rate(ragway_http_requests_total[$__rate_interval]))', "{{route}}")], "reqps")
ts("Latency percentiles", [
    (f'histogram_quantile({q}, sum by (le) (rate(ragway_http_request_duration_seconds_bucket[$__rate_interval])))', f"p{int(q * 100)}")
    for q in (0.5, 0.95, 0.99)], "s")
ts("Errors and rejections", [
    ('sum(rate(ragway_http_requests_total{status=~"5.."}[$__rate_interval])) / clamp_min(sum(rate(ragway_http_requests_total[$__rate_interval])), 1e-9)', "5xx share"),
    ('sum(rate(ragway_http_requests_total{status=~"4.."}[$__rate_interval])) / clamp_min(sum(rate(ragway_http_requests_total[$__rate_interval])), 1e-9)', "4xx share"),
], "percentunit")
ts("Rejected requests by reason", [('sum by (reason) (rate(ragway_requests_rejected_total[$__rate_interval]))', "{{reason}}")], "reqps")

row("Generation")
ts("Time to first token", [
    (f'histogram_quantile({q}, sum by (le, model) (rate(ragway_generation_time_to_first_token_seconds_bucket[$__rate_interval])))', f"p{int(q * 100)} {{{{model}}}}")
    for q in (0.5, 0.95)], "s")
ts("Tokens per second", [
    ('sum by (model) (rate(ragway_generation_generated_tokens_total[$__rate_interval]))', "generated {{model}}"),
    ('sum by (model) (rate(ragway_generation_prompt_tokens_total[$__rate_interval]))', "prompt {{model}}"),
], "short")
ts("Inter-token latency", [
    (f'histogram_quantile({q}, sum by (le, model) (rate(ragway_generation_inter_token_latency_seconds_bucket[$__rate_interval])))', f"p{int(q * 100)} {{{{model}}}}")
    for q in (0.5, 0.95)], "s")
ts("Queue depth", [
    ('ragway_generation_waiting_requests', "generation waiting {{model}}"),
    ('ragway_embedding_queue_depth', "embedding queue {{model}}"),
], "short")
ts("Batch size", [
    ('sum by (model) (rate(ragway_generation_batch_sequences_total[$__rate_interval])) / clamp_min(sum by (model) (rate(ragway_generation_steps_total[$__rate_interval])), 1e-9)', "sequences per step {{model}}"),
    ('ragway_generation_running_sequences', "running {{model}}"),
    ('sum by (model) (rate(ragway_embedding_inputs_total[$__rate_interval])) / clamp_min(sum by (model) (rate(ragway_embedding_batches_total[$__rate_interval])), 1e-9)', "embedding inputs per batch {{model}}"),
], "short")
ts("KV cache", [
    ('ragway_generation_kv_cache_used_tokens / clamp_min(ragway_generation_kv_cache_capacity_tokens, 1)', "used {{model}}"),
    ('sum by (model) (rate(ragway_generation_preemptions_total[$__rate_interval]))', "preemptions/s {{model}}"),
], "percentunit")

row("RAG quality (template versions side by side)")
ts("Answers by template version and outcome", [
    ('sum by (template, version, outcome) (rate(ragway_rag_answers_total[$__rate_interval]))', "{{template}}@{{version}} {{outcome}}")], "reqps")
ts("Ungrounded share by template version", [
    ('sum by (template, version) (rate(ragway_rag_flagged_total[$__rate_interval])) / clamp_min(sum by (template, version) (rate(ragway_rag_answers_total{outcome="answered"}[$__rate_interval])), 1e-9)', "{{template}}@{{version}}")],
    "percentunit", description="Share of answers whose grounding score is below the threshold (alert: RagwayUngroundedAnswers).")
ts("Grounding score", [
    (f'histogram_quantile({q}, sum by (le) (rate(ragway_rag_grounding_score_bucket[$__rate_interval])))', f"p{int(q * 100)}") for q in (0.1, 0.5)], "percentunit")

row("Model versions (A/B and canary arms side by side)")
ts("Requests by model version and role", [
    ('sum by (model, version, role) (rate(ragway_model_requests_total[$__rate_interval]))', "{{model}}@{{version}} {{role}}")], "reqps")
ts("Error share by model version", [
    ('sum by (model, version) (rate(ragway_model_requests_total{outcome="error"}[$__rate_interval])) / clamp_min(sum by (model, version) (rate(ragway_model_requests_total[$__rate_interval])), 1e-9)', "{{model}}@{{version}}")],
    "percentunit", description="5xx and upstream failures; client errors (4xx) are not the version's fault.")
ts("p95 latency by model version", [
    ('histogram_quantile(0.95, sum by (le, model, version) (rate(ragway_model_request_duration_seconds_bucket[$__rate_interval])))', "{{model}}@{{version}}")], "s")
ts("Routing shares and canary rollbacks", [
    ('ragway_model_routing_share', "share {{model}}@{{version}}"),
    ('ragway_model_canary_rolled_back', "rolled back {{model}}"),
], "percentunit")
ts("Upstream endpoints: healthy and circuit open", [
    ('ragway_upstream_healthy', "healthy {{endpoint}}"),
    ('ragway_upstream_circuit_open', "circuit open {{endpoint}}"),
], "short")
ts("Upstream load", [
    ('ragway_upstream_in_flight', "in flight {{endpoint}}"),
    ('sum by (endpoint, outcome) (rate(ragway_upstream_requests_total[$__rate_interval]))', "{{outcome}}/s {{endpoint}}"),
], "short")

row("Drift and grounding")
ts("Query drift: KS statistics (window vs reference)", [
    ('ragway_drift_similarity_ks', "nearest-chunk similarity {{collection}}"),
    ('ragway_drift_centroid_ks', "centroid similarity {{collection}}"),
    ('ragway_drift_projection_ks', "projections (max) {{collection}}"),
], "short", description="Alert at 0.3 with p < 0.01 (RagwayQueryDrift).")
ts("Query length PSI and low-score share", [
    ('ragway_drift_length_psi', "length PSI {{collection}}"),
    ('ragway_drift_low_score_share', "low-score share {{collection}}"),
], "short")
ts("Drift alert state", [('ragway_drift_alert', "{{collection}}"), ('ragway_drift_window_queries', "window queries {{collection}}")], "short")
ts("Ungrounded share of recent RAG answers by collection", [('ragway_drift_grounding_flagged_share', "{{collection}}")], "percentunit")

row("Index")
ts("Documents and chunks", [('ragway_index_documents', "documents {{collection}}"), ('ragway_index_chunks', "chunks {{collection}}")], "short")
ts("Index size", [('ragway_index_disk_bytes', "disk {{collection}}"), ('ragway_index_memory_bytes', "memory {{collection}}")], "bytes")

# Lay out: rows full width, panels two per line.
y = 0
col = 0
for p in panels:
    if p["type"] == "row":
        if col:
            y += 8
        p["gridPos"] = {"h": 1, "w": 24, "x": 0, "y": y}
        y += 1
        col = 0
    else:
        p["gridPos"] = {"h": 8, "w": 12, "x": col * 12, "y": y}
        col += 1
        if col == 2:
            col = 0
            y += 8
for i, p in enumerate(panels):
    p["id"] = i + 1

dashboard = {
    "uid": "ragway", "title": "ragway", "tags": ["ragway"], "timezone": "browser",
    "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": []}, "annotations": {"list": []}, "panels": panels,
}
with open("deploy/grafana/dashboards/ragway.json", "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
