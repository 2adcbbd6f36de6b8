"""pydantic-ai: an agent named ``ops-agent``, traced by its built-in OpenTelemetry
instrumentation (GenAI conventions) or through OpenInference's span processor.

Run in the pydantic_ai virtualenv: ``python gen_pydantic_ai.py {builtin,openinference} OUT``.
The model is pydantic-ai's FunctionModel answering with the scenario's tool calls.
"""

from __future__ import annotations

import functools
from typing import Any

from harness import AGENT_NAME, INSTRUCTIONS, TOOLS, Call, MailDown, final_answer, main, usage
from pydantic_ai import Agent, ModelRetry, Tool
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage


def _retrying(f: Any) -> Any:
    """A failing tool asks the model to retry, as pydantic-ai tools report failures."""

    @functools.wraps(f)
    def call(**kwargs: Any) -> str:
        try:
            return f(**kwargs)
        except MailDown as exc:
            raise ModelRetry(str(exc)) from exc

    return call


def run(scenario: str, turns: list[list[Call]]) -> None:
    n = 0

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        nonlocal n
        inp, outp = usage(n)
        use = RequestUsage(input_tokens=inp, output_tokens=outp)
        parts: list[Any]
        if n < len(turns):
            parts = [ToolCallPart(c.tool, c.args, tool_call_id=c.call_id) for c in turns[n]]
        else:
            parts = [TextPart(final_answer())]
        n += 1
        return ModelResponse(parts=parts, usage=use, model_name="fake-ops-model")

    tools = [Tool(_retrying(f), max_retries=len(turns) + 1) for f in TOOLS.values()]
    agent = Agent(FunctionModel(respond), name=AGENT_NAME, instructions=INSTRUCTIONS, tools=tools)
    agent.run_sync(f"scenario {scenario}")


def instrument(which: str, provider: Any) -> None:
    Agent.instrument_all()  # pydantic-ai's own OpenTelemetry spans (GenAI conventions), on the global provider
    if which == "openinference":
        from openinference.instrumentation.pydantic_ai import OpenInferenceSpanProcessor

        provider.add_span_processor(OpenInferenceSpanProcessor())


if __name__ == "__main__":
    main(run, instrument, ("builtin", "openinference"))
