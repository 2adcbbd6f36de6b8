"""smolagents: a ToolCallingAgent named ``ops_agent``, traced by OpenInference.

smolagents requires an agent name that is a Python identifier, so this agent is
``ops_agent`` (docs/frameworks/smolagents.md). OpenLLMetry has no smolagents
instrumentation. Run in the smolagents virtualenv:
``python gen_smolagents.py openinference OUT``. The model is smolagents' own
``InferenceClientModel`` (OpenInference traces the model classes smolagents
exports, not a user's ``Model`` subclass) on a scripted client standing in for
huggingface_hub's ``InferenceClient``: it answers with the scenario's tool calls,
then the ``final_answer`` tool call every smolagents run ends with.
"""

from __future__ import annotations

import json
from typing import Any

import harness
from harness import Call, final_answer, main, usage
from huggingface_hub import ChatCompletionOutput
from smolagents import InferenceClientModel, ToolCallingAgent, tool
from smolagents.monitoring import LogLevel

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


class ScriptedClient:
    """Stands in for huggingface_hub's InferenceClient: answers chat_completion with the
    scenario's tool calls (then the final_answer call), in the client's own output types."""

    def __init__(self, turns: list[list[Call]]) -> None:
        self.turns = turns
        self.n = 0

    def chat_completion(self, **kwargs: Any) -> ChatCompletionOutput:
        n, self.n = self.n, self.n + 1
        inp, outp = usage(n)
        if n < len(self.turns):
            calls = [(c.tool, c.args, c.call_id) for c in self.turns[n]]
        else:
            calls = [("final_answer", {"answer": final_answer()}, f"call_final_{n}")]
        return ChatCompletionOutput.parse_obj_as_instance({
            "id": f"resp_{n}", "created": 0, "model": "fake-ops-model", "system_fingerprint": "",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "",
                "tool_calls": [{"id": call_id, "type": "function",
                                "function": {"name": name, "arguments": json.dumps(args)}}
                               for name, args, call_id in calls]}}],
            "usage": {"prompt_tokens": inp, "completion_tokens": outp, "total_tokens": inp + outp}})


class ScriptedModel(InferenceClientModel):
    """smolagents' InferenceClientModel (which OpenInference traces) on a scripted client."""

    def __init__(self, turns: list[list[Call]]) -> None:
        self._turns = turns
        super().__init__(model_id="fake-ops-model", token="unused")

    def create_client(self) -> ScriptedClient:
        return ScriptedClient(self._turns)


def run(scenario: str, turns: list[list[Call]]) -> None:
    agent = ToolCallingAgent(tools=[get_order, search_kb, send_email, refund_payment], model=ScriptedModel(turns),
                             name=AGENT_NAME, max_steps=len(turns) + 3, verbosity_level=LogLevel.OFF)
    agent.run(f"scenario {scenario}")


def instrument(which: str, provider: Any) -> None:
    from openinference.instrumentation.smolagents import SmolagentsInstrumentor

    SmolagentsInstrumentor().instrument(tracer_provider=provider)


if __name__ == "__main__":
    main(run, instrument, ("openinference",))
