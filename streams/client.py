"""The agent client moved to the ``agentwatch_client`` package (installed without the server).

Kept so that ``from streams.client import AgentClient`` goes on working.
"""

from agentwatch_client.client import AgentClient
from agentwatch_client.sync import SyncAgentClient

__all__ = ["AgentClient", "SyncAgentClient"]
