"""The RemoteAPI client: the local API's interface, carried over MQTT.

Not built yet: see the MQTT transport issue.
"""

__all__: list[str] = []
