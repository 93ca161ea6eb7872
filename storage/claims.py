"""Work claims: so two workers on overlapping grids compute each artifact once.

Before computing an artifact, a worker creates a claim file for it with an
exclusive create; a second worker that finds the claim skips the item (the
owner will record it). A claim left by a crashed worker is taken over when it
is older than `ttl_s`, or at once when its owner was a process on this host
that no longer exists.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec


class Claims:
    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, ttl_s: float = 6 * 3600):
        self.url = os.fspath(url)
        self.fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        self.root = root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)
        self.ttl_s = ttl_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}

    def _path(self, name: str) -> str:
        return f"{self.root}/{hashlib.sha256(name.encode()).hexdigest()}.json"

    def _create(self, path: str, name: str) -> bool:
        body = json.dumps({**self.owner, "name": name, "time": time.time()}).encode()
        try:
            with self.fs.open(path, "xb") as f:  # exclusive: fails if the claim exists
                f.write(body)
            return True
        except FileExistsError:
            return False

    def _abandoned(self, path: str) -> bool:
        try:
            info = json.loads(self.fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            return True  # vanished or half-written by a crashed owner
        if time.time() - float(info.get("time", 0)) > self.ttl_s:
            return True
        if info.get("host") == self.owner["host"] and info.get("pid") != self.owner["pid"]:
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, KeyError):
                return False
        return False

    def acquire(self, name: str) -> bool:
        """True if this worker now holds the claim on `name`."""
        path = self._path(name)
        if self._create(path, name):
            return True
        if self._abandoned(path):
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass
            return self._create(path, name)
        return False

    def release(self, name: str) -> None:
        path = self._path(name)
        try:
            info = json.loads(self.fs.cat_file(path))
        except (FileNotFoundError, ValueError):
            return
        if info.get("token") == self.owner["token"]:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass
