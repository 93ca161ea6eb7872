"""One edit from the command line: `audioscenic edit --video V --audio A -o OUT.mp4`.

The edit runs as a one-pair grid in its own workdir (by default `<config workdir>/single`,
or `work/single` without a config), so it never rewrites a grid's catalog, yet reruns
and further clips for the same video reuse its cached stages (frames, masks, depth,
fine-tuning, inversion). The inputs are linked into `<workdir>/inputs/{video,audio}/`,
the folder catalog the one-pair config reads; models, stage settings and variants come
from the given config (or the tiny demo settings without one).
"""
from __future__ import annotations

import copy
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from storage.files import atomic_path
from tasks.config import (
    QUICK_STAGES,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
)


@dataclass(frozen=True)
class SingleEdit:
    config_path: Path  # the one-pair config written into the workdir
    video_id: str
    audio_id: str
    source_id: str
    variant: str


def _resolve_input(given: str, media: str, cfg) -> Path:
    """A path, or (with a config) an id from that config's catalog."""
    p = Path(given).expanduser()
    if p.exists():
        return p.resolve()
    if cfg is not None and cfg.catalog_path.exists():
        from tasks.catalog import read_catalog

        entry = read_catalog(cfg.catalog_path).by_id(media).get(given)
        if entry is not None:
            return Path(entry["path"]).resolve()
    where = f" nor a {media} id in {cfg.catalog_path}" if cfg is not None else ""
    raise ConfigError(f"--{'video' if media == 'video' else 'audio'} {given!r}: no such file or folder{where}")


def _link(src: Path, folder: Path) -> Path:
    """Put src into folder under its own name (a symlink; a copy where links are not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    if dst.is_symlink() and dst.resolve() == src:
        return dst
    tmp = folder / f".{src.name}.{uuid.uuid4().hex}.tmp"
    try:
        os.symlink(src, tmp, target_is_directory=src.is_dir())
    except OSError:
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copy2(src, tmp)
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst


def _catalog_id(cfg, media: str, path: Path) -> str:
    from tasks.catalog import update_catalog

    catalog = update_catalog(cfg)
    for e in catalog.entries:
        if e["media"] == media and Path(e["path"]) == path:
            return e["id"]
    problems = [f"{i.problem}" for i in catalog.issues if Path(i.path).name == path.name]
    raise ConfigError(f"{path.resolve()}: cannot be used as {media}: " + ("; ".join(problems) or "not recognised"))


def prepare(video: str, audio: str, config: str | None = None, workdir: str | None = None,
            source_audio: str | None = None, variant: str | None = None,
            overrides: dict[str, Any] | None = None) -> SingleEdit:
    """Link the inputs, write the one-pair config and catalogue it; errors are ConfigError."""
    if config:
        base = load_config(config, overrides)
        work = Path(workdir).resolve() if workdir else (base.workdir / "single").resolve()
        data: dict[str, Any] = base.model_dump(mode="json")
    else:
        base = None
        work = Path(workdir or "work/single").resolve()
        defaults = {"models": {"preset": "tiny"}, "stages": copy.deepcopy(QUICK_STAGES)}
        data = config_from_dict(apply_overrides(defaults, overrides), work, "--set").model_dump(mode="json")
    v_src = _resolve_input(video, "video", base)
    a_src = _resolve_input(audio, "audio", base)
    s_src = _resolve_input(source_audio, "audio", base) if source_audio else a_src
    inputs = work / "inputs"
    v_path = _link(v_src, inputs / "video")
    a_path = _link(a_src, inputs / "audio")
    s_path = _link(s_src, inputs / "audio")

    data.update(workdir=str(work), storage={},
                catalogs={"videos": [{"kind": "folder", "root": str(inputs / "video")}],
                          "audio": [{"kind": "folder", "root": str(inputs / "audio")}]},
                report={**data.get("report", {}), "dir": None})
    cfg = config_from_dict(data, work, "edit")
    vid = _catalog_id(cfg, "video", v_path)
    aid = _catalog_id(cfg, "audio", a_path)
    sid = _catalog_id(cfg, "audio", s_path)
    chosen = variant or cfg.stages.finetune.variants[0]
    if chosen not in cfg.variants:
        raise ConfigError(f"--variant {chosen!r}: not one of the config's variants ({', '.join(cfg.variants)})")
    data["grid"] = {"selection": "one", "subsets": {"one": {"pairs": [[vid, aid]]}}, "source_audio": {vid: sid}}
    data["stages"] = {**data.get("stages", {}),
                      "finetune": {**data.get("stages", {}).get("finetune", {}), "variants": [chosen]}}
    config_from_dict(data, work, "edit")  # validate before writing
    path = work / f"edit-{vid}-{aid}-{chosen}.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    return SingleEdit(path, vid, aid, sid, chosen)


def deliver(mp4: Path, out: Path) -> Path:
    """Copy the edit's MP4 to the user's path, atomically (never a half-copied file under `out`)."""
    out = Path(out).expanduser().resolve()
    with atomic_path(out) as tmp:
        shutil.copyfile(mp4, tmp)
    return out
