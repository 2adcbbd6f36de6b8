"""CrewAI: one agent whose role is ``ops-agent`` in a one-task crew, traced by
OpenInference or OpenLLMetry.

Run in the crewai virtualenv: ``python gen_crewai.py {openinference,openllmetry} OUT``.
The model is a custom ``crewai.BaseLLM`` with native function calling (what
CrewAI uses with every model that supports it): it answers each turn with the
scenario's tool calls, ids included, and CrewAI runs each through the tool's
``run``, which OpenInference wraps. (Through CrewAI's ReAct text path, taken by
models without function calling, tools run through ``CrewStructuredTool.invoke``,
which neither instrumentation wraps: no tool spans at all.)

CrewAI stops a run itself on the fifth identical call with the same result
(``MAX_REPEATED_TOOL_CALLS``), raising ``ToolExecutionFailedError`` from
``kickoff``: the same-call scenario has five calls here, not six.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
os.environ.setdefault("OTEL_SDK_DISABLED", "false")

from crewai import Agent, BaseLLM, Crew, Task  # noqa: E402
from crewai.tools import tool  # noqa: E402
from crewai.tools.tool_failure import ToolExecutionFailedError  # noqa: E402
from harness import AGENT_NAME, TOOLS, Call, final_answer, main, usage  # noqa: E402


def _crewai_tool(f: Any) -> Any:
    return tool(f.__name__)(f)


class ScriptedLLM(BaseLLM):
    turns: list[list[Call]] = []
    n: int = 0

    def call(self, messages: Any, tools: Any = None, callbacks: Any = None, available_functions: Any = None,
             from_task: Any = None, from_agent: Any = None, response_model: Any = None, **kwargs: Any) -> str:
        n = self.n
        self.n += 1
        inp, outp = usage(n)
        self._track_token_usage_internal({"prompt_tokens": inp, "completion_tokens": outp,
                                          "total_tokens": inp + outp})
        if n < len(self.turns) and tools:
            # OpenAI's format: CrewAI takes a list of these for tool calls to run
            return [{"id": c.call_id, "type": "function", "function": {"name": c.tool, "arguments": json.dumps(c.args)}}
                    for c in self.turns[n]]
        return final_answer()

    def supports_function_calling(self) -> bool:
        return True

    def supports_stop_words(self) -> bool:
        return True

    def get_context_window_size(self) -> int:
        return 128_000


def run(scenario: str, turns: list[list[Call]]) -> None:
    llm = ScriptedLLM(model="fake-ops-model")
    llm.turns = turns
    agent = Agent(role=AGENT_NAME, goal="Run operations", backstory="The operations agent.", llm=llm,
                  tools=[_crewai_tool(f) for f in TOOLS.values()], max_iter=len(turns) + 3, verbose=False,
                  allow_delegation=False)
    task = Task(description=f"scenario {scenario}", expected_output="a short answer", agent=agent)
    try:
        Crew(agents=[agent], tasks=[task], verbose=False).kickoff()
    except ToolExecutionFailedError as exc:  # its own loop guard (same_call): the spans are what matters
        print(f"{scenario}: CrewAI stopped the run: {exc}", file=sys.stderr)


def instrument(which: str, provider: Any) -> None:
    if which == "openinference":
        from openinference.instrumentation.crewai import CrewAIInstrumentor

        CrewAIInstrumentor().instrument(tracer_provider=provider)
    else:
        from opentelemetry.instrumentation.crewai import CrewAIInstrumentor

        CrewAIInstrumentor().instrument(tracer_provider=provider)


if __name__ == "__main__":
    main(run, instrument, ("openinference", "openllmetry"))
