"""Score untrusted policy output in sandboxed worker processes, never in the trainer's process.

    from mtrl.scoring import ScoringConfig, configure, score
    configure(ScoringConfig(timeout_s=5.0, memory_mb=1024, workers=2))   # once, optional
    batch = score(math_equal, [(gold, predicted), ...], default=False)
    batch.values      # one result per item, `default` where the item timed out or crashed
    batch.timeouts, batch.crashes   # how many items failed each way

`score` runs `fn(*item)` for every item on the process's pool of worker processes. `fn` must be
a module-level function (it is pickled by reference) of a module that imports without torch:
the worker is a fresh `python -c` interpreter, so neither the trainer's CUDA state nor its
`__main__` (e.g. `launch/train.py`) is copied or re-imported into it.

Limits, per worker:

- wall clock: an item that runs longer than `timeout_s` gets its worker killed (SIGKILL, which
  also stops C loops such as `9**9**9**9`); the item scores `default` and counts as a timeout;
  a new worker replaces the killed one and the rest of its chunk goes on there.
- memory: RLIMIT_AS of `memory_mb` after the worker's imports. A `MemoryError` (or any death
  of the worker: segfault, `os._exit`) scores `default` and counts as a crash; the worker is
  replaced. An exception raised by `fn` is an ordinary wrong answer: `default`, not counted.
- network: the worker first enters a new network namespace (`unshare(CLONE_NEWNET)`, or
  `CLONE_NEWUSER | CLONE_NEWNET` when not root), where no interface but a down loopback
  exists: no code in it (Python, C extensions, ctypes, child processes) reaches any host.
  Where the kernel refuses the namespace (a container without the capability and without
  user namespaces), only the Python-level block remains: `socket.socket` and
  `_socket.socket` raise PermissionError, which stops Python code (urllib, requests,
  `socket.create_connection`) but not native code making the system call itself.
- files, processes, signals: a seccomp filter (x86_64 and aarch64) makes `socket`, `execve`,
  `fork`, `clone` of a process (threads stay allowed), `kill`, `ptrace`, opening a file for
  writing, and creating, removing, renaming, linking or chmod-ing files fail with EPERM; with
  RLIMIT_FSIZE 0 and RLIMIT_CORE 0 on top. Reading the files the user can read stays
  possible (imports need it), and so does writing to the pipes the worker already holds.
  Elsewhere (another architecture, or a kernel without seccomp) the worker says so.

The worker reports which of these hold in its first message; the pool logs them once.

Items are sent in chunks (about 4 per worker per call, one message each) and each result comes
back as it is done, which is how the parent times each item. One pool per process, started on
the first `score` and closed at exit; a forked child (a DataLoader worker) starts its own.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["Scored", "ScoringConfig", "ScoringPool", "configure", "score", "shutdown"]

NOBODY = 65534
STARTUP_TIMEOUT_S = 120.0  # imports of math-verify and reasoning-gym on a loaded 2-core machine
CHUNKS_PER_WORKER = 4


@dataclass
class ScoringConfig:
    timeout_s: float = 5.0  # wall-clock limit per completion
    memory_mb: int = 1024  # address-space limit per worker
    workers: int = 2  # worker processes

    def validate(self) -> None:
        """Raise ValueError with one line naming the first bad key."""
        if not self.timeout_s > 0 or not math.isfinite(self.timeout_s):
            raise ValueError(f"scoring.timeout_s: must be > 0, got {self.timeout_s}")
        if self.memory_mb < 256:  # the worker's imports alone take about 200 MB of address space
            raise ValueError(f"scoring.memory_mb: must be >= 256, got {self.memory_mb}")
        if self.workers < 1:
            raise ValueError(f"scoring.workers: must be >= 1, got {self.workers}")


@dataclass
class Scored:
    """A batch's results: `values[i]` for item i (`default` where it failed) and failure counts."""

    values: list[Any]
    timeouts: int = 0
    crashes: int = 0


# ---------------------------------------------------------------------------- worker side


def _sandbox() -> dict[str, bool]:
    """Cut the network at the kernel where allowed, and in Python always (see the module doc)."""
    import _socket
    import ctypes
    import socket

    clone_newuser, clone_newnet = 0x10000000, 0x40000000
    libc = ctypes.CDLL(None, use_errno=True)
    flags = clone_newnet if os.geteuid() == 0 else clone_newuser | clone_newnet
    netns = libc.unshare(flags) == 0  # needs a single-threaded process: done before any import

    class Refused(socket.socket):  # a class, so that modules subclassing socket still import
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise PermissionError("network access is disabled in scoring workers")

    class RawRefused(_socket.socket):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise PermissionError("network access is disabled in scoring workers")

    socket.socket, _socket.socket = Refused, RawRefused  # type: ignore[misc]
    return {"network_namespace": netns}


# Syscalls a worker may not make, per architecture (seccomp filter; see `_seccomp`).
_DENY = {  # name: (x86_64 number or None, aarch64 number or None)
    "socket": (41, 198),
    "socketpair": (53, 199),
    "execve": (59, 221),
    "execveat": (322, 281),
    "fork": (57, None),
    "vfork": (58, None),
    "kill": (62, 129),
    "ptrace": (101, 117),
    "creat": (85, None),
    "openat2": (437, 437),
    "unlink": (87, None),
    "unlinkat": (263, 35),
    "rename": (82, None),
    "renameat": (264, 38),
    "renameat2": (316, 276),
    "mkdir": (83, None),
    "mkdirat": (258, 34),
    "rmdir": (84, None),
    "link": (86, None),
    "linkat": (265, 37),
    "symlink": (88, None),
    "symlinkat": (266, 36),
    "truncate": (76, 45),
    "chmod": (90, None),
    "fchmodat": (268, 53),
    "chown": (92, None),
    "lchown": (94, None),
    "fchownat": (260, 54),
}
_OPEN = {"open": ((2, None), 1), "openat": ((257, 56), 2)}  # name: (numbers, flags argument)
_CLONE, _CLONE3 = (56, 220), (435, 435)
_ARCH = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # column, AUDIT_ARCH_*
_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND


def _seccomp() -> bool:
    """A seccomp filter: no sockets, processes, signals to others, or file changes (EPERM).

    Opening for reading, pipes already open, threads (clone with CLONE_THREAD) and memory
    calls stay allowed. False where the machine is neither x86_64 nor aarch64.
    """
    import ctypes
    import errno
    import platform
    import struct

    if platform.machine() not in _ARCH:
        return False
    col, arch = _ARCH[platform.machine()]
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, RET|K
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, RET_ERRNO
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, allow), (ld, 0, 0, 0)]

    def rule(number: int | None, body: list[tuple[int, int, int, int]]) -> None:
        if number is not None:
            prog.extend([(jeq, 0, len(body), number), *body, (ld, 0, 0, 0)])

    for numbers in _DENY.values():
        rule(numbers[col], [(ret, 0, 0, deny)])
    for numbers, arg in _OPEN.values():  # the flags' low 32 bits: args start at offset 16
        body = [(ld, 0, 0, 16 + 8 * arg), (jset, 0, 1, _WRITE_FLAGS), (ret, 0, 0, deny)]
        rule(numbers[col], [*body, (ret, 0, 0, allow)])
    clone_thread = 0x10000
    body = [(ld, 0, 0, 16), (jset, 0, 1, clone_thread), (ret, 0, 0, allow), (ret, 0, 0, deny)]
    rule(_CLONE[col], body)
    rule(_CLONE3[col], [(ret, 0, 0, 0x00050000 | errno.ENOSYS)])  # glibc falls back to clone
    prog.append((ret, 0, 0, allow))

    code = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code, len(code))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: needed without CAP_SYS_ADMIN
        return False
    return libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, MODE_FILTER


def _limit(memory_mb: int) -> dict[str, bool]:
    """Resource limits and the seccomp filter; after the imports, which need to open files."""
    import ctypes
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE raises, not kills
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.chdir("/")
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the trainer
    return {"seccomp": _seccomp()}


def _worker_main(read_fd: int, write_fd: int, memory_mb: int, preload: Sequence[str]) -> None:
    """The worker's loop: receive (fn, items), send ("ok"|"error"|"crash", value) per item."""
    import importlib

    status = _sandbox()
    for name in preload:
        importlib.import_module(name)
    status.update(_limit(memory_mb))
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    outbox.send(("ready", status))
    while True:
        try:
            job = inbox.recv()
        except EOFError:  # the trainer is gone
            return
        if job is None:
            return
        fn, items = job
        for item in items:
            try:
                outbox.send(("ok", fn(*item)))
            except MemoryError:  # state may be torn: report and let the parent replace us
                outbox.send(("crash", "MemoryError"))
                os._exit(1)
            except Exception as exc:  # a scorer failing on odd output: a wrong answer
                outbox.send(("error", f"{type(exc).__name__}: {exc}"[:500]))


# ---------------------------------------------------------------------------- parent side


class _Worker:
    """One worker process, its pipes, and the chunk it is working on."""

    def __init__(self, config: ScoringConfig, preload: Sequence[str]) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        code = (
            "import sys; from mtrl.scoring import _worker_main; "
            f"_worker_main({to_child_r}, {from_child_w}, {config.memory_mb}, {list(preload)!r})"
        )
        env = dict(os.environ)
        # The parent's import path (so tests' and users' scorer modules import), one thread
        # per math library (their thread pools reserve address space), and no GPU.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env["CUDA_VISIBLE_DEVICES"] = ""
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=(to_child_r, from_child_w),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self.outbox = Connection(to_child_w, readable=False)
        self.inbox = Connection(from_child_r, writable=False)
        self.started = time.monotonic()
        self.ready = False
        self.chunk: deque[int] = deque()  # item indices sent and not yet answered, in order
        self.item_started = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.inbox.close()
        self.outbox.close()

    def stop(self) -> None:
        try:
            self.outbox.send(None)
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class ScoringPool:
    """Worker processes that run `fn(*item)` with a time and a memory limit per item."""

    def __init__(
        self, config: ScoringConfig, preload: Sequence[str] = ("math_verify", "reasoning_gym")
    ) -> None:
        config.validate()
        self.config = config
        self.preload = tuple(preload)
        self.workers = [_Worker(config, self.preload) for _ in range(config.workers)]
        self.lock = threading.Lock()
        self.sandbox: dict[str, bool] = {}  # what the first ready worker reported

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        new = _Worker(self.config, self.preload)
        self.workers[self.workers.index(worker)] = new
        return new

    def _on_ready(self, worker: _Worker, status: dict[str, bool]) -> None:
        worker.ready = True
        if not self.sandbox:
            self.sandbox = status
            logger.info(
                "scoring workers: %d, %.1f s and %d MB per item; sandbox %s",
                self.config.workers,
                self.config.timeout_s,
                self.config.memory_mb,
                ", ".join(f"{k}={v}" for k, v in status.items()),
            )

    def map(self, fn: Callable[..., Any], items: Sequence[tuple], default: Any = None) -> Scored:
        """`fn(*item)` for every item, in parallel; `default` where an item fails (see Scored)."""
        items = list(items)
        with self.lock:
            return self._map(fn, items, default)

    def _map(self, fn: Callable[..., Any], items: list[tuple], default: Any) -> Scored:
        result = Scored([default] * len(items))
        size = max(1, math.ceil(len(items) / (len(self.workers) * CHUNKS_PER_WORKER)))
        todo = deque(deque(range(i, min(i + size, len(items)))) for i in range(0, len(items), size))
        pickle.dumps(fn)  # an unpicklable fn fails here, in the caller, not as a worker crash
        remaining = len(items)

        def fail(worker: _Worker, kind: str) -> _Worker:
            nonlocal remaining
            if worker.chunk:  # the item it was on fails; a worker that died idle costs none
                setattr(result, kind, getattr(result, kind) + 1)
                worker.chunk.popleft()
                remaining -= 1
            if worker.chunk:  # the rest of its chunk goes first to whichever worker is free
                todo.appendleft(worker.chunk)
            return self._replace(worker)

        while remaining:
            now = time.monotonic()
            for worker in self.workers:
                if worker.ready and not worker.chunk and todo:
                    worker.chunk = todo.popleft()
                    worker.outbox.send((fn, [items[i] for i in worker.chunk]))
                    worker.item_started = now
            deadlines = [w.item_started + self.config.timeout_s for w in self.workers if w.chunk]
            deadlines += [w.started + STARTUP_TIMEOUT_S for w in self.workers if not w.ready]
            readable = wait([w.inbox for w in self.workers], max(0.0, min(deadlines) - now))
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.inbox in readable:
                    try:
                        while worker.inbox.poll():
                            kind, value = worker.inbox.recv()
                            if kind == "ready":
                                self._on_ready(worker, value)
                                continue
                            if kind == "crash":
                                raise EOFError
                            index = worker.chunk.popleft()
                            remaining -= 1
                            if kind == "ok":
                                result.values[index] = value
                            else:
                                logger.debug("scoring %s failed: %s", fn.__name__, value)
                            worker.item_started = now
                    except (EOFError, OSError):
                        if not worker.ready:
                            code = worker.proc.wait()
                            raise RuntimeError(
                                f"scoring worker exited with code {code} before it was ready "
                                f"(its error is above; scoring.memory_mb={self.config.memory_mb})"
                            ) from None
                        fail(worker, "crashes")
                        continue
                if worker.chunk and now - worker.item_started > self.config.timeout_s:
                    fail(worker, "timeouts")
                elif not worker.ready and now - worker.started > STARTUP_TIMEOUT_S:
                    raise RuntimeError(f"scoring worker not ready after {STARTUP_TIMEOUT_S:.0f} s")
        return result

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []


# ---------------------------------------------------------------------------- the process's pool

_config = ScoringConfig()
_pool: ScoringPool | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def configure(config: ScoringConfig) -> None:
    """Use `config` for this process's pool (validated now; a running pool is restarted lazily)."""
    global _config
    config.validate()
    with _pool_lock:
        if config != _config:
            _close_pool()
        _config = config


def score(fn: Callable[..., Any], items: Sequence[tuple], default: Any = None) -> Scored:
    """`fn(*item)` for every item on this process's pool (started on first use)."""
    global _pool, _pool_pid
    if not items:
        return Scored([])
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():  # a fork must not share its parent's pipes
            _pool, _pool_pid = ScoringPool(_config), os.getpid()
        pool = _pool
    return pool.map(fn, items, default)


def _close_pool() -> None:
    global _pool
    if _pool is not None and _pool_pid == os.getpid():
        _pool.close()
    _pool = None


def shutdown() -> None:
    """Stop this process's workers (also done at exit)."""
    with _pool_lock:
        _close_pool()


atexit.register(shutdown)
