#!/usr/bin/env python3
"""A contact sheet of one video's edits: its source frames in the first row, then one row per edit.

    .venv/bin/python scripts/contact_sheet.py work/demo/demo.yaml --video ball --out docs/toy_contact_sheet.png

Reads what a run left (the metrics table <workdir>/metrics/metrics.parquet and the store), so run the
demo (or any config) first. By default the rows are the video's edits by the full method with the first
two clips whose class differs from the video's source clip's; --clips picks them. Each row is labelled
with the clip's class and its scores (Sem-A, masked SSIM, M_a corr); frames are taken evenly over the
edit's span.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LABEL_W = 150  # pixels left of each row for its label


def _pick(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))


def sheet_rows(cfg, video: str, clips: list[str] | None, variant: str, frames: int):
    """[(label, uint8 frames (k, H, W, 3))]: the source row first, then one row per edit."""
    from tasks.metrics import metrics_dir, read_table
    from tasks.stage_task import open_store_and_ledger

    table = metrics_dir(cfg) / "metrics.parquet"
    if not table.exists():
        raise SystemExit(f"error: {table} does not exist; run the pipeline for this config first")
    rows = [r for r in read_table(table) if r["video_id"] == video and r["variant"] == variant]
    if not rows:
        raise SystemExit(f"error: no edits of video {video!r} by variant {variant!r} in {table}")
    if clips:
        by_clip = {r["audio_id"]: r for r in rows}
        missing = [c for c in clips if c not in by_clip]
        if missing:
            raise SystemExit(f"error: no edit of {video!r} with {missing} in {table}; have {sorted(by_clip)}")
        rows = [by_clip[c] for c in clips]
    else:
        rows = sorted((r for r in rows if r["target_label"] != r["source_label"]), key=lambda r: r["audio_id"])[:2]
        if not rows:
            raise SystemExit(f"error: every edit of {video!r} has the source clip's class; pass --clips")
    store, _ = open_store_and_ledger(cfg)
    n = min(int(r["num_frames"]) for r in rows)
    idx = _pick(n, frames)
    src = store.read(rows[0]["frames_artifact"], rows[0]["frames_key"], names=["frames"])["frames"]
    out = [(f"source\n({rows[0]['source_label']})", np.asarray(src)[idx])]
    for r in rows:
        e = store.read(r["edit_artifact"], r["edit_key"], names=[r["edit_array"] or "frames"])
        f = np.asarray(e[r["edit_array"] or "frames"])
        f = f if f.dtype == np.uint8 else np.clip(np.rint(f * 255), 0, 255).astype(np.uint8)

        def fmt(x, d=2):
            return "-" if x is None else f"{x:.{d}f}"

        label = (f"{r['target_label']}\nSem-A {fmt(r['sem_a'])}\nSSIM {fmt(r['masked_ssim'])}\n"
                 f"M_a corr {fmt(r.get('ma_corr'))}")
        out.append((label, f[idx]))
    return out


def render(rows, scale: int = 2):
    from PIL import Image, ImageDraw

    h, w = rows[0][1].shape[1:3]
    h, w = h * scale, w * scale
    k = max(len(f) for _, f in rows)
    img = Image.new("RGB", (LABEL_W + k * (w + 2), len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(img)
    for i, (label, frames) in enumerate(rows):
        y = i * (h + 2)
        draw.multiline_text((4, y + 4), label, fill="black", spacing=2)
        for j, f in enumerate(frames):
            img.paste(Image.fromarray(f).resize((w, h), Image.NEAREST), (LABEL_W + j * (w + 2), y))
    return img


def main(argv=None) -> int:
    from tasks.config import ConfigError, load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", type=Path, help="the run's config (e.g. work/demo/demo.yaml)")
    ap.add_argument("--video", required=True)
    ap.add_argument("--clips", nargs="+", help="clip ids, one row each (default: two of another class)")
    ap.add_argument("--variant", default="full")
    ap.add_argument("--frames", type=int, default=8, help="frames per row, evenly over the span")
    ap.add_argument("--scale", type=int, default=2, help="pixel magnification")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    img = render(sheet_rows(cfg, args.video, args.clips, args.variant, args.frames), args.scale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.png")
    img.save(tmp)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({img.width}x{img.height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
