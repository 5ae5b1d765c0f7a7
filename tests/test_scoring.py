"""The scoring sandbox: real worker processes, real limits, real kills; no mocks."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import time

import pytest

from mtrl.scoring import ScoringConfig, ScoringPool


def behave(kind: str, arg: object = None) -> object:
    """What a scorer might do on hostile output; runs in the worker (pickled by reference)."""
    if kind == "value":
        return arg
    if kind == "raise":
        raise ValueError("a scorer failing on odd output")
    if kind == "exit":
        os._exit(3)
    if kind == "sleep":
        time.sleep(arg)
    if kind == "alloc":  # past RLIMIT_AS
        return len(bytearray(arg))
    if kind == "python_socket":
        try:
            socket.create_connection(("127.0.0.1", arg), timeout=2)
        except PermissionError:
            return "refused"
        return "connected"
    if kind == "raw_connect":  # the system calls themselves, as native code would make them
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
        if fd < 0:
            return f"socket errno {ctypes.get_errno()}"
        address = struct.pack("=H", socket.AF_INET) + struct.pack("!H", arg)
        address += bytes([127, 0, 0, 1]) + bytes(8)
        ok = libc.connect(fd, address, len(address)) == 0
        return "connected" if ok else f"connect errno {ctypes.get_errno()}"
    if kind == "shell":
        return os.system(arg)
    if kind == "read":
        with open(arg) as f:
            return f.read()
    if kind == "remove":
        os.remove(arg)
        return "removed"
    if kind == "write":
        with open(arg, "w") as f:
            f.write("x")
        return "written"
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def pool():
    pool = ScoringPool(ScoringConfig(timeout_s=2.0, memory_mb=512, workers=2), preload=())
    yield pool
    pool.close()


def test_config_validation_names_the_key():
    ScoringConfig().validate()
    for kwargs, message in [
        ({"timeout_s": 0}, "scoring.timeout_s: must be > 0, got 0"),
        ({"timeout_s": float("nan")}, "scoring.timeout_s: must be > 0, got nan"),
        ({"memory_mb": 100}, "scoring.memory_mb: must be >= 256, got 100"),
        ({"workers": 0}, "scoring.workers: must be >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            ScoringConfig(**kwargs).validate()


def test_results_in_order_and_exceptions_score_the_default_uncounted(pool):
    items = [("value", i) for i in range(50)] + [("raise",)] + [("value", "last")]
    result = pool.map(behave, items, default=-1)
    assert result.values == [*range(50), -1, "last"]
    assert (result.timeouts, result.crashes) == (0, 0)


def test_timeout_kills_the_worker_and_the_rest_still_scores(pool):
    items = [("value", 1), ("sleep", 60), ("value", 2), ("sleep", 60), ("value", 3)]
    start = time.monotonic()
    result = pool.map(behave, items, default=0)
    elapsed = time.monotonic() - start
    assert result.values == [1, 0, 2, 0, 3]
    assert (result.timeouts, result.crashes) == (2, 0)
    # two 2 s limits, possibly one after the other, plus the replacements' start-up
    assert elapsed < 30, elapsed
    assert pool.map(behave, [("value", 4)]).values == [4]


def test_crashes_are_replaced_and_later_scores_work(pool):
    pids = {w.proc.pid for w in pool.workers}
    items = [("exit",), ("value", 1), ("alloc", 1 << 30), ("value", 2)]
    result = pool.map(behave, items, default=0)
    assert result.values == [0, 1, 0, 2]
    assert (result.timeouts, result.crashes) == (0, 2)  # os._exit and MemoryError (512 MB limit)
    assert {w.proc.pid for w in pool.workers} != pids
    assert pool.map(behave, [("value", i) for i in range(8)]).values == list(range(8))
    assert all(w.proc.poll() is None for w in pool.workers)


def test_no_network_in_the_worker(pool):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert pool.map(behave, [("python_socket", port)]).values == ["refused"]
        # Below Python, the system call itself: refused by seccomp; and were a socket made,
        # the worker's own network namespace has no interface up to connect through.
        assert pool.sandbox == {"network_namespace": True, "seccomp": True}
        assert pool.map(behave, [("raw_connect", port)]).values == [f"socket errno {errno.EPERM}"]


def test_worker_starts_no_process_and_changes_no_file(pool, tmp_path):
    target, kept = tmp_path / "PWNED", tmp_path / "kept"
    kept.write_text("gold")
    items = [
        ("shell", f"touch {target}"),
        ("write", str(target)),
        ("remove", str(kept)),
        ("read", str(kept)),
    ]
    result = pool.map(behave, items, default="refused")
    assert pool.sandbox["seccomp"] is True  # reported by the first ready worker, after a map
    assert result.values[0] != 0  # os.system could not fork
    assert result.values[1:] == ["refused", "refused", "gold"]  # reading still works
    assert not target.exists()
    assert kept.read_text() == "gold"
