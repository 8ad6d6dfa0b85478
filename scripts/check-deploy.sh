#!/usr/bin/env bash
# Validates the deployment files offline: the compose file (docker-compose config -q, from
# Debian's docker-compose), the Prometheus configuration and alert rules (promtool, from
# Debian's prometheus). No Docker engine is needed. `.ci/run` installs both tools.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in docker-compose promtool; do
  command -v "$tool" >/dev/null || { echo "check-deploy: $tool is missing (apt-get install docker-compose prometheus)" >&2; exit 1; }
done
RAGWAY_API_KEYS=check docker-compose -f docker-compose.yml config -q
echo "check-deploy: docker-compose.yml is valid"
# promtool resolves rule_files relative to the config: check a copy pointing at the repo's rules.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp deploy/prometheus/alerts.yml "$tmp/alerts.yml"
sed "s#/etc/prometheus/alerts.yml#$tmp/alerts.yml#" deploy/prometheus/prometheus.yml > "$tmp/prometheus.yml"
promtool check config "$tmp/prometheus.yml"
promtool check rules deploy/prometheus/alerts.yml
python3 -c "import json,sys; json.load(open('deploy/grafana/dashboards/ragway.json'))" && echo "check-deploy: dashboard JSON parses"
# The Kubernetes example parses and has the objects the README describes (no cluster here).
/usr/bin/python3 - <<'PY'
import yaml
docs = [d for d in yaml.safe_load_all(open("deploy/kubernetes/ragway.yaml")) if d]
kinds = sorted(d["kind"] for d in docs)
assert kinds == ["Service", "StatefulSet"], kinds
sts = next(d for d in docs if d["kind"] == "StatefulSet")
assert sts["spec"]["replicas"] == 1, "the index is single-writer: one replica per data volume"
c = sts["spec"]["template"]["spec"]["containers"][0]
assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
out = [d for d in yaml.safe_load_all(open("deploy/kubernetes/scale-out.yaml")) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in out}
assert by[("StatefulSet", "ragway-index")]["spec"]["replicas"] == 1, "one index writer"
assert by[("Service", "ragway-engine")]["spec"]["clusterIP"] == "None", "engines need per-pod DNS names"
import tomllib
routing = tomllib.loads(by[("ConfigMap", "ragway-routing")]["data"]["ragway.toml"])
engines = by[("StatefulSet", "ragway-engine")]["spec"]["replicas"]
for m in routing["models"]:
    eps = m["versions"][0]["upstream"]["endpoints"]
    assert eps == [f"http://ragway-engine-{i}.ragway-engine:8080" for i in range(engines)], eps
print("check-deploy: Kubernetes examples parse")
PY
