"""A client written from docs/protocol.md alone: paho-mqtt, cbor2 and numpy, no datamux.

It announces itself, asks an agent for a live stream, decodes the CBOR frames into numpy
arrays without copying, stops the task and waits for its end message.

    python examples/raw_mqtt_client.py HOST PORT AGENT [NODE STREAM FRAMES]
"""

import queue
import secrets
import sys

import cbor2
import numpy as np
import paho.mqtt.client as mqtt

PREFIX = "streaminghub/v2"
# RFC 8746 typed arrays (little endian) -> numpy dtypes
TYPED_ARRAYS = {64: "u1", 69: "<u2", 70: "<u4", 71: "<u8", 72: "i1", 77: "<i2",
                78: "<i4", 79: "<i8", 84: "<f2", 85: "<f4", 86: "<f8"}  # fmt: skip


def typed_array(tag: cbor2.CBORTag) -> np.ndarray:
    return np.frombuffer(tag.value, dtype=TYPED_ARRAYS[tag.tag])  # a view, no copy


def decode_frame(payload: bytes) -> dict:
    frame = cbor2.loads(payload)
    frame["t"] = typed_array(frame["t"])
    (rows, cols), cells = frame["v"].value  # tag 40: [[rows, cols], elements]
    if isinstance(cells, cbor2.CBORTag):
        values = typed_array(cells)
        values = values.view(bool) if frame["dtype"] == "bool" else values
    else:  # strings (marker streams) travel as a plain array
        values = np.array(cells, dtype=str)
    frame["v"] = values.reshape(rows, cols)
    return frame


def main(host: str, port: int, agent: str, node: str, stream: str, wanted: int) -> None:
    me = "raw-" + secrets.token_hex(4)  # with an ACL profile: your broker user name
    task = secrets.token_hex(8)  # the client picks the task id...
    inbox: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=me)
    client.on_message = lambda c, u, m: inbox.put(m)
    # Presence: agents stop the tasks of a client whose last will says offline.
    offline = cbor2.dumps({"state": "offline", "client": me})
    client.will_set(f"{PREFIX}/clients/{me}/state", offline, qos=1, retain=True)
    client.connect(host, port, keepalive=10)
    client.loop_start()
    online = cbor2.dumps({"state": "online", "client": me, "keepalive": 10})
    client.publish(f"{PREFIX}/clients/{me}/state", online, qos=1, retain=True)
    # ...so it can subscribe to the task's topics before the first frame is sent.
    # Replies come on agents/{agent}/reply/{me}; task topics carry their owner, me.
    client.subscribe(f"{PREFIX}/agents/{agent}/reply/{me}", qos=1)
    client.subscribe(f"{PREFIX}/agents/{agent}/tasks/{me}/{task}/+", qos=1)

    def call(method: str, **params) -> object:
        # The id is unpredictable: only the agent asked can answer it.
        request = {"id": secrets.token_urlsafe(16), "method": method, "params": params}
        # Who asks is the topic's last level (which a broker ACL pins to the user).
        client.publish(f"{PREFIX}/agents/{agent}/rpc/{me}", cbor2.dumps(request), qos=1)
        while True:
            message = inbox.get(timeout=10)
            if message.topic == f"{PREFIX}/agents/{agent}/reply/{me}":
                reply = cbor2.loads(message.payload)
                if reply["id"] == request["id"]:
                    if not reply["ok"]:
                        raise RuntimeError(reply["error"])
                    return reply["result"]
            else:
                inbox.put(message)  # a frame that came first: keep it

    print("nodes:", [n["id"] for n in call("list_live_nodes")])
    call("proxy_live_stream", node_id=node, stream_id=stream, attrs={}, task_id=task, qos=1)
    frames = 0
    while frames < wanted:
        message = inbox.get(timeout=10)
        if message.topic.endswith("/data"):
            frame = decode_frame(message.payload)
            print(frame["seq"], frame["v"].shape, frame["v"].dtype, frame["channels"][:3])
            frames += 1
    call("stop_task", task_id=task)
    while True:  # the end message closes every task
        message = inbox.get(timeout=10)
        if message.topic.endswith("/ctrl"):
            ctrl = cbor2.loads(message.payload)
            if ctrl["kind"] == "end":
                print("end after", ctrl["frames"], "frames")
                break
    client.publish(f"{PREFIX}/clients/{me}/state", b"", qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    host, port, agent = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    node, stream, wanted = (sys.argv[4:7] + ["demo", "eeg", "3"][len(sys.argv[4:7]) :])[:3]
    main(host, port, agent, node, stream, int(wanted))
