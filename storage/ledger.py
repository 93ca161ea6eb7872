"""The run ledger: one Parquet row per materialised (or failed) artifact.

Rows are appended as small fragment files, one per write batch, with unique
names, so many workers can append at once without a lock and without losing a
row, locally or on an object store (a put is atomic there; locally we write a
temporary name and rename). `compact()` merges fragments into one and drops
duplicate rows; it deletes only the fragments it read, so rows appended while
it runs survive. `status` and planning read the ledger, not Prefect.
"""
from __future__ import annotations

import io
import json
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("stage", pa.string()),
        ("item_id", pa.string()),  # e.g. "dog-1" or "bear/dog-1/full"
        ("video_id", pa.string()),
        ("audio_id", pa.string()),
        ("variant", pa.string()),
        ("key", pa.string()),
        ("code_version", pa.string()),
        ("params_hash", pa.string()),
        ("inputs_hash", pa.string()),
        ("upstream_keys", pa.string()),  # JSON object: upstream name -> key
        ("uri", pa.string()),
        ("status", pa.string()),  # "done" | "failed"
        ("error", pa.string()),
        ("started_at", pa.float64()),  # unix seconds
        ("finished_at", pa.float64()),
        ("duration_s", pa.float64()),
        ("host", pa.string()),
        ("run_id", pa.string()),
    ]
)
_REQUIRED = ("stage", "item_id", "key", "status")
_IDENTITY = ("stage", "item_id", "key", "status", "error")


class Ledger:
    def __init__(self, url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None):
        self.url = os.fspath(url)
        self.fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        self.root = root.rstrip("/")
        self.fragments = f"{self.root}/fragments"
        self.fs.makedirs(self.fragments, exist_ok=True)
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self._pafs = pafs.LocalFileSystem() if self._local else pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def __repr__(self) -> str:
        return f"Ledger({self.url!r})"

    # -- writing -----------------------------------------------------------
    @staticmethod
    def make_row(**fields: Any) -> dict[str, Any]:
        fields.setdefault("status", "done")
        if fields["status"] not in ("done", "failed"):
            raise ValueError(f"ledger status must be 'done' or 'failed', not {fields['status']!r}")
        missing = [f for f in _REQUIRED if not fields.get(f)]
        if missing:
            raise ValueError(f"ledger row lacks {', '.join(missing)}")
        unknown = set(fields) - set(SCHEMA.names)
        if unknown:
            raise ValueError(f"unknown ledger fields: {', '.join(sorted(unknown))}")
        row = {name: None for name in SCHEMA.names}
        row.update(fields)
        if isinstance(row["upstream_keys"], Mapping):
            row["upstream_keys"] = json.dumps(dict(row["upstream_keys"]), sort_keys=True)
        now = time.time()
        row["row_id"] = row["row_id"] or uuid.uuid4().hex
        row["finished_at"] = row["finished_at"] if row["finished_at"] is not None else now
        row["host"] = row["host"] or socket.gethostname()
        if row["started_at"] is not None and row["duration_s"] is None:
            row["duration_s"] = row["finished_at"] - row["started_at"]
        return row

    def append(self, rows: Iterable[Mapping[str, Any]]) -> str | None:
        """Write one fragment holding `rows`; returns its path (None when there were no rows)."""
        rows = [self.make_row(**r) for r in rows]
        if not rows:
            return None
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}.parquet"
        self._write_table(table, name)
        return f"{self.fragments}/{name}"

    def _write_table(self, table: pa.Table, name: str) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        final = f"{self.fragments}/{name}"
        if self._local:
            tmp = f"{self.fragments}/.{name}.tmp"
            with open(tmp, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # atomic: readers never see a partial fragment
        else:
            self.fs.pipe_file(final, buf.getvalue())

    # -- reading -----------------------------------------------------------
    def fragment_paths(self) -> list[str]:
        try:
            # refresh: s3fs caches listings per process, and other workers' fragments must be seen
            names = self.fs.ls(self.fragments, detail=False, **({} if self._local else {"refresh": True}))
        except FileNotFoundError:
            return []
        out = [n for n in names if n.rsplit("/", 1)[-1].endswith(".parquet") and not n.rsplit("/", 1)[-1].startswith(".")]
        return sorted(out)

    def _read_paths(self, paths: list[str]) -> pa.Table:
        if not paths:
            return SCHEMA.empty_table()
        table = ds.dataset(paths, schema=SCHEMA, format="parquet", filesystem=self._pafs).to_table()
        # One chunk per fragment makes every later compute call slow; merge them once.
        return table.combine_chunks()

    def read(
        self,
        stage: str | None = None,
        item_ids: Iterable[str] | None = None,
        keys: Iterable[str] | None = None,
        status: str | None = None,
    ) -> pa.Table:
        """All rows matching the filters (each filter optional)."""
        for attempt in range(5):
            paths = self.fragment_paths()
            try:
                table = self._read_paths(paths)
                break
            except FileNotFoundError:
                # A concurrent compaction removed a fragment between listing and reading.
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        mask = None
        for col, value in (("stage", stage), ("status", status)):
            if value is not None:
                m = pc.equal(table[col], value)
                mask = m if mask is None else pc.and_(mask, m)
        for col, values in (("item_id", item_ids), ("key", keys)):
            if values is not None:
                m = pc.is_in(table[col], value_set=pa.array(list(values), pa.string()))
                mask = m if mask is None else pc.and_(mask, m)
        return table.filter(mask) if mask is not None else table

    def latest_table(self, stage: str, status: str | None = None) -> pa.Table:
        """One row per item of a stage: its most recent (optionally only rows of one status)."""
        return _latest_rows(self.read(stage=stage, status=status))

    def snapshot(self) -> "LedgerSnapshot":
        """The ledger as of now, read once: planning many stages reads the fragments once, not per stage."""
        return LedgerSnapshot(self.read(), self)

    def latest(self, stage: str, status: str | None = None) -> dict[str, dict[str, Any]]:
        """The most recent row per item of a stage, as dicts keyed by item id."""
        table = self.latest_table(stage, status)
        return {row["item_id"]: row for row in table.to_pylist()}

    # -- maintenance -------------------------------------------------------
    def compact(self) -> dict[str, int]:
        """Merge all current fragments into one, dropping duplicate rows."""
        paths = self.fragment_paths()
        if not paths:
            return {"fragments_before": 0, "rows_before": 0, "rows_after": 0}
        table = self._read_paths(paths)
        rows_before = table.num_rows
        table = table.sort_by([("finished_at", "ascending")])
        seen: set[tuple] = set()
        keep: list[int] = []
        ident = [table[c].to_pylist() for c in _IDENTITY]
        for i in range(table.num_rows):
            k = tuple(col[i] for col in ident)
            if k not in seen:
                seen.add(k)
                keep.append(i)
        compacted = table.take(pa.array(keep, pa.int64()))
        self._write_table(compacted, f"{time.time_ns():020d}-compact-{uuid.uuid4().hex}.parquet")
        for p in paths:
            try:
                self.fs.rm_file(p)
            except FileNotFoundError:
                pass  # another compaction got there first; its output holds the rows
        return {"fragments_before": len(paths), "rows_before": rows_before, "rows_after": compacted.num_rows}


def _latest_rows(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    table = table.sort_by([("finished_at", "ascending")])
    last: dict[str, int] = {}
    for i, item in enumerate(table["item_id"].to_pylist()):
        last[item] = i  # later rows win
    return table.take(pa.array(sorted(last.values()), pa.int64()))


class LedgerSnapshot:
    """Read-only view of one read of a ledger, answering `latest_table`/`latest` like the ledger itself."""

    def __init__(self, table: pa.Table, ledger: Ledger | None = None):
        self.table, self.ledger = table, ledger
        self._latest: dict[tuple[str, str | None], pa.Table] = {}

    def __repr__(self) -> str:
        return f"LedgerSnapshot({self.table.num_rows} rows of {self.ledger!r})"

    def latest_table(self, stage: str, status: str | None = None) -> pa.Table:
        if (stage, status) not in self._latest:
            mask = pc.equal(self.table["stage"], stage)
            if status is not None:
                mask = pc.and_(mask, pc.equal(self.table["status"], status))
            self._latest[(stage, status)] = _latest_rows(self.table.filter(mask))
        return self._latest[(stage, status)]

    def latest(self, stage: str, status: str | None = None) -> dict[str, dict[str, Any]]:
        return {row["item_id"]: row for row in self.latest_table(stage, status).to_pylist()}
