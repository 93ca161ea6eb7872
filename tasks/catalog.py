"""Catalogs: what videos and audio clips exist, with ids, labels and content hashes.

Scans DAVIS (JPEGImages/480p/<seq>/ frames, optional Annotations/480p/<seq>/
palette masks, optional ImageSets/2017/{train,val}.txt), ESC-50 (audio/*.wav +
meta/esc50.csv) and plain folders (video files, frame folders, audio files of
any common format, detected by content). The result is one Parquet table; a bad
item becomes a `CatalogIssue` naming it, and the rest of the catalog is intact.

Hash once: with a `storage.state.HashState`, a file's content hash comes from the
workdir's stat cache (read again only when its stat changed), and with the previous
catalog, an item whose content hash is unchanged keeps its probed facts (frame count,
size, duration) instead of decoding every frame again. So a rescan of an unchanged
catalog costs one stat per file.
"""
from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.files import atomic_path
from storage.hashing import hash_file, hash_files
from storage.keys import StageKey
from tasks.stage_task import task
from tasks.ids import is_valid_utf8_name, unique_ids
from tasks.media import (
    AUDIO_EXTENSIONS,
    FRAME_EXTENSIONS,
    VIDEO_EXTENSIONS,
    MediaError,
    frame_files,
    probe_audio,
    probe_frame_folder,
    probe_video_file,
)

CATALOG_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("media", pa.string()),  # "video" | "audio"
        ("kind", pa.string()),  # "frames" | "video_file" | "audio_file"
        ("source", pa.string()),  # "davis" | "esc50" | "folder"
        ("name", pa.string()),  # original name (sequence or file name)
        ("path", pa.string()),
        ("label", pa.string()),  # DAVIS: object words of the sequence; ESC-50: category
        ("content_hash", pa.string()),
        ("annotations_path", pa.string()),
        ("annotations_hash", pa.string()),
        ("num_frames", pa.int64()),
        ("fps", pa.float64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int64()),
        ("channels", pa.int64()),
        ("format", pa.string()),
        ("split", pa.string()),
        ("meta", pa.string()),  # JSON: source-specific fields (ESC-50 fold, target, ...)
    ]
)
ESC50_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
Progress = Callable[[str], None] | None
# What probing a video or audio file finds: a function of its content, reused while the content hash is unchanged.
PROBED = ("num_frames", "fps", "width", "height", "duration_s", "sample_rate", "channels", "format")


class Hashing:
    """How a scan hashes files and whether it may reuse what an earlier catalog probed.

    hashes: a `storage.state.HashState` (stat-cached hashes) or None (read every file);
    previous: the last catalog, whose entries are reused by path while their content hash
    (and kind) is unchanged.
    """

    def __init__(self, hashes=None, previous: "Catalog | None" = None):
        self.hashes = hashes
        self.previous = {e["path"]: e for e in previous.entries} if previous is not None else {}

    def file(self, path: Path) -> str:
        return self.hashes.file_hash(path) if self.hashes is not None else hash_file(path)

    def files(self, named) -> str:
        return hash_files(named, file_hash=self.hashes.file_hash if self.hashes is not None else None)

    def probed(self, path: Path, kind: str, content: Callable[[], str]) -> tuple[str | None, dict[str, Any] | None]:
        """(content hash or None, the previous catalog's probed fields for `path` if its content is unchanged, or None)."""
        prev = self.previous.get(str(path))
        if prev is None or prev.get("kind") != kind:
            return None, None
        try:
            digest = content()
        except OSError:
            return None, None  # let the probe name the problem
        if digest != prev.get("content_hash"):
            return digest, None
        return digest, {k: prev.get(k) for k in PROBED}


PLAIN = Hashing()


@dataclass(frozen=True)
class CatalogIssue:
    item: str
    path: str
    problem: str
    severity: str = "error"  # "error": item left out; "warning": item kept

    def __str__(self) -> str:
        return f"[{self.severity}] {self.item}: {self.problem} ({self.path})"


@dataclass
class Catalog:
    entries: list[dict[str, Any]] = field(default_factory=list)
    issues: list[CatalogIssue] = field(default_factory=list)

    def extend(self, other: "Catalog") -> None:
        self.entries.extend(other.entries)
        self.issues.extend(other.issues)

    @property
    def errors(self) -> list[CatalogIssue]:
        return [i for i in self.issues if i.severity == "error"]

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.entries, schema=CATALOG_SCHEMA)

    def by_id(self, media: str) -> dict[str, dict[str, Any]]:
        return {e["id"]: e for e in self.entries if e["media"] == media}


def _entry(**fields: Any) -> dict[str, Any]:
    row = {name: None for name in CATALOG_SCHEMA.names}
    row.update(fields)
    if isinstance(row["meta"], dict):
        row["meta"] = json.dumps(row["meta"], sort_keys=True)
    return row


def _name_ok(path: Path, catalog: Catalog) -> bool:
    if is_valid_utf8_name(path.name):
        return True
    shown = os.fsencode(path).decode("utf-8", "backslashreplace")
    catalog.issues.append(CatalogIssue(shown, shown, "file name is not valid UTF-8; rename it to include it"))
    return False


def _problem(item: Path, err: MediaError) -> str:
    """The problem as said of `item`: a frame folder's problem names the frame (the item is the folder)."""
    where = Path(err.path)
    if where != item and item in where.parents:
        return f"frame {where.relative_to(item)} {err.problem}"
    return err.problem


def _frame_files(folder: Path) -> list[Path]:
    """`tasks.media.frame_files` from one directory read (no stat per file): the same files, the same order."""
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.is_file() and os.path.splitext(e.name)[1].lower() in FRAME_EXTENSIONS)
    return [folder / n for n in names]


def _video_entry(path: Path, source: str, label: str | None, *, annotations: Path | None = None, split: str | None = None,
                 hashing: Hashing = PLAIN) -> dict[str, Any]:
    if path.is_dir():
        kind = "frames"
        content = lambda: hashing.files((f.name, f) for f in _frame_files(path))  # noqa: E731
        probe = probe_frame_folder
    else:
        kind = "video_file"
        content = lambda: hashing.file(path)  # noqa: E731
        probe = probe_video_file
    digest, probed = hashing.probed(path, kind, content)
    if probed is None:
        info = probe(path)
        digest = digest or content()
        probed = dict(num_frames=info.num_frames, fps=info.fps, width=info.width, height=info.height,
                      duration_s=info.duration_s, format=info.format)
    ann_hash = None
    if annotations is not None:
        ann_hash = hashing.files((f.name, f) for f in _frame_files(annotations))
    return _entry(
        media="video", kind=kind, source=source, name=path.name, path=str(path), label=label,
        content_hash=digest, annotations_path=str(annotations) if annotations else None,
        annotations_hash=ann_hash, split=split, **probed,
    )


def _audio_entry(path: Path, source: str, label: str | None, meta: dict | None = None, hashing: Hashing = PLAIN) -> dict[str, Any]:
    digest, probed = hashing.probed(path, "audio_file", lambda: hashing.file(path))
    if probed is not None:
        probed["num_frames"] = None
    else:
        info = probe_audio(path)
        digest = digest or hashing.file(path)
        probed = dict(num_frames=None, duration_s=info.duration_s, sample_rate=info.sample_rate,
                      channels=info.channels, format=info.format)
    return _entry(
        media="audio", kind="audio_file", source=source, name=path.name, path=str(path), label=label,
        content_hash=digest, meta=meta, **probed,
    )


def _label_from_name(name: str) -> str:
    return " ".join(Path(name).stem.replace("_", " ").replace("-", " ").split())


def scan_davis(root: str | Path, split: str | None = None, sequences: Iterable[str] | None = None, progress: Progress = None,
               hashing: Hashing = PLAIN) -> Catalog:
    root = Path(root)
    cat = Catalog()
    frames_root = root / "JPEGImages" / "480p"
    if not frames_root.is_dir():
        cat.issues.append(CatalogIssue(str(root), str(frames_root), "not a DAVIS folder: JPEGImages/480p is missing"))
        return cat
    splits: dict[str, str] = {}
    for s in ("train", "val"):
        f = root / "ImageSets" / "2017" / f"{s}.txt"
        if f.is_file():
            for line in f.read_text(errors="replace").splitlines():
                if line.strip():
                    splits[line.strip()] = s
    wanted = set(sequences) if sequences is not None else None
    for seq in sorted(p for p in frames_root.iterdir() if p.is_dir()):
        if not _name_ok(seq, cat):
            continue
        if wanted is not None and seq.name not in wanted:
            continue
        if split is not None and splits.get(seq.name) != split:
            continue
        if progress:
            progress(seq.name)
        ann = root / "Annotations" / "480p" / seq.name
        ann = ann if ann.is_dir() else None
        try:
            e = _video_entry(seq, "davis", _label_from_name(seq.name), annotations=ann, split=splits.get(seq.name),
                             hashing=hashing)
        except MediaError as err:
            cat.issues.append(CatalogIssue(seq.name, err.path, _problem(seq, err)))
            continue
        except OSError as err:
            cat.issues.append(CatalogIssue(seq.name, str(seq), f"cannot be read ({err})"))
            continue
        if ann is not None:
            n_ann = len(frame_files(ann))
            if n_ann != e["num_frames"]:
                cat.issues.append(CatalogIssue(seq.name, str(ann), f"has {n_ann} annotation masks for {e['num_frames']} frames", "warning"))
        cat.entries.append(e)
    if wanted is not None:
        for missing in sorted(wanted - {e["name"] for e in cat.entries} - {i.item for i in cat.issues}):
            cat.issues.append(CatalogIssue(missing, str(frames_root / missing), "sequence listed in the config is not in the dataset"))
    return cat


def scan_esc50(root: str | Path, progress: Progress = None, hashing: Hashing = PLAIN) -> Catalog:
    root = Path(root)
    cat = Catalog()
    meta, audio_dir = root / "meta" / "esc50.csv", root / "audio"
    if not meta.is_file() or not audio_dir.is_dir():
        cat.issues.append(CatalogIssue(str(root), str(meta), "not an ESC-50 folder: meta/esc50.csv or audio/ is missing"))
        return cat
    with open(meta, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        missing_cols = [c for c in ESC50_COLUMNS if c not in (reader.fieldnames or [])]
        if missing_cols:
            cat.issues.append(CatalogIssue(str(meta), str(meta), f"lacks column(s) {', '.join(missing_cols)}"))
            return cat
        rows = list(reader)
    listed = set()
    for lineno, row in enumerate(rows, start=2):
        fname = (row.get("filename") or "").strip()
        item = fname or f"esc50.csv line {lineno}"
        if not fname or Path(fname).name != fname or fname in (".", ".."):
            cat.issues.append(CatalogIssue(item, str(meta), f"line {lineno}: filename {fname!r} is not a plain file name"))
            continue
        listed.add(fname)
        path = audio_dir / fname
        if not path.is_file():
            cat.issues.append(CatalogIssue(fname, str(path), f"listed in meta/esc50.csv (line {lineno}) but the file is missing"))
            continue
        if progress:
            progress(fname)
        category = (row.get("category") or "").strip()
        meta_fields = {
            "fold": _int_or_none(row.get("fold")),
            "target": _int_or_none(row.get("target")),
            "esc10": (row.get("esc10") or "").strip().lower() == "true",
            "src_file": row.get("src_file"),
            "take": row.get("take"),
        }
        try:
            cat.entries.append(_audio_entry(path, "esc50", category.replace("_", " ") or None, meta_fields, hashing))
        except MediaError as err:
            cat.issues.append(CatalogIssue(fname, err.path, err.problem))
    for p in sorted(audio_dir.iterdir()):
        if p.is_file() and p.name not in listed and is_valid_utf8_name(p.name) and p.suffix.lower() in AUDIO_EXTENSIONS:
            cat.issues.append(CatalogIssue(p.name, str(p), "is not listed in meta/esc50.csv; left out", "warning"))
    return cat


def _int_or_none(v: Any) -> int | None:
    try:
        return int(str(v).strip())
    except (TypeError, ValueError):
        return None


def scan_folder(root: str | Path, media: str, progress: Progress = None, hashing: Hashing = PLAIN) -> Catalog:
    """Plain folder: video files and frame folders (media='video'), or audio files (media='audio')."""
    root = Path(root)
    cat = Catalog()
    if not root.is_dir():
        cat.issues.append(CatalogIssue(str(root), str(root), "folder does not exist"))
        return cat
    for p in sorted(root.iterdir()):
        if not _name_ok(p, cat):
            continue
        try:
            if media == "video":
                if p.is_dir() and any(f.suffix.lower() in FRAME_EXTENSIONS for f in p.iterdir()):
                    if progress:
                        progress(p.name)
                    cat.entries.append(_video_entry(p, "folder", _label_from_name(p.name), hashing=hashing))
                elif p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS:
                    if progress:
                        progress(p.name)
                    cat.entries.append(_video_entry(p, "folder", _label_from_name(p.name), hashing=hashing))
            elif media == "audio":
                if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS:
                    if progress:
                        progress(p.name)
                    cat.entries.append(_audio_entry(p, "folder", _label_from_name(p.name), hashing=hashing))
            else:
                raise ValueError(f"media must be 'video' or 'audio', not {media!r}")
        except MediaError as err:
            cat.issues.append(CatalogIssue(p.name, err.path, _problem(p, err)))
        except OSError as err:
            cat.issues.append(CatalogIssue(p.name, str(p), f"cannot be read ({err})"))
    return cat


def assign_ids(cat: Catalog) -> Catalog:
    """Give every entry a safe id, unique within its media type; renames become warnings."""
    for media in ("video", "audio"):
        entries = [e for e in cat.entries if e["media"] == media]
        raw = [Path(e["name"]).stem if e["kind"] != "frames" else e["name"] for e in entries]
        ids, _ = unique_ids(raw)
        for e, i, r in zip(entries, ids, raw):
            e["id"] = i
            if i != r:
                cat.issues.append(CatalogIssue(e["name"], e["path"], f"catalogued with id {i!r}", "warning"))
    return cat


def scan_source(kind: str, root: str | Path, media: str, split: str | None = None, include: Iterable[str] | None = None,
                progress: Progress = None, hashing: Hashing = PLAIN) -> Catalog:
    if kind == "davis":
        return scan_davis(root, split=split, sequences=include, progress=progress, hashing=hashing)
    if kind == "esc50":
        return scan_esc50(root, progress=progress, hashing=hashing)
    if kind == "folder":
        return scan_folder(root, media, progress=progress, hashing=hashing)
    raise ValueError(f"unknown catalog source kind {kind!r} (expected davis, esc50 or folder)")


def build_catalog(sources: Iterable[dict[str, Any]], progress: Progress = None, hashes=None,
                  previous: Catalog | None = None) -> Catalog:
    """sources: dicts with kind, root, media and optional split/include.

    hashes: a `storage.state.HashState` to take content hashes from (default: read every
    file); previous: an earlier catalog whose probed facts are reused for unchanged items.
    """
    hashing = Hashing(hashes, previous)
    cat = Catalog()
    for s in sources:
        cat.extend(scan_source(s["kind"], s["root"], s["media"], s.get("split"), s.get("include"), progress, hashing))
    return assign_ids(cat)


def write_catalog(cat: Catalog, path: str | Path) -> Path:
    """Parquet of entries, plus a JSON of issues beside it; both written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(cat.table(), tmp)
    with atomic_path(path.with_suffix(".issues.json")) as tmp:
        tmp.write_text(json.dumps([asdict(i) for i in cat.issues], indent=1))
    return path


def read_catalog(path: str | Path) -> Catalog:
    path = Path(path)
    table = pq.read_table(path, schema=CATALOG_SCHEMA)
    issues_path = path.with_suffix(".issues.json")
    issues = [CatalogIssue(**d) for d in json.loads(issues_path.read_text())] if issues_path.exists() else []
    return Catalog(entries=table.to_pylist(), issues=issues)


# -- the stage: config in, catalog Parquet + ledger row out -------------------
CATALOG_CODE_VERSION = "1"


def catalog_sources(cfg) -> list[dict[str, Any]]:
    out = []
    for media, sources in (("video", cfg.catalogs.videos), ("audio", cfg.catalogs.audio)):
        for s in sources:
            out.append({"kind": s.kind, "root": s.root, "media": media, "split": s.split, "include": s.include})
    return out


def previous_catalog(cfg) -> Catalog | None:
    """The catalog the last run wrote, or None (absent or unreadable: everything is probed again)."""
    try:
        return read_catalog(cfg.catalog_path) if cfg.catalog_path.exists() else None
    except Exception:
        return None


def scan_catalog(cfg, progress: Progress = None, previous: Catalog | None = None) -> Catalog:
    """The configured sources scanned now, hashing through the workdir's state (saved after the scan)."""
    from storage.state import open_state

    state = open_state(cfg.workdir)
    cat = build_catalog(catalog_sources(cfg), progress=progress, hashes=state,
                        previous=previous if previous is not None else previous_catalog(cfg))
    state.save()
    return cat


def catalog_key(cfg, cat: Catalog) -> StageKey:
    return StageKey.build(
        "catalog", CATALOG_CODE_VERSION, {"sources": catalog_sources(cfg)},
        inputs={f"{e['media']}/{e['id']}": e["content_hash"] for e in cat.entries},
    )


def same_catalog(a: Catalog, b: Catalog | None) -> bool:
    """Whether writing `a` would change nothing on disk where `b` is (entries and issues)."""
    return b is not None and a.table().equals(b.table()) and a.issues == b.issues


def update_catalog(cfg, progress: Progress = None) -> Catalog:
    """Scan the configured sources, write the catalog, record it in the ledger."""
    from storage.ledger import Ledger

    started = time.time()
    old = previous_catalog(cfg)
    cat = scan_catalog(cfg, progress=progress, previous=old)
    path = cfg.catalog_path if same_catalog(cat, old) else write_catalog(cat, cfg.catalog_path)
    key = catalog_key(cfg, cat)
    ledger = Ledger(cfg.ledger_url, cfg.storage.storage_options)
    previous = ledger.latest("catalog").get("catalog")
    if previous is not None and previous["key"] == key.key:
        return cat  # unchanged: nothing new to record
    ledger.append(
        [dict(stage="catalog", item_id="catalog", key=key.key, code_version=key.code_version,
              params_hash=key.params_hash, inputs_hash=key.inputs_hash, uri=str(path), started_at=started)]
    )
    return cat


@task(name="catalog")
def catalog_task(cfg) -> dict[str, Any]:
    """Prefect task: build the catalog and return a small summary (never the data)."""
    from prefect import get_run_logger

    logger = get_run_logger()
    cat = update_catalog(cfg)
    for issue in cat.issues:
        (logger.warning if issue.severity == "warning" else logger.error)(str(issue))
    return catalog_summary(cfg, cat)


def catalog_summary(cfg, cat: Catalog) -> dict[str, Any]:
    return {
        "path": str(cfg.catalog_path),
        "videos": sum(e["media"] == "video" for e in cat.entries),
        "audio": sum(e["media"] == "audio" for e in cat.entries),
        "errors": len(cat.errors),
    }
