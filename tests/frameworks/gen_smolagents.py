"""smolagents: a ToolCallingAgent named ``ops_agent``, traced by OpenInference.

smolagents requires an agent name that is a Python identifier, so this agent is
``ops_agent`` (docs/frameworks/smolagents.md). OpenLLMetry has no smolagents
instrumentation. Run in the smolagents virtualenv:
``python gen_smolagents.py openinference OUT``. The model is a custom
``smolagents.models.Model`` answering with the scenario's tool calls, then the
``final_answer`` tool call every smolagents run ends with.
"""

from __future__ import annotations

import json
from typing import Any

import harness
from harness import Call, final_answer, main, usage
from smolagents import ToolCallingAgent, tool
from smolagents.models import ChatMessage, ChatMessageToolCall, ChatMessageToolCallFunction, MessageRole, Model
from smolagents.monitoring import LogLevel, TokenUsage

AGENT_NAME = "ops_agent"


# smolagents builds each tool's schema from its docstring: every argument documented
@tool
def get_order(order_id: str) -> str:
    """Look up an order by id.

    Args:
        order_id: the order's id
    """
    return harness.get_order(order_id)


@tool
def search_kb(query: str) -> str:
    """Search the knowledge base.

    Args:
        query: what to look for
    """
    return harness.search_kb(query)


@tool
def send_email(to: str, body: str) -> str:
    """Send an email to a customer.

    Args:
        to: the recipient
        body: the text
    """
    return harness.send_email(to, body)


@tool
def refund_payment(order_id: str, amount: float) -> str:
    """Refund an order.

    Args:
        order_id: the order's id
        amount: how much
    """
    return harness.refund_payment(order_id, amount)


class ScriptedModel(Model):
    def __init__(self, turns: list[list[Call]]) -> None:
        super().__init__(model_id="fake-ops-model")
        self.turns = turns
        self.n = 0

    def generate(self, messages: list[Any], stop_sequences: Any = None, response_format: Any = None,
                 tools_to_call_from: Any = None, **kwargs: Any) -> ChatMessage:
        n, self.n = self.n, self.n + 1
        inp, outp = usage(n)
        if n < len(self.turns):
            calls = [(c.tool, c.args, c.call_id) for c in self.turns[n]]
        else:
            calls = [("final_answer", {"answer": final_answer()}, f"call_final_{n}")]
        tool_calls = [
            ChatMessageToolCall(id=call_id, type="function",
                                function=ChatMessageToolCallFunction(name=name, arguments=json.dumps(args)))
            for name, args, call_id in calls
        ]
        return ChatMessage(role=MessageRole.ASSISTANT, content="", tool_calls=tool_calls,
                           token_usage=TokenUsage(input_tokens=inp, output_tokens=outp))


def run(scenario: str, turns: list[list[Call]]) -> None:
    agent = ToolCallingAgent(tools=[get_order, search_kb, send_email, refund_payment], model=ScriptedModel(turns),
                             name=AGENT_NAME, max_steps=len(turns) + 3, verbosity_level=LogLevel.OFF)
    agent.run(f"scenario {scenario}")


def instrument(which: str, provider: Any) -> None:
    from openinference.instrumentation.smolagents import SmolagentsInstrumentor

    SmolagentsInstrumentor().instrument(tracer_provider=provider)


if __name__ == "__main__":
    main(run, instrument, ("openinference",))
