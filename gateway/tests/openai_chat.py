"""Drives a running ragway with the official `openai` package (RAGWAY_URL): chat and text
completions, streaming and not, usage, stop, seeds, and error mapping."""
import os

import openai
from openai import OpenAI

url = os.environ["RAGWAY_URL"]
client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
MODEL = "SmolLM2-135M-Instruct"
messages = [{"role": "user", "content": "What is 2+2? Answer briefly."}]

# Non-streaming chat, greedy.
resp = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
assert resp.object == "chat.completion", resp
choice = resp.choices[0]
assert choice.message.role == "assistant"
assert "4" in choice.message.content, choice.message.content
assert choice.finish_reason == "stop"
assert resp.usage.prompt_tokens == 40, resp.usage  # llama.cpp's prompt ids for this chat
assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

# Streaming chat gives the same text, role first, finish reason, usage chunk last.
stream = client.chat.completions.create(
    model=MODEL, messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
)
chunks = list(stream)
assert chunks[0].choices[0].delta.role == "assistant"
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == choice.message.content, (text, choice.message.content)
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert finishes == ["stop"], finishes
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == resp.usage.completion_tokens, chunks[-1]

# Text completion: llama.cpp's greedy continuation, max_tokens and stop.
c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
assert c.choices[0].text == " Paris.\n\n", repr(c.choices[0].text)
assert c.choices[0].finish_reason == "length"
c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=30, temperature=0, stop=["United"])
assert c.choices[0].text == " Paris.\n\nThe ", repr(c.choices[0].text)
assert c.choices[0].finish_reason == "stop"
parts = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True))
assert "".join(p.choices[0].text for p in parts) == " Paris.\n\n"

# Seeded sampling repeats; n > 1 returns n choices.
a = client.chat.completions.create(model=MODEL, messages=messages, seed=11, temperature=0.8, max_tokens=20, n=2)
b = client.chat.completions.create(model=MODEL, messages=messages, seed=11, temperature=0.8, max_tokens=20, n=2)
assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]
assert len(a.choices) == 2 and [x.index for x in a.choices] == [0, 1]

# Logprobs.
lp = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=3, logprobs=True, top_logprobs=2)
content = lp.choices[0].logprobs.content
assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content), content

# Errors in OpenAI's shape.
try:
    client.completions.create(model=MODEL, prompt="hi", max_tokens=100000)
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.body["code"] == "context_length_exceeded", e.body
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
try:
    client.chat.completions.create(model=MODEL, messages=messages, temperature=5)
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body

print("openai chat client: all checks passed")
