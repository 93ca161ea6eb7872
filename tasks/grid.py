"""Grid selection: which (video, clip) pairs a run edits, and which source clip fine-tunes a video.

Plain functions over the catalog. Unknown ids are errors that name them, so a
typo in a subset never silently shrinks a grid.
"""
from __future__ import annotations

from collections import defaultdict

from tasks.catalog import Catalog
from tasks.config import Config, ConfigError, GridSelection


def _ids(catalog: Catalog, media: str) -> list[str]:
    return [e["id"] for e in catalog.entries if e["media"] == media]


def _known(ids: list[str], catalog_ids: list[str], what: str) -> list[str]:
    known = set(catalog_ids)
    missing = [i for i in ids if i not in known]
    if missing:
        raise ConfigError(f"grid: {what} not in the catalog: {', '.join(missing)}")
    return ids


def _videos(sel: GridSelection, catalog: Catalog) -> list[str]:
    videos = _ids(catalog, "video")
    return videos if sel.videos == "all" else _known(list(sel.videos), videos, "video(s)")


def _clips(sel: GridSelection, catalog: Catalog) -> list[str]:
    clips = [e for e in catalog.entries if e["media"] == "audio"]
    if sel.audio != "all":
        wanted = set(_known(list(sel.audio), [e["id"] for e in clips], "clip(s)"))
        clips = [e for e in clips if e["id"] in wanted]
    if sel.per_class is not None:
        by_label: dict[str | None, list[str]] = defaultdict(list)
        for e in sorted(clips, key=lambda e: e["id"]):
            by_label[e["label"]].append(e["id"])
        keep = {i for ids in by_label.values() for i in ids[: sel.per_class]}
        clips = [e for e in clips if e["id"] in keep]
    return [e["id"] for e in clips]


def select_pairs(cfg: Config, catalog: Catalog) -> list[tuple[str, str]]:
    """The (video_id, audio_id) pairs of the active selection, in catalog order."""
    sel = cfg.grid.active()
    if sel.pairs is not None:
        _known(sorted({v for v, _ in sel.pairs}), _ids(catalog, "video"), "video(s)")
        _known(sorted({a for _, a in sel.pairs}), _ids(catalog, "audio"), "clip(s)")
        return list(dict.fromkeys((v, a) for v, a in sel.pairs))
    clips = _clips(sel, catalog)
    return [(v, a) for v in _videos(sel, catalog) for a in clips]


def source_audio(cfg: Config, catalog: Catalog, video_id: str) -> str:
    """The clip a video is fine-tuned with: the mapping, else the default, else the first clip.

    Called per edit when planning metrics: the first clip is found without listing every clip."""
    chosen = cfg.grid.source_audio.get(video_id) or cfg.grid.default_source_audio
    if chosen is None:
        first = next((e["id"] for e in catalog.entries if e["media"] == "audio"), None)
        if first is None:
            raise ConfigError("grid: no audio clips in the catalog to fine-tune with")
        return first
    _known([chosen], _ids(catalog, "audio"), f"source audio for video {video_id!r}")
    return chosen


def selected_videos(cfg: Config, catalog: Catalog) -> list[str]:
    sel = cfg.grid.active()
    if sel.pairs is not None:
        return list(dict.fromkeys(v for v, _ in select_pairs(cfg, catalog)))
    return _videos(sel, catalog)


def selected_clips(cfg: Config, catalog: Catalog) -> set[str]:
    """Clips the selection needs features for: its edit clips and its videos' source clips."""
    sel = cfg.grid.active()
    needed = {a for _, a in sel.pairs} if sel.pairs is not None else set(_clips(sel, catalog))
    if _ids(catalog, "audio"):
        needed |= {source_audio(cfg, catalog, v) for v in selected_videos(cfg, catalog)}
    return needed
