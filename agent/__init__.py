"""The edge agent (``datamux serve``): runs tasks next to the sensors, publishes them over MQTT.

See docs/agent.md for running it and docs/protocol.md for what it says on the wire.
"""

from .service import Agent

__all__ = ["Agent"]
