"""The edge agent (``datamux serve``): runs tasks next to the sensors and publishes them over MQTT.

Not built yet: see the MQTT transport issue. The local API (``dm.API``) already runs
every task in-process.
"""

__all__: list[str] = []
