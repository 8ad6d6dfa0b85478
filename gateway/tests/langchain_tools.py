"""LangChain's OpenAI integration against a running ragway (RAGWAY_URL): `bind_tools` with a
forced call (whole and streamed) and `with_structured_output(..., method="json_schema")`,
the two things agent frameworks and extraction pipelines are built on."""
import os
from typing import Literal

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

url = os.environ["RAGWAY_URL"]
llm = ChatOpenAI(model="SmolLM2-135M-Instruct", base_url=url + "/v1", api_key="unused", temperature=0, max_retries=0)


@tool
def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """Current weather in a city."""
    return f"18 degrees {unit} in {city}"


# bind_tools with a forced call: LangChain gets a parsed tool call whose args fit the signature.
agent = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)
msg = agent.invoke("What is the weather in Paris?")
assert len(msg.tool_calls) == 1, msg
call = msg.tool_calls[0]
assert call["name"] == "get_weather", call
assert set(call["args"]) == {"city", "unit"} and call["args"]["unit"] in ("celsius", "fahrenheit"), call
assert msg.response_metadata["finish_reason"] == "tool_calls", msg.response_metadata
print("bind_tools:", call)

# The tool runs and its answer goes back: LangChain writes the tool message, ragway renders it.
result = get_weather.invoke(call)
reply = llm.bind_tools([get_weather]).invoke(["What is the weather in Paris?", msg, result])
assert reply.content.strip() and not reply.tool_calls, reply
print("after the tool:", reply.content)

# Streaming: LangChain merges the tool_call_chunks into the same call.
merged = None
for chunk in agent.stream("What is the weather in Paris?"):
    merged = chunk if merged is None else merged + chunk
assert merged.tool_calls and merged.tool_calls[0]["name"] == "get_weather", merged
assert merged.tool_calls[0]["args"] == call["args"], (merged.tool_calls, call)
print("streamed:", merged.tool_calls[0])


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(description="the city's name")
    country: str = Field(description="the country's name")
    population_millions: float = Field(ge=0, le=50)


extract = llm.with_structured_output(City, method="json_schema")
city = extract.invoke("Paris is the capital of France, with about 2.1 million people.")
assert isinstance(city, City), city
print("structured:", city)

print("langchain: all checks passed")
