"""Runs the README's first Python example unchanged against a running ragway (RAGWAY_URL):
only its base_url is pointed at the test server. The example asks for greedy decoding
(temperature=0): every run must stream the answer the README prints, the same each time,
and finish by itself (finish_reason "stop"). The model's generation defaults (what a
request that leaves sampling unset gets) must be what GET /v1/models/{id} says."""
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

printed = re.search(r'This prints "([^"]+)"', readme.read_text()).group(1)
assert "temperature=0" in code, code
answers = []
for run in range(3):
    out = io.StringIO()
    ns = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(readme), "exec"), ns)
    last = ns["chunk"]  # the loop's last chunk carries the finish reason
    text = out.getvalue()
    reason = last.choices[0].finish_reason
    print(f"README example run {run} ({reason}): {text[:300]!r}")
    assert reason == "stop", (run, last, text[-300:])
    assert text.strip() == printed, (run, text, printed)
    answers.append(text)
assert len(set(answers)) == 1, answers
print("openai readme example: all checks passed")
