"""A static HTML report of a grid: one folder that opens from disk (relative links only).

Layout of the folder (default <workdir>/report, config `report.dir`):

    index.html           the page
    manifest.json        what the page must show (images, videos, tables): the browser check reads it
    img/{video}/source.png, img/{video}/{audio}.{variant}.png   frame strips, one row of the contact sheet each
    img/{video}/{audio}.{variant}.ma.png                        the edit's M_a under its strip (same pixel width)
    media/{variant}/{video}/{audio}.mp4                         the edits' MP4s (hard links, else copies)
    tables/metrics.parquet, tables/by_variant.parquet           the tables shown

Per video, a contact sheet on one time axis, the longest edit span of the video
(N_max frames): each strip shows `report.strip_frames` evenly spaced frames (thumbnail
i is the frame at the middle of the i-th of equal time slots; slots past a shorter
edit's span stay blank). The source frames, then one row per edit labelled with the
clip, its class, the variant, its span and its scores; under each edit row the M_a
that drove it (stored with the edit), one bar per frame at that frame's time, so a
bar sits under the thumbnail of its time slot. Then the MP4s in <video> tags, and
at the top the tables: one row per method variant (the paper's Tables 1-2) and one
row per edit.

The folder is built beside the target under a temporary name and swapped in, so
an interrupted run never leaves half a report in place of the last good one.
"""
from __future__ import annotations

import html
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from storage.files import temp_name
from tasks.metrics import (
    METRIC_LABELS,
    aggregate_by_variant,
    as_uint8_frames,
    collect,
    metrics_dir,
    read_table,
    variant_rank,
    write_metrics_tables,
)
from tasks.stage_task import open_store_and_ledger

TABLE_IDS = ("table-by-variant", "table-per-edit")
# Decimal places per metric, as the paper prints them (Sem-A and SSIM 4, Temp-S 2).
_DECIMALS = {"sem_a": 4, "masked_ssim": 4, "temp_s": 2, "clip_t": 2, "clip_f": 4, "ma_corr": 2}
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}
td.l,th.l{text-align:left}
table.sheet td,table.sheet th{border:none;padding:2px 6px;vertical-align:top}
table.sheet th{background:none;text-align:left;font-weight:normal;min-width:12em;max-width:20em}
table.sheet img{display:block;image-rendering:pixelated}
.cls{font-weight:bold}.dim{color:#777;font-size:12px}
figure{display:inline-block;margin:0 1em 1em 0}figcaption{font-size:12px}
.warn{color:#a00}
"""


def report_dir(cfg) -> Path:
    return Path(cfg.report.dir) if cfg.report.dir is not None else Path(cfg.workdir) / "report"


def _fmt(value: Any, metric: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{float(value):.{_DECIMALS.get(metric, 4)}f}"


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text))


def _url(rel: str) -> str:
    return quote(rel, safe="/")


# ----------------------------------------------------------------------------- images


def strip_indices(total: int, slots: int) -> list[int]:
    """Frame shown in each of `slots` equal time slots of a `total`-frame axis: the one at the slot's middle."""
    k = max(1, min(int(slots), int(total)))
    return [min(total - 1, int((i + 0.5) * total / k)) for i in range(k)]


def _thumbs(frames: np.ndarray, side: int, total: int | None = None, slots: int | None = None) -> np.ndarray:
    """(F, H, W, 3) uint8 -> one strip (side, K * w, 3), each frame scaled to height `side`.

    With `total` and `slots`: K evenly spaced frames on a `total`-frame time axis (strip_indices);
    slots past the last frame (a span shorter than the axis) are left light grey. Without: every frame.
    """
    from PIL import Image

    n = len(frames)
    picks = list(range(n)) if total is None else strip_indices(total, slots or total)
    h0, w0 = frames.shape[1:3]
    w = max(1, round(w0 * side / h0))
    out = []
    for i in picks:
        if i < n:
            out.append(np.asarray(Image.fromarray(frames[i]).resize((w, side), Image.Resampling.BICUBIC)))
        else:
            out.append(np.full((side, w, 3), 235, np.uint8))
    return np.concatenate(out, axis=1)


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, optimize=True)


def magnitude_png(magnitude: np.ndarray, width_px: int, path: Path, height_px: int = 56,
                  total: int | None = None, fps: float | None = None) -> None:
    """M_a as one bar per frame over exactly `width_px` pixels, on a time axis of `total` frames (default:
    its own length): bar k sits at frame k's time, (k + 0.5) / total of the width, under the thumbnail
    of the time slot that holds it (see `_thumbs`)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display, whatever the caller's backend
    import matplotlib.pyplot as plt

    m = np.asarray(magnitude, np.float64).ravel()
    n = len(m)
    axis = max(int(total or n), n, 1)
    dpi = 100
    fig = plt.figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))  # the axes fill the figure, so data x = k + 0.5 is pixel (k + 0.5) * width / axis
    ax.bar(np.arange(n) + 0.5, m, width=0.8 if axis <= 64 else 1.0, color="#d9822b")
    ax.axhline(1.0, color="#555", lw=0.6, ls=":")  # M_a has mean 1: the dotted line is the average loudness
    top = max(float(np.nanmax(m)) if n else 1.0, 1.0) * 1.15
    ax.set_xlim(0, axis)
    ax.set_ylim(0, top)
    ax.set_axis_off()
    label = f"M_a (max {np.nanmax(m):.2f})" if n else "M_a"
    if fps:
        label += f" · {n} frames, {n / fps:.2f} s"
    ax.text(0.005, 0.95, label, transform=ax.transAxes, va="top", fontsize=7, color="#333")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ----------------------------------------------------------------------------- media


def _place_media(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)  # no copy of large files; the report keeps this version even if src is rewritten
            return
        except OSError:
            pass  # another filesystem, or links not allowed: copy
    shutil.copy2(src, dst)


# ----------------------------------------------------------------------------- HTML


def _variant_table(table_rows: Sequence[Mapping[str, Any]]) -> str:
    metrics = ("sem_a", "masked_ssim", "temp_s", "clip_t", "clip_f", "ma_corr")
    head = "".join(f"<th>{_e(METRIC_LABELS[m])}</th>" for m in metrics)
    body = "".join(
        f"<tr><td class=l>{_e(r['variant_name'])}</td>" + "".join(f"<td>{_fmt(r[m], m)}</td>" for m in metrics)
        + f"<td>{r['edits']}</td></tr>"
        for r in table_rows
    )
    return (f'<table id="{TABLE_IDS[0]}"><thead><tr><th class=l>Method</th>{head}<th>edits</th></tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _edit_table(rows: Sequence[Mapping[str, Any]]) -> str:
    metrics = ("sem_a", "masked_ssim", "temp_s", "clip_t", "clip_f", "ma_corr")
    head = "".join(f"<th>{_e(METRIC_LABELS[m])}</th>" for m in metrics)
    body = "".join(
        f"<tr><td class=l>{_e(r['video_id'])}</td><td class=l>{_e(r['audio_id'])}</td>"
        f"<td class=l>{_e(r['target_label'])}</td><td class=l>{_e(r['source_label'])}</td>"
        f"<td class=l>{_e(r['variant_name'])}</td>" + "".join(f"<td>{_fmt(r[m], m)}</td>" for m in metrics) + "</tr>"
        for r in rows
    )
    return (f'<table id="{TABLE_IDS[1]}"><thead><tr><th class=l>video</th><th class=l>clip</th><th class=l>class</th>'
            f"<th class=l>source class</th><th class=l>method</th>{head}</tr></thead><tbody>{body}</tbody></table>")


def _scores_line(r: Mapping[str, Any]) -> str:
    parts = [f"{METRIC_LABELS[m].split()[0]} {_fmt(r.get(m), m)}" for m in ("sem_a", "masked_ssim", "temp_s")]
    return " · ".join(parts)


def write_report(cfg, rows: Sequence[Mapping[str, Any]] | None = None, out_dir: str | os.PathLike | None = None,
                 catalog=None, title: str = "AudioScenic report") -> Path:
    """Render the report folder; returns the path of its index.html.

    rows: the per-edit metrics rows (tasks.metrics.METRICS_COLUMNS). By default
    <workdir>/metrics/metrics.parquet (after an ablation: every variant); when
    that file does not exist and a catalog is given, the config's current metrics
    items are gathered (and the tables written) first. Source frames, edited
    frames and magnitudes are read from the store under the keys the rows carry.
    """
    if rows is None:
        table = metrics_dir(cfg) / "metrics.parquet"
        if not table.exists() and catalog is not None:
            collect(cfg, catalog)
        rows = read_table(table) if table.exists() else []
    rows = sorted(rows, key=lambda r: (r["video_id"], r["audio_id"], variant_rank(r["variant"] or "full")))
    final = Path(out_dir) if out_dir is not None else report_dir(cfg)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / temp_name(final.name)
    tmp.mkdir()
    try:
        _render(cfg, rows, tmp, title)
        old = None
        if final.exists():
            old = final.parent / temp_name(final.name, ".old")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "index.html"


class _Frames:
    """Frames of a stored array read one at a time, as uint8 (a strip needs only a few of them)."""

    def __init__(self, array, length: int | None = None):
        self.array, self.length = array, array.shape[0] if length is None else length
        self.shape = (self.length, *array.shape[1:])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> np.ndarray:
        return as_uint8_frames(np.asarray(self.array[i])[None])[0]


class _EditView:
    def __init__(self, frames: _Frames, magnitude, fps):
        self.frames, self.magnitude, self.fps = frames, magnitude, fps


def _edit_view(store, r: Mapping[str, Any]) -> _EditView | None:
    arr = store.open_array(r["edit_artifact"], r.get("edit_array") or "frames", r["edit_key"])
    if arr is None:
        return None
    try:
        mag = np.asarray(store.open_array(r["edit_artifact"], "magnitude", r["edit_key"])[...])
    except (KeyError, TypeError):
        mag = None
    attrs = store.attrs(r["edit_artifact"], r["edit_key"]) or {}
    return _EditView(_Frames(arr), mag, attrs.get("fps"))


def _span_text(frames: int, fps: float | None) -> str:
    return f"{frames} frames" + (f", {frames / fps:.2f} s" if fps else "")


def _render(cfg, rows: Sequence[Mapping[str, Any]], root: Path, title: str) -> None:
    store, _ = open_store_and_ledger(cfg)
    side = cfg.report.thumb
    manifest: dict[str, list[str]] = {"images": [], "videos": [], "tables": list(TABLE_IDS), "missing": []}

    tables = write_metrics_tables(cfg, rows, root / "tables")
    by_variant = aggregate_by_variant(rows).to_pylist()

    def image(rel: str, array: np.ndarray | None = None) -> str:
        if array is not None:
            _save_png(array, root / rel)
        manifest["images"].append(rel)
        return f'<img src="{_url(rel)}" alt="{_e(rel)}">'

    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"]
    parts.append(f"<p class=dim>{len(rows)} edits of {len({r['video_id'] for r in rows})} videos. "
                 f"Tables as Parquet: <a href=\"{_url('tables/' + tables['by_variant'].name)}\">per method</a>, "
                 f"<a href=\"{_url('tables/' + tables['metrics'].name)}\">per edit</a>. "
                 "Sem-A: frames closer (CLIP) to the clip's class than to the source clip's class; "
                 "SSIM: source vs edit over the foreground mask; Temp-S = CLIP-F × CLIP-T; "
                 "M_a corr: correlation over frames of the scene's change (outside the mask) with the M_a "
                 "that drove each frame (louder sound, stronger change).</p>")
    parts.append("<h2>Methods (paper Tables 1-2)</h2>" + _variant_table(by_variant))
    parts.append("<h2>Edits</h2>" + _edit_table(rows))

    by_video: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_video.setdefault(r["video_id"], []).append(r)
    slots = cfg.report.strip_frames
    for vid, vrows in by_video.items():
        first = vrows[0]
        parts.append(f"<h2 id=\"video-{_e(vid)}\">{_e(vid)} <span class=dim>{_e(first.get('video_label'))}</span></h2>")
        edits = {id(r): _edit_view(store, r) for r in vrows}
        # One time axis per video: its longest edit span (every edit starts at the same source frame).
        axis = max([len(e.frames) for e in edits.values() if e] or [int(first.get("num_frames") or 1)])
        fps = next((e.fps for e in edits.values() if e and e.fps), None)
        source = store.open_array(first["frames_artifact"], "frames", first["frames_key"])
        sheet = ["<table class=sheet>"]
        if source is None:
            manifest["missing"].append(f"source frames of {vid}")
            sheet.append("<tr><th>source</th><td class=warn>source frames not in the store</td></tr>")
        else:
            src = _thumbs(_Frames(source, min(axis, source.shape[0])), side, axis, slots)
            span_text = _span_text(axis, fps)
            sheet.append(f"<tr><th>source<br><span class=dim>{_e(first.get('video_label'))} · {_e(span_text)}"
                         f"</span></th><td>{image(f'img/{vid}/source.png', src)}</td></tr>")
        videos = []
        for r in vrows:
            aid, variant = r["audio_id"], r["variant"] or "full"
            got = edits[id(r)]
            n_text = f" · {_span_text(len(got.frames), got.fps)}" if got else ""
            label = (f"<span class=cls>{_e(r['target_label'])}</span><br>{_e(aid)} · {_e(r['variant_name'])}"
                     f"{_e(n_text)}<br><span class=dim>{_e(_scores_line(r))}</span>")
            cells = []
            if got is None:
                manifest["missing"].append(f"edit frames {r['edit_artifact']}")
                cells.append("<span class=warn>edited frames not in the store</span>")
            else:
                strip = _thumbs(got.frames, side, axis, slots)
                cells.append(image(f"img/{vid}/{aid}.{variant}.png", strip))
                mag, efps = got.magnitude, got.fps
                if mag is None:
                    manifest["missing"].append(f"magnitude of {vid}/{aid}/{variant}")
                    cells.append("<span class=warn>magnitude not in the store</span>")
                else:
                    rel = f"img/{vid}/{aid}.{variant}.ma.png"
                    magnitude_png(mag, strip.shape[1], root / rel, total=axis, fps=efps)
                    cells.append(image(rel))
            sheet.append(f"<tr><th>{label}</th><td>{''.join(cells)}</td></tr>")
            mp4 = Path(r["mp4"]) if r.get("mp4") else None
            caption = f"{_e(aid)} · {_e(r['target_label'])} · {_e(r['variant_name'])}"
            if mp4 is not None and mp4.is_file():
                rel = f"media/{variant}/{vid}/{aid}.mp4"
                _place_media(mp4, root / rel, cfg.report.link_media)
                manifest["videos"].append(rel)
                videos.append(f'<figure><video controls preload="metadata" width="{side * 3}" src="{_url(rel)}">'
                              f"</video><figcaption>{caption}</figcaption></figure>")
            else:
                manifest["missing"].append(f"MP4 of {vid}/{aid}/{variant}")
                videos.append(f"<figure><p class=warn>MP4 missing: {_e(mp4)}</p>"
                              f"<figcaption>{caption}</figcaption></figure>")
        sheet.append("</table>")
        parts.append("".join(sheet))
        parts.append("<div>" + "".join(videos) + "</div>")
    if not rows:
        parts.append("<p>No evaluated edits yet: run the edit and metrics stages first.</p>")
    parts.append("</body></html>")
    (root / "index.html").write_text("\n".join(parts), encoding="utf-8")
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
