"""Runs the README's first Python example unchanged against a running ragway (RAGWAY_URL):
only its base_url is pointed at the test server. The streamed chat answer must finish by
itself (finish_reason "stop") within the server's default token cap, and the model's
generation defaults must be what GET /v1/models/{id} says.

The example samples (temperature 0.8), and SmolLM2-135M sometimes repeats itself until the
1,024-token cap: measured 1 answer in 60 (as the README says). Of five runs at least four
must stop by themselves (two or more loops: ~0.3% by chance at that rate), and a run that
does not must end at the cap ("length"), never with an error."""
import contextlib
import io
import json
import os
import pathlib
import re
import urllib.request

url = os.environ["RAGWAY_URL"]
readme = pathlib.Path(__file__).resolve().parents[2] / "README.md"
blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
example = next(b for b in blocks if "chat.completions.create" in b)
assert '"http://127.0.0.1:8080/v1"' in example, example
code = example.replace('"http://127.0.0.1:8080/v1"', json.dumps(url + "/v1"))

model = re.search(r'model="([^"]+)", stream=True', code).group(1)
with urllib.request.urlopen(f"{url}/v1/models/{model}") as r:
    info = json.load(r)
defaults = info["generation_defaults"]
assert defaults["max_tokens"] == 1024, defaults
assert (defaults["temperature"], defaults["top_k"]) == (0.8, 40), defaults

answers = []
loops = []
for run in range(5):
    out = io.StringIO()
    ns = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(readme), "exec"), ns)
    last = ns["chunk"]  # the loop's last chunk carries the finish reason
    text = out.getvalue()
    reason = last.choices[0].finish_reason
    assert reason in ("stop", "length"), (run, last, text[-300:])
    assert text.strip(), run
    if reason == "length":
        loops.append(text[-300:])
    else:
        answers.append(text)
    print(f"README example run {run} ({reason}): {text[:300]!r}")
assert len(loops) <= 1, f"{len(loops)} of 5 answers ran to the token cap: {loops}"
print("openai readme example: all checks passed")
