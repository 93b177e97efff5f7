"""The RemoteAPI client: the local API's interface, carried over MQTT (docs/remote-api.md)."""

from .remote import RemoteAPI

__all__ = ["RemoteAPI"]
