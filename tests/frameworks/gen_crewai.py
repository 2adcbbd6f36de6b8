"""CrewAI: one agent whose role is ``ops-agent`` in a one-task crew, traced by
OpenInference or OpenLLMetry.

Run in the crewai virtualenv: ``python gen_crewai.py {openinference,openllmetry} OUT``.
The model is a custom ``crewai.BaseLLM`` answering in CrewAI's ReAct text format
(Thought / Action / Action Input), the path every LLM without native function
calling takes: CrewAI parses the action and runs the tool. Such calls carry no
tool-call id.
"""

from __future__ import annotations

import json
import os
from typing import Any

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
os.environ.setdefault("OTEL_SDK_DISABLED", "false")

from crewai import Agent, BaseLLM, Crew, Task  # noqa: E402
from crewai.tools import tool  # noqa: E402
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
        if n < len(self.turns):
            c = self.turns[n][0]
            return f"Thought: I should use {c.tool}.\nAction: {c.tool}\nAction Input: {json.dumps(c.args)}"
        return f"Thought: I now know the final answer\nFinal Answer: {final_answer()}"

    def supports_function_calling(self) -> bool:
        return False

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
    Crew(agents=[agent], tasks=[task], verbose=False).kickoff()


def instrument(which: str, provider: Any) -> None:
    if which == "openinference":
        from openinference.instrumentation.crewai import CrewAIInstrumentor

        CrewAIInstrumentor().instrument(tracer_provider=provider)
    else:
        from opentelemetry.instrumentation.crewai import CrewAIInstrumentor

        CrewAIInstrumentor().instrument(tracer_provider=provider)


if __name__ == "__main__":
    main(run, instrument, ("openinference", "openllmetry"))
