"""``free_port()``: a free TCP port on localhost, for the rendezvous of spawned or torchrun processes."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
