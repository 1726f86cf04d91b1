"""One `vfm run` at a time on a run dir, and a run lost with its machine noticed.

A run holds the run dir while the newest lock file at its root, ``_LOCK-NNNNNN.json``, is
its own. It claims generation n + 1 with Storage.create_bytes (a hard link locally, a
conditional PUT on S3: of two runs claiming the same generation one wins), only when no
lock exists or the newest one is released or stale, and marks its file released when it
ends (kept, so that no generation is ever claimed twice). Each run writes only its own file:
a heartbeat every HEARTBEAT_S seconds from a thread. A lock is stale when its process is
gone (same host, boot and pid namespace) or its heartbeat is older than STALE_S (another
host: a machine lost, or a killed process). A run whose lock is no longer the newest was
taken over: the engine starts and finishes no further stage. A stage attempt whose lock is
not the live one was interrupted, not running.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from data_curation.storage import Storage, boot_id
from orchestration.ray_runtime import error_line

LOCK_RE = re.compile(r"_LOCK-(\d{6,})\.json$")
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats; hosts' clocks must agree to well within this (NTP)
_HELD: set[str] = set()  # tokens of the locks this process holds


def lock_name(generation: int) -> str:
    return f"_LOCK-{generation:06d}.json"


def _machine() -> str:
    """Where a pid means this process table: the boot (cloned VMs share a host name) and the
    pid namespace (containers on the host's network share it too)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    boot = boot_id()
    return f"{boot}:{namespace}" if boot else ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def why_stale(lock: dict[str, Any], now: float | None = None) -> str | None:
    """Why the holder of ``lock`` is gone, or None while it is alive. A lock that could not be
    read whole is never judged stale: deleting it is the user's call."""
    if "token" not in lock:
        return None
    if lock.get("released"):
        return "released"
    here = lock.get("host") == socket.gethostname() and lock.get("machine") == _machine()
    pid = int(lock.get("pid", -1))
    if here and (not pid_alive(pid) or (pid == os.getpid() and lock["token"] not in _HELD)):
        return f"process {pid} is gone"  # or its pid is this process's now (a restarted container's 1)
    age = (now or time.time()) - float(lock.get("heartbeat", 0))
    if age > STALE_S:
        return f"no heartbeat for {age:.0f} s"
    return None


def describe(lock: dict[str, Any]) -> str:
    """'pid 4242 on host-a, since 2026-12-02 06:10, heartbeat 12 s ago'."""
    if "token" not in lock:
        return f"a lock file vfm cannot read, {lock.get('uri', '')}"
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(lock.get("started", 0))))
    beat = time.time() - float(lock.get("heartbeat", 0))
    return f"pid {lock.get('pid')} on {lock.get('host')}, since {started}, heartbeat {beat:.0f} s ago"


def newest_lock(storage: Storage, run_dir: str) -> tuple[int, dict[str, Any] | None]:
    """(generation, content) of the newest lock file in ``run_dir``; (0, None) when there is none.
    Content read from a file cut short is {"uri": ...} (no token)."""
    generations = sorted(int(m.group(1)) for uri in storage.ls(run_dir)
                         if (m := LOCK_RE.search(posixpath.basename(uri))))
    for generation in reversed(generations):
        uri = storage.join(run_dir, lock_name(generation))
        try:
            return generation, {**storage.read_json(uri), "uri": uri}
        except FileNotFoundError:  # released since the listing
            continue
        except ValueError:
            return generation, {"uri": uri}
    return 0, None


def live_holder(storage: Storage, run_dir: str) -> dict[str, Any] | None:
    """The newest lock of ``run_dir`` while a live process holds it; None when absent or stale."""
    _generation, lock = newest_lock(storage, run_dir)
    return lock if lock is not None and why_stale(lock) is None else None


class RunLock:
    """The lock of the run dir ``run_dir`` (a URI). ``acquire`` it; ``release`` when done."""

    def __init__(self, storage: Storage, run_dir: str, log: Callable[[str], None] = lambda line: None):
        self.storage, self.run_dir, self.log = storage, run_dir, log
        self.token = uuid.uuid4().hex
        self.uri: str | None = None  # this run's lock file, once held
        self.lost_to: dict[str, Any] | None = None  # set by the heartbeat when a newer run took over
        self._started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self, released: bool = False) -> bytes:
        return json.dumps({"token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
                           "machine": _machine(), "started": self._started, "heartbeat": time.time(),
                           "released": released}).encode()

    def acquire(self) -> dict[str, Any] | None:
        """Take the lock; returns None once held, or the live holder's lock when another process
        holds it (or won the claim of the same generation)."""
        self._started = time.time()
        for _ in range(3):
            generation, held = newest_lock(self.storage, self.run_dir)
            if held is not None:
                reason = why_stale(held)
                if reason is None:
                    return held
                if reason != "released":
                    self._say(f"taking over the run dir from a run that is gone ({describe(held)}: {reason})")
            uri = self.storage.join(self.run_dir, lock_name(generation + 1))
            if not self.storage.create_bytes(uri, self._content()):
                try:
                    won = {**self.storage.read_json(uri), "uri": uri}
                except FileNotFoundError:  # claimed and let go since: look again
                    continue
                except ValueError:
                    won = {"uri": uri}
                if won.get("token") != self.token:  # not a retried PUT of this very claim
                    return won
            self.uri = uri
            _HELD.add(self.token)
            try:
                for older in range(generation, max(generation - 8, 0), -1):  # only the newest lock counts
                    self._quietly(f"remove {lock_name(older)}", self.storage.rm,
                                  self.storage.join(self.run_dir, lock_name(older)))
                self._thread = threading.Thread(target=self._beat, name="vfm-run-lock", daemon=True)
                self._thread.start()
            except BaseException:  # interrupted once the claim landed: let it go, not leak it
                self.release()
                raise
            return None
        return {"uri": self.storage.join(self.run_dir, lock_name(generation + 1))}

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                _generation, newest = newest_lock(self.storage, self.run_dir)
                if newest is not None and "token" not in newest and newest.get("uri") == self.uri:
                    continue  # this run's own file read while being written (no hard links there)
                if newest is None or newest.get("token") != self.token:  # taken over, or deleted by hand
                    self.lost_to = newest or {"uri": self.uri}
                    self._say(f"warning: another run took over this run dir ({describe(self.lost_to)}); "
                              f"this one finishes the stage it is in, and neither marks it done nor starts another")
                    return
                self.storage.write_bytes(self.uri, self._content())
            except Exception as exc:  # a store hiccup: the next beat tries again, well inside STALE_S
                self._say(f"warning: could not refresh {self.uri}: {error_line(exc)}")

    def release(self) -> None:
        """Stop the heartbeat and mark this run's lock file released; a failure is a warning
        line, so it never hides how the run ended."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.uri is not None and self.lost_to is None:
            self._quietly(f"release {self.uri}", self.storage.write_bytes, self.uri, self._content(released=True))
        _HELD.discard(self.token)

    def _quietly(self, what: str, call: Callable[..., Any], *args: Any) -> None:
        try:
            call(*args)
        except FileNotFoundError:
            pass
        except Exception as exc:
            self._say(f"warning: could not {what}: {error_line(exc)}")

    def _say(self, line: str) -> None:
        try:  # from the heartbeat thread too, which a closed stderr must not end
            self.log(line)
        except Exception:
            pass

