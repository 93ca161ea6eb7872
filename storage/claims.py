"""Work claims with leases: so workers sharing a grid compute each artifact once.

Before computing an artifact, a worker creates a claim file for it with an exclusive
create; another worker that finds a live claim leaves the item to its owner (and may
wait for it). A claim is a lease: it carries an expiry `lease_s` seconds ahead, and
while its owner holds it a background thread renews it every `lease_s / 3`, so a busy
worker keeps its items however long they take, and a dead one (crashed, SIGKILLed,
its machine gone) loses them within one lease. A claim whose lease has lapsed is taken
over; so is, at once, one whose owner was a process on this host that no longer exists.

Exclusive create is what keeps a claim to one owner: on a local or network file system
an O_EXCL open; on S3 a conditional PUT (If-None-Match), which fsspec's s3fs uses for
mode "xb". A worker that could not renew for a whole lease (a frozen machine) may find
its item taken over; both then compute it, and the store's commit protocol keeps the
artifact whole (same key, same content).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec

log = logging.getLogger("audioscenic")

DEFAULT_LEASE_S = 300.0


class Claims:
    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None,
                 lease_s: float = DEFAULT_LEASE_S, renew: bool = True):
        if not lease_s > 0:
            raise ValueError(f"a claim's lease must be > 0 seconds, got {lease_s}")
        self.url = os.fspath(url)
        self.fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        self.root = root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)
        self.lease_s = float(lease_s)
        self.renew_leases = renew
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        self._held: dict[str, str] = {}  # name -> claim path, while this worker holds it
        self._lock = threading.Lock()
        self._write = threading.Lock()  # a renewal's read-then-write and a release never interleave
        self._renewer: threading.Thread | None = None
        self._wake = threading.Event()

    def _path(self, name: str) -> str:
        return f"{self.root}/{hashlib.sha256(name.encode()).hexdigest()}.json"

    def _body(self, name: str) -> bytes:
        now = time.time()
        return json.dumps({**self.owner, "name": name, "time": now, "expires": now + self.lease_s}).encode()

    def _create(self, path: str, name: str) -> bool:
        try:
            with self.fs.open(path, "xb") as f:  # exclusive: fails if the claim exists
                f.write(self._body(name))
            return True
        except FileExistsError:
            return False

    def _read(self, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            return None

    def _abandoned(self, path: str) -> bool:
        info = self._read(path)
        if info is None:
            return True  # vanished or half-written by a crashed owner
        try:
            expires = float(info["expires"])
        except (KeyError, TypeError, ValueError):
            expires = float(info.get("time", 0)) + self.lease_s  # a claim written before leases
        if time.time() > expires:
            return True
        if info.get("host") == self.owner["host"] and info.get("pid") != self.owner["pid"]:
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, KeyError, TypeError):
                return False
        return False

    def acquire(self, name: str) -> bool:
        """True if this worker now holds the claim on `name` (renewed until `release`)."""
        path = self._path(name)
        if not self._create(path, name):
            if not self._abandoned(path):
                return False
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(path)
            if not self._create(path, name):
                return False
        with self._lock:
            self._held[name] = path
        self._start_renewer()
        return True

    def release(self, name: str) -> None:
        with self._write:
            with self._lock:
                self._held.pop(name, None)
            path = self._path(name)
            info = self._read(path)
            if info is not None and info.get("token") == self.owner["token"]:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

    def holds(self, name: str) -> bool:
        info = self._read(self._path(name))
        return info is not None and info.get("token") == self.owner["token"]

    # -- renewal -----------------------------------------------------------

    def renew(self) -> None:
        """Push every held claim's expiry one lease ahead; a claim another worker took over is dropped."""
        with self._lock:
            held = dict(self._held)
        for name, path in held.items():
            with self._write:  # else a release between this read and the write would leave the claim behind
                with self._lock:
                    if name not in self._held:
                        continue  # released meanwhile
                info = self._read(path)
                if info is None or info.get("token") != self.owner["token"]:
                    log.warning("claim on %s was taken over by another worker (lease lapsed)", name)
                    with self._lock:
                        self._held.pop(name, None)
                    continue
                with contextlib.suppress(OSError):
                    self.fs.pipe_file(path, self._body(name))

    def _start_renewer(self) -> None:
        if not self.renew_leases:
            return
        with self._lock:
            if self._renewer is not None and self._renewer.is_alive():
                return
            self._renewer = threading.Thread(target=self._renew_loop, name="claims-renewer", daemon=True)
            self._renewer.start()

    def _renew_loop(self) -> None:
        period = self.lease_s / 3
        while True:
            self._wake.wait(period)
            self._wake.clear()
            with self._lock:
                if not self._held:
                    self._renewer = None
                    return  # started again by the next acquire
            try:
                self.renew()
            except Exception as e:  # a flaky store must not kill the renewer; the next round retries
                log.warning("renewing claims failed: %s: %s", type(e).__name__, e)
