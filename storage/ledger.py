"""The run ledger: one Parquet row per materialised (or failed) artifact.

Rows are appended as small fragment files, one per write batch, with unique
names, so many workers can append at once without a lock and without losing a
row, locally or on an object store (a put is atomic there; locally we write a
temporary name and rename). `compact()` merges fragments into one and drops
duplicate rows; it deletes only the fragments it read, so rows appended while
it runs survive. `compact_step()` does the same in bounded steps while a run goes
on (tiers of `fan_in` fragments), so a reader never faces thousands of fragments.
`status` and planning read the ledger, not Prefect; a run reads it once into a
`LedgerView` (`Ledger.view()`) that its planning and the stage cache policy share.
"""
from __future__ import annotations

import io
import json
import logging
import os
import contextlib
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger("audioscenic")

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
        self.id = self.fs.unstrip_protocol(self.root)  # one ledger, however its URL was spelled

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
        path = f"{self.fragments}/{name}"
        for view in _views_of(self.id):  # the run's view learns its own rows without reading them back
            view._appended(table, path)
        return path

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

    def _read_paths(self, paths: list[str], columns: list[str] | None = None) -> pa.Table:
        if not paths:
            empty = SCHEMA.empty_table()
            return empty if columns is None else empty.select(columns)
        table = ds.dataset(paths, schema=SCHEMA, format="parquet", filesystem=self._pafs).to_table(columns=columns)
        # One chunk per fragment makes every later compute call slow; merge them once.
        return table.combine_chunks()

    def _read_listed(self, exclude: set[str] | frozenset[str] = frozenset(),
                     columns: list[str] | None = None) -> tuple[list[str], list[str], pa.Table]:
        """(every fragment listed, those read, their rows): the fragments not in `exclude`, read consistently."""
        paths = self.fragment_paths()
        new = [p for p in paths if p not in exclude]
        try:
            return paths, new, self._read_paths(new, columns)
        except FileNotFoundError:
            pass
        # A compaction removed a fragment between listing and reading. Its rows are in an output written before
        # the removal, so listed now: read fragment by fragment, listing again until nothing listed is unread.
        # A row read both before and after a merge is kept once (merges keep row ids).
        got: dict[str, pa.Table] = {}
        for attempt in range(100):
            paths = self.fragment_paths()
            vanished = False
            for p in paths:
                if p not in exclude and p not in got:
                    try:
                        got[p] = self._read_paths([p], columns)
                    except FileNotFoundError:
                        vanished = True
            if not vanished:
                break
            time.sleep(min(0.01 * attempt, 0.2))
        else:
            raise FileNotFoundError(f"ledger fragments kept vanishing under {self.fragments}")
        table = pa.concat_tables(list(got.values())) if got else self._read_paths([], columns)
        if "row_id" in table.column_names:
            first: dict[str, int] = {}
            for i, rid in enumerate(table["row_id"].to_pylist()):
                first.setdefault(rid, i)
            if len(first) < table.num_rows:
                table = table.take(pa.array(sorted(first.values()), pa.int64()))
        return paths, list(got), table.combine_chunks()

    def read(
        self,
        stage: str | None = None,
        item_ids: Iterable[str] | None = None,
        keys: Iterable[str] | None = None,
        status: str | None = None,
    ) -> pa.Table:
        """All rows matching the filters (each filter optional)."""
        table = self._read_listed()[2]
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

    @contextlib.contextmanager
    def view(self, fan_in: int | None = None) -> Iterator["LedgerView"]:
        """Read the ledger once into a `LedgerView`; while the block runs, this process's appends update it and the
        stage cache policy answers from it (`done_under`)."""
        v = LedgerView(self, fan_in)
        with _views_lock:
            _views[self.id].append(v)
        try:
            yield v
        finally:
            with _views_lock:
                _views[self.id].remove(v)
                if not _views[self.id]:
                    del _views[self.id]

    def done_under(self, entries: Iterable[tuple[str, str, str]]) -> bool:
        """True when the latest row of every (stage, item_id, key) is done under exactly that key.

        Answered by the run's view when one is open in this process (a dict lookup); otherwise from the
        fragments, reading only the columns it needs and keeping only these items' rows."""
        entries = list(entries)
        views = _views_of(self.id)
        if views:
            return views[-1].done_under(entries)
        if not entries:
            return True
        cols = ["stage", "item_id", "key", "status", "finished_at"]
        for attempt in range(5):
            try:
                paths = self.fragment_paths()
                table = ds.dataset(paths, schema=SCHEMA, format="parquet", filesystem=self._pafs).to_table(
                    columns=cols, filter=ds.field("item_id").isin(sorted({e[1] for e in entries})))
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        latest: dict[tuple[str, str], tuple[float, str, str]] = {}
        for stage, item, key, status, fin in zip(*(table[c].to_pylist() for c in cols)):
            if (stage, item) not in latest or (fin or 0.0) >= latest[(stage, item)][0]:
                latest[(stage, item)] = (fin or 0.0, key, status)
        for stage, item, key in entries:
            got = latest.get((stage, item))
            if got is None or got[1] != key or got[2] != "done":
                return False
        return True

    # -- maintenance -------------------------------------------------------
    def compact(self) -> dict[str, int]:
        """Merge all current fragments into one, dropping duplicate rows."""
        paths = self.fragment_paths()
        if not paths:
            return {"fragments_before": 0, "rows_before": 0, "rows_after": 0}
        table = self._read_paths(paths)
        rows_before = table.num_rows
        compacted = _dedupe(table)
        self._write_table(compacted, f"{time.time_ns():020d}-compact-{uuid.uuid4().hex}.parquet")
        self._remove(paths)
        return {"fragments_before": len(paths), "rows_before": rows_before, "rows_after": compacted.num_rows}

    def _remove(self, paths: Iterable[str]) -> None:
        for p in paths:
            try:
                self.fs.rm_file(p)
            except FileNotFoundError:
                pass  # another compaction got there first; its output holds the rows

    def compact_step(self, fan_in: int = 16, paths: list[str] | None = None) -> list[tuple[list[str], str]]:
        """Bounded compaction, safe beside writers, readers and other compactions.

        Fragments form tiers: appended ones are tier 0, and `fan_in` fragments of one tier merge into one of the
        next (named `...-L<tier>-...`). Each step merges only full groups, so it reads at most what it writes,
        every row is rewritten once per tier (log_fan_in of the fragments appended), and a ledger holds at most
        about fan_in - 1 fragments per tier. Like `compact`, a merge writes its output before it deletes its inputs,
        and only those; a group whose fragment vanished meanwhile (another compaction took it) is left alone.
        A full `compact()`'s output is not a tier: it stays until the next full compaction.
        Returns (inputs, output) per merge done.
        """
        if fan_in < 2:
            raise ValueError("fan_in must be at least 2")
        tiers: dict[int, list[str]] = defaultdict(list)
        for p in self.fragment_paths() if paths is None else paths:
            t = _tier(p)
            if t is not None:
                tiers[t].append(p)
        merges = []
        tier = 0
        while tier <= max(tiers, default=-1):
            group = sorted(tiers.get(tier, []))
            while len(group) >= fan_in:
                chunk, group = group[:fan_in], group[fan_in:]
                try:
                    table = self._read_paths(chunk)
                except FileNotFoundError:
                    continue  # another compaction merged (some of) these: its output holds the rows
                name = f"{time.time_ns():020d}-L{tier + 1}-{uuid.uuid4().hex}.parquet"
                self._write_table(_dedupe(table), name)
                self._remove(chunk)
                out = f"{self.fragments}/{name}"
                tiers[tier + 1].append(out)
                merges.append((chunk, out))
            tier += 1
        return merges


def _tier(path: str) -> int | None:
    """0 for an appended fragment, n for a compact_step output of tier n, None for a full compaction's output."""
    parts = path.rsplit("/", 1)[-1].removesuffix(".parquet").split("-")
    if len(parts) == 2:
        return 0
    if len(parts) == 3 and parts[1][:1] == "L" and parts[1][1:].isdigit():
        return int(parts[1][1:])
    return None


def _dedupe(table: pa.Table) -> pa.Table:
    """The rows in finished order, each (stage, item, key, status, error) once (its first record)."""
    table = table.sort_by([("finished_at", "ascending")])
    seen: set[tuple] = set()
    keep: list[int] = []
    ident = [table[c].to_pylist() for c in _IDENTITY]
    for i in range(table.num_rows):
        k = tuple(col[i] for col in ident)
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return table.take(pa.array(keep, pa.int64()))


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


# ----------------------------------------------------------------------------- the run's view

_views: dict[str, list["LedgerView"]] = defaultdict(list)  # ledger id -> views open in this process
_views_lock = threading.Lock()


def _views_of(ledger_id: str) -> list["LedgerView"]:
    with _views_lock:
        return list(_views.get(ledger_id, ()))


# What planning and the cache policy read: the view keeps these (not row ids, hosts, URIs, times of a run).
VIEW_COLUMNS = ["stage", "item_id", "key", "status", "error", "finished_at", "code_version", "params_hash",
                "inputs_hash", "upstream_keys"]
COMPACT_FAN_IN = 16  # fragments merged per compaction step: at most ~15 per tier, each row rewritten once per tier
_FOLD_TABLES = 256  # in-process appends are concatenated in groups this size (many tiny tables cost memory)


class LedgerView:
    """The latest row per item of a ledger (the columns planning reads), as one run sees it: read once, then kept
    current.

    Rows this process appends reach it as they are written (`Ledger.append`), fragments written elsewhere
    (other workers, Dask) when `refresh()` reads the fragments it has not read yet; a full read happens
    once. Planning reads `latest_table` like a ledger's; the stage cache policy asks `done_under`, a dict
    lookup. It keeps only the latest row per (stage, item), so its memory is that of the grid's state,
    not of the run's history. `batch_finished()` runs a bounded compaction step every `fan_in` batches.
    """

    def __init__(self, ledger: Ledger, fan_in: int | None = None):
        self.ledger, self.fan_in = ledger, fan_in or COMPACT_FAN_IN
        self._lock = threading.RLock()
        self._seen: set[str] = set()  # fragments whose rows are in
        self._latest: dict[str, pa.Table] = {}  # stage -> latest row per item
        self._pending: list[pa.Table] = []  # rows not folded into _latest yet
        self._tiny: list[pa.Table] = []  # appended in-process, grouped before they join _pending
        self._pending_rows = 0
        self._index: dict[str, dict[str, tuple[str, str, float]]] = {}  # stage -> item -> (key, status, finished_at)
        self._batches = 0
        self._read_once = False
        self.full_reads = 0  # reads of every fragment: 1 per view
        self.fragments_read = 0
        self.merges = 0  # compaction merges this view ran
        self.refresh()

    def __repr__(self) -> str:
        return f"LedgerView({self.ledger!r}, {sum(t.num_rows for t in self._latest.values())} latest rows)"

    # -- learning rows -----------------------------------------------------
    def refresh(self) -> int:
        """Read the fragments not read yet (rows written elsewhere, compaction outputs); returns how many."""
        with self._lock:
            seen = set(self._seen)
        paths, new, table = self.ledger._read_listed(exclude=seen, columns=VIEW_COLUMNS)
        with self._lock:
            self.full_reads += not self._read_once
            self._read_once = True
            self.fragments_read += len(new)
            self._seen.intersection_update(paths)  # compacted away: forget them
            self._seen.update(new)
            self._add(table)
        return len(new)

    def _appended(self, table: pa.Table, path: str) -> None:
        with self._lock:
            table = table.select(VIEW_COLUMNS)
            self._seen.add(path)
            self._learn(table)
            self._tiny.append(table)
            if len(self._tiny) >= _FOLD_TABLES:
                group, self._tiny = pa.concat_tables(self._tiny).combine_chunks(), []
                self._add(group, learnt=True)

    def _add(self, table: pa.Table, learnt: bool = False) -> None:
        if table.num_rows == 0:
            return
        if not learnt:
            self._learn(table)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        total = sum(t.num_rows for t in self._latest.values())
        if self._pending_rows > max(4096, total // 4):  # geometric: folding stays linear in the rows seen
            self._fold()

    def _learn(self, table: pa.Table) -> None:
        """Keep the lookup indexes (stages already asked about) current with these rows."""
        stages = set(table["stage"].to_pylist()) & set(self._index)
        if not stages:
            return
        cols = [table[c].to_pylist() for c in ("stage", "item_id", "key", "status", "finished_at")]
        for stage, item, key, status, fin in zip(*cols):
            index = self._index.get(stage)
            if index is not None:
                old = index.get(item)
                if old is None or (fin or 0.0) >= old[2]:
                    index[item] = (key, status, fin or 0.0)

    def _fold(self) -> None:
        if self._tiny:
            self._pending.append(pa.concat_tables(self._tiny))
            self._pending_rows += sum(t.num_rows for t in self._tiny)
            self._tiny = []  # already learnt, as they came
        if not self._pending:
            return
        new = pa.concat_tables(self._pending).combine_chunks()
        self._pending, self._pending_rows = [], 0
        for stage in set(new["stage"].to_pylist()):
            rows = new.filter(pc.equal(new["stage"], stage))
            old = self._latest.get(stage)
            self._latest[stage] = _latest_rows(rows if old is None else pa.concat_tables([old, rows]).combine_chunks())

    # -- answering ---------------------------------------------------------
    def latest_table(self, stage: str, status: str | None = None) -> pa.Table:
        with self._lock:
            self._fold()
            table = self._latest.get(stage)
        if table is None:
            return SCHEMA.empty_table().select(VIEW_COLUMNS)
        return table if status is None else table.filter(pc.equal(table["status"], status))

    def latest(self, stage: str, status: str | None = None) -> dict[str, dict[str, Any]]:
        return {row["item_id"]: row for row in self.latest_table(stage, status).to_pylist()}

    def stages(self) -> list[str]:
        with self._lock:
            self._fold()
            return sorted(self._latest)

    def done_under(self, entries: Iterable[tuple[str, str, str]]) -> bool:
        """True when the latest row of every (stage, item_id, key) is done under exactly that key."""
        with self._lock:
            for stage, item, key in entries:
                index = self._index.get(stage)
                if index is None:
                    t = self.latest_table(stage)
                    cols = [t[c].to_pylist() for c in ("item_id", "key", "status", "finished_at")]
                    index = self._index[stage] = {i: (k, s, f or 0.0) for i, k, s, f in zip(*cols)}
                got = index.get(item)
                if got is None or got[0] != key or got[1] != "done":
                    return False
        return True

    # -- maintenance -------------------------------------------------------
    def batch_finished(self) -> None:
        """One more batch of the run is done: every `fan_in` of them, a bounded compaction step."""
        with self._lock:
            self._batches += 1
            if self._batches % self.fan_in:
                return
        try:
            self.compact_step()
        except Exception as e:  # upkeep: a failed merge leaves its fragments as they were, and the run goes on
            log.warning("ledger compaction step failed (the next one retries): %s: %s", type(e).__name__, e)

    def compact_step(self) -> list[tuple[list[str], str]]:
        merges = self.ledger.compact_step(self.fan_in)
        with self._lock:
            for inputs, out in merges:
                if self._seen.issuperset(inputs):  # its rows are all here already: no need to read it back
                    self._seen.difference_update(inputs)
                    self._seen.add(out)
            self.merges += len(merges)
        return merges


@contextlib.contextmanager
def open_view(ledger: "Ledger | LedgerView") -> Iterator[LedgerView]:
    """The given view, or a view of the given ledger for the block."""
    if isinstance(ledger, LedgerView):
        yield ledger
    else:
        with ledger.view() as v:
            yield v
