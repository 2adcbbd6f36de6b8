"""LangGraph's prebuilt ReAct agent named ``ops-agent``, traced by OpenInference or OpenLLMetry.

Run in the langgraph virtualenv: ``python gen_langgraph.py {openinference,openllmetry} OUT``.
The model is langchain's GenericFakeChatModel answering with the scenario's tool calls.
"""

from __future__ import annotations

from typing import Any

from harness import AGENT_NAME, INSTRUCTIONS, TOOLS, Call, final_answer, main, usage
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import StructuredTool
from langgraph.prebuilt import ToolNode, create_react_agent


class ToolCallingFake(GenericFakeChatModel):
    """GenericFakeChatModel answers with the messages it is given; ReAct binds tools first."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> "ToolCallingFake":
        return self


def _messages(turns: list[list[Call]]) -> list[AIMessage]:
    out = []
    for n in range(len(turns) + 1):
        inp, outp = usage(n)
        meta = {"input_tokens": inp, "output_tokens": outp, "total_tokens": inp + outp}
        if n < len(turns):
            calls = [{"name": c.tool, "args": c.args, "id": c.call_id, "type": "tool_call"} for c in turns[n]]
            out.append(AIMessage(content="", tool_calls=calls, usage_metadata=meta))
        else:
            out.append(AIMessage(content=final_answer(), usage_metadata=meta))
    return out


def run(scenario: str, turns: list[list[Call]]) -> None:
    model = ToolCallingFake(messages=iter(_messages(turns)))
    tools = [StructuredTool.from_function(f) for f in TOOLS.values()]
    # a failing tool's error goes back to the model, as most agents are built
    agent = create_react_agent(model, ToolNode(tools, handle_tool_errors=True), prompt=INSTRUCTIONS, name=AGENT_NAME)
    agent.invoke({"messages": [("user", f"scenario {scenario}")]})


def instrument(which: str, provider: Any) -> None:
    if which == "openinference":
        from openinference.instrumentation.langchain import LangChainInstrumentor

        LangChainInstrumentor().instrument(tracer_provider=provider)
    else:
        from opentelemetry.instrumentation.langchain import LangchainInstrumentor

        LangchainInstrumentor().instrument(tracer_provider=provider)


if __name__ == "__main__":
    main(run, instrument, ("openinference", "openllmetry"))
