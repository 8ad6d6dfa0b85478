"""Retrieval-augmented chat through the official `openai` package (RAGWAY_URL): the `rag`
object goes in `extra_body`, citations and grounding come back in the response's extra
`rag` field, streamed or not. Expects the collection `rag-openai` (HaluEval knowledge)."""
import os

import openai
from openai import OpenAI

url = os.environ["RAGWAY_URL"]
client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
MODEL = "SmolLM2-135M-Instruct"
question = "The Oberoi family is part of a hotel company that has a head office in what city?"
rag = {"collection": "rag-openai", "top_k": 3}

resp = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": question}], extra_body={"rag": rag}
)
assert resp.object == "chat.completion", resp
answer = resp.choices[0].message.content
assert "Delhi" in answer, answer
extra = resp.model_extra["rag"]
assert extra["citations"][0]["document_id"] == "halu-1", extra
assert extra["grounding"]["flagged"] is False, extra
assert extra["template"]["name"] == "rag-answer", extra

stream = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": question}], stream=True, extra_body={"rag": rag}
)
chunks = list(stream)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == answer, (text, answer)
tails = [c.model_extra["rag"] for c in chunks if not c.choices and c.model_extra.get("rag")]
assert len(tails) == 1 and tails[0]["citations"] == extra["citations"], tails

# A follow-up is condensed with the history before retrieval.
resp = client.chat.completions.create(
    model=MODEL,
    messages=[
        {"role": "user", "content": "Tell me about the Oberoi Group."},
        {"role": "assistant", "content": "The Oberoi Group is a hotel company owned by the Oberoi family."},
        {"role": "user", "content": "Where is its head office?"},
    ],
    extra_body={"rag": rag},
)
assert resp.model_extra["rag"]["condensed"] is True, resp.model_extra
assert resp.model_extra["rag"]["question"] != "Where is its head office?", resp.model_extra

# Errors keep OpenAI's shape: an unknown collection is a 404 the SDK raises as NotFoundError.
try:
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], extra_body={"rag": {"collection": "nope"}}
    )
    raise AssertionError("expected a 404")
except openai.NotFoundError as e:
    assert e.body["code"] == "collection_not_found", e.body

print("openai rag client: all checks passed")
