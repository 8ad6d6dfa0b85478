"""Drives a running ragway with the official `openai` package (RAGWAY_URL) and checks
embeddings (default base64 transport and float), models, and error mapping."""
import json
import math
import os
import sys

import openai
from openai import OpenAI

url = os.environ["RAGWAY_URL"]
client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
fixture = json.load(open(os.environ["RAGWAY_FIXTURE"]))
items = [it for it in fixture["items"] if it["text"]][:8]

# The client asks for base64 by default and decodes it.
resp = client.embeddings.create(model="all-MiniLM-L6-v2", input=[it["text"] for it in items])
assert resp.model == "all-MiniLM-L6-v2@v1", resp.model
assert len(resp.data) == len(items)
for d, it in zip(resp.data, items):
    assert len(d.embedding) == 384
    diff = max(abs(a - b) for a, b in zip(d.embedding, it["embedding"]))
    assert diff <= 1e-4, (it["name"], diff)
assert resp.usage.prompt_tokens == sum(it["num_tokens"] for it in items), resp.usage

single = client.embeddings.create(model="all-MiniLM-L6-v2", input="Hello world", encoding_format="float")
norm = math.sqrt(sum(x * x for x in single.data[0].embedding))
assert abs(norm - 1.0) < 1e-5, norm

models = [m.id for m in client.models.list()]
assert "all-MiniLM-L6-v2" in models, models
assert client.models.retrieve("all-MiniLM-L6-v2").id == "all-MiniLM-L6-v2"

try:
    client.embeddings.create(model="no-such-model", input="x")
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.body["code"] == "model_not_found", e.body

try:
    client.embeddings.create(model="all-MiniLM-L6-v2", input=[])
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.body["param"] == "input", e.body

print("openai client: all checks passed")
