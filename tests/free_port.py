"""A TCP port on 127.0.0.1 that is free now: for the launchers and servers tests start, or,
once its socket is closed, a port that nothing listens on."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
