"""Drives a ragway that has API keys (RAGWAY_URL) with the official `openai` package: a
valid key works for embeddings, chat streaming and models; a missing or wrong key raises
AuthenticationError; a key over its request budget raises RateLimitError."""
import os

import openai
from openai import OpenAI

url = os.environ["RAGWAY_URL"] + "/v1"
reader = OpenAI(base_url=url, api_key=os.environ["RAGWAY_KEY"], max_retries=0)

assert "SmolLM2-135M-Instruct" in [m.id for m in reader.models.list()]
emb = reader.embeddings.create(model="all-MiniLM-L6-v2", input="keys and scopes")
assert len(emb.data[0].embedding) == 384
chunks = list(reader.chat.completions.create(
    model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Say hi."}],
    max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}))
assert chunks[-1].usage.completion_tokens >= 1, chunks[-1]

for key in ["sk-wrong", ""]:
    try:
        OpenAI(base_url=url, api_key=key or "x", max_retries=0, default_headers={"Authorization": ""} if not key else None).models.list()
        raise SystemExit("expected AuthenticationError")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.body["code"] == "invalid_api_key", e.body

slow = OpenAI(base_url=url, api_key=os.environ["RAGWAY_SLOW_KEY"], max_retries=0)
slow.models.list()
try:
    slow.models.list()
    raise SystemExit("expected RateLimitError")
except openai.RateLimitError as e:
    assert e.status_code == 429 and e.body["code"] == "rate_limit_exceeded", e.body
    assert int(e.response.headers["retry-after"]) >= 1

print("openai auth client: all checks passed")
