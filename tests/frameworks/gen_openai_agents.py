"""The OpenAI Agents SDK: an agent named ``ops-agent``, traced by OpenInference or OpenLLMetry.

Run in the openai_agents virtualenv: ``python gen_openai_agents.py {openinference,openllmetry} OUT``.
The model is a custom ``agents.models.interface.Model`` answering with the scenario's tool calls.
"""

from __future__ import annotations

import json
from typing import Any

from agents import Agent, Runner, function_tool, response_span, set_trace_processors
from agents.items import ModelResponse
from agents.models.interface import Model
from agents.usage import Usage
from harness import AGENT_NAME, INSTRUCTIONS, TOOLS, Call, final_answer, main, usage
from openai.types.responses import (
    Response,
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseUsage,
)


class ScriptedModel(Model):
    def __init__(self, turns: list[list[Call]]) -> None:
        self.turns = turns
        self.n = 0

    async def get_response(self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any) -> ModelResponse:
        n, self.n = self.n, self.n + 1
        inp, outp = usage(n)
        use = Usage(requests=1, input_tokens=inp, output_tokens=outp, total_tokens=inp + outp)
        if n < len(self.turns):
            output: list[Any] = [
                ResponseFunctionToolCall(type="function_call", id=f"fc_{c.call_id}", call_id=c.call_id, name=c.tool,
                                         arguments=json.dumps(c.args), status="completed")
                for c in self.turns[n]
            ]
        else:
            text = ResponseOutputText(type="output_text", text=final_answer(), annotations=[])
            output = [ResponseOutputMessage(type="message", id=f"msg_{n}", role="assistant", status="completed",
                                            content=[text])]
        # a model records its own span, as the SDK's default (Responses API) model does
        with response_span() as span:
            span.span_data.response = Response.model_construct(
                id=f"resp_{n}", object="response", created_at=0, model="fake-ops-model", output=output,
                parallel_tool_calls=True, tool_choice="auto", tools=[], instructions=system_instructions,
                usage=ResponseUsage(input_tokens=inp, output_tokens=outp, total_tokens=inp + outp,
                                    input_tokens_details={"cached_tokens": 0, "cache_write_tokens": 0},
                                    output_tokens_details={"reasoning_tokens": 0}))
            span.span_data.input = input
        return ModelResponse(output=output, usage=use, response_id=f"resp_{n}")

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("the scenarios run without streaming")


def run(scenario: str, turns: list[list[Call]]) -> None:
    agent = Agent(name=AGENT_NAME, instructions=INSTRUCTIONS, model=ScriptedModel(turns),
                  tools=[function_tool(f) for f in TOOLS.values()])
    Runner.run_sync(agent, f"scenario {scenario}", max_turns=len(turns) + 2)


def instrument(which: str, provider: Any) -> None:
    set_trace_processors([])  # no export to the OpenAI platform: only the instrumentation's processor
    if which == "openinference":
        from openinference.instrumentation.openai_agents import OpenAIAgentsInstrumentor

        OpenAIAgentsInstrumentor().instrument(tracer_provider=provider)
    else:
        from opentelemetry.instrumentation.openai_agents import OpenAIAgentsInstrumentor

        OpenAIAgentsInstrumentor().instrument(tracer_provider=provider)


if __name__ == "__main__":
    main(run, instrument, ("openinference", "openllmetry"))
