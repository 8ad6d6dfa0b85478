"""Structured outputs and tool calling through the official `openai` package against a running
ragway (RAGWAY_URL): `chat.completions.parse` with Pydantic models, json_object, ragway's
regex format, tools with `required` and a named function, streamed tool-call deltas
reassembled by the SDK, a whole tool round trip, and the errors of bad schemas."""
import json
import os
import re
from typing import List, Literal

import openai
from openai import OpenAI
from pydantic import BaseModel, Field

url = os.environ["RAGWAY_URL"]
client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
MODEL = "SmolLM2-135M-Instruct"


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    hobbies: List[Literal["chess", "music", "hiking", "cooking"]] = Field(max_length=3)


# 1. response_format from a Pydantic model, parsed by the SDK (it sends a strict json_schema).
for seed in range(3):
    done = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person: name, age and hobbies."}],
        response_format=Person,
        temperature=0.7,
        seed=seed,
        max_tokens=120,
    )
    msg = done.choices[0].message
    assert done.choices[0].finish_reason == "stop", done
    assert isinstance(msg.parsed, Person), msg
    print("parsed:", msg.parsed)

# 2. json_object: any JSON object.
resp = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Return a JSON object with keys fruit and colour for a banana."}],
    response_format={"type": "json_object"},
    temperature=0,
    max_tokens=100,
)
assert resp.choices[0].finish_reason == "stop", resp
obj = json.loads(resp.choices[0].message.content)
assert isinstance(obj, dict), obj
print("json_object:", obj)

# 3. ragway's regex format.
resp = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "What is the date of the first moon landing?"}],
    response_format={"type": "regex", "pattern": r"\d{4}-\d{2}-\d{2}"},
    temperature=0,
)
assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", resp.choices[0].message.content), resp.choices[0].message.content
print("regex:", resp.choices[0].message.content)

# 4. A schema that cannot finish within max_tokens ends with "length"; parse() says so.
try:
    client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person,
        max_tokens=5,
    )
    raise AssertionError("parse() should have refused a cut-off answer")
except openai.LengthFinishReasonError:
    pass

# 5. Bad schemas and formats are 400 naming the field.
for fmt, param in [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}, "response_format"),
    ({"type": "regex", "pattern": "(unclosed"}, "response_format"),
    ({"type": "yaml"}, "response_format.type"),
]:
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], response_format=fmt)
        raise AssertionError(f"{fmt} was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == param, (fmt, e.body)
        assert e.body["message"], e.body

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
question = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_weather_args(args: str):
    a = json.loads(args)
    assert set(a) == {"city", "unit"}, a
    assert isinstance(a["city"], str) and a["unit"] in ("celsius", "fahrenheit"), a
    return a


# 6. tool_choice="required": a call whose arguments follow the schema.
resp = client.chat.completions.create(
    model=MODEL, messages=question, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, temperature=0
)
choice = resp.choices[0]
assert choice.finish_reason == "tool_calls", choice
assert choice.message.content is None, choice.message
(call,) = choice.message.tool_calls
assert call.type == "function" and call.id.startswith("call_"), call
assert call.function.name in ("get_weather", "get_time"), call
if call.function.name == "get_weather":
    check_weather_args(call.function.arguments)
print("required:", call.function.name, call.function.arguments)

# 7. A named function is the one called, even when the question is about something else.
resp = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Tell me a joke."}],
    tools=[WEATHER, TIME],
    tool_choice={"type": "function", "function": {"name": "get_time"}},
    temperature=0,
)
calls = resp.choices[0].message.tool_calls
assert calls and all(c.function.name == "get_time" for c in calls), resp
assert all(isinstance(json.loads(c.function.arguments)["zone"], str) for c in calls)
assert len(calls) <= 8


# 8. Streaming: tool_calls deltas, arguments in pieces, reassembled by the SDK's stream helper.
class GetWeather(BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]


with client.chat.completions.stream(
    model=MODEL,
    messages=question,
    tools=[openai.pydantic_function_tool(GetWeather, name="get_weather")],
    tool_choice="required",
    parallel_tool_calls=False,
    temperature=0,
) as stream:
    argument_pieces = 0
    for event in stream:
        if event.type == "tool_calls.function.arguments.delta":
            argument_pieces += 1
    final = stream.get_final_completion()
assert argument_pieces > 1, argument_pieces
fc = final.choices[0].message.tool_calls[0]
assert isinstance(fc.function.parsed_arguments, GetWeather), fc
assert final.choices[0].finish_reason == "tool_calls"
print("streamed:", fc.function.parsed_arguments, f"in {argument_pieces} pieces")

# 9. The whole round trip: the call, the tool's answer, then the model's reply in text.
first = client.chat.completions.create(
    model=MODEL, messages=question, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=0
)
call = first.choices[0].message.tool_calls[0]
history = question + [
    first.choices[0].message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})},
]
final = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=200)
reply = final.choices[0]
assert reply.finish_reason == "stop", reply
assert reply.message.tool_calls is None and reply.message.content.strip(), reply
print("round trip:", reply.message.content)

# 10. Tool errors: an unknown named function, a tool message without its call id.
try:
    client.chat.completions.create(
        model=MODEL, messages=question, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}
    )
    raise AssertionError("unknown tool accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "tool_choice", e.body
try:
    client.chat.completions.create(model=MODEL, messages=question + [{"role": "tool", "content": "x"}])
    raise AssertionError("tool message without tool_call_id accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "messages[1].tool_call_id", e.body

print("openai structured: all checks passed")
