"""Exit 0 once a Kafka broker answers a Metadata request listing at least one live broker.

Standard library only (scripts/services.sh runs it before any virtualenv exists):
    python3 scripts/kafka/probe.py 127.0.0.1 9092
"""

import socket
import struct
import sys


def metadata_brokers(host: str, port: int) -> int:
    # Metadata v4: all topics (null array), no auto-creation. Header v1: api key, version,
    # correlation id, client id.
    client = b"oncely-probe"
    body = struct.pack(">hhih", 3, 4, 1, len(client)) + client + struct.pack(">ib", -1, 0)
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", _read(sock, 4))[0]
        data = _read(sock, size)
    correlation, _throttle, brokers = struct.unpack(">iii", data[:12])
    if correlation != 1:
        raise RuntimeError(f"unexpected correlation id {correlation}")
    return int(brokers)


def _read(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        buf += chunk
    return buf


if __name__ == "__main__":
    try:
        n = metadata_brokers(sys.argv[1], int(sys.argv[2]))
    except (OSError, RuntimeError, struct.error) as exc:
        sys.stderr.write(f"kafka probe: {exc}\n")
        sys.exit(1)
    sys.exit(0 if n >= 1 else 1)
