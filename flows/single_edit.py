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
import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.files import NAME_MAX, atomic_path, bounded_name, temp_name
from tasks.config import (
    QUICK_STAGES,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_yaml,
    load_config,
)


@dataclass(frozen=True)
class SingleEdit:
    config_path: Path  # the one-pair config written into the workdir
    video_id: str
    audio_id: str
    source_id: str
    variant: str


def check_output(given: str | os.PathLike) -> Path:
    """The MP4 path the edit will write, checked before any work: not a folder, names the filesystem
    takes, and a writable folder to write it in. Missing folders are fine (the delivery creates them,
    as `mkdir -p`): they are checked against the nearest folder that exists. Errors are one-line
    ConfigErrors naming the path."""
    out = Path(given).expanduser().absolute()
    base = out.parent
    try:
        while not _exists(base):
            base = base.parent
        not_folder = not base.is_dir()
    except OSError as e:
        raise ConfigError(f"-o {out}: cannot be checked ({e.strerror or e})") from None
    if not_folder:
        raise ConfigError(f"-o {out}: {base} is not a folder")
    try:
        limit = os.pathconf(base, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = NAME_MAX
    for name in out.relative_to(base).parts:  # before any stat of `out`, which would fail on a long name
        if len(os.fsencode(name)) > limit:
            raise ConfigError(f"-o {out}: the name {name[:24]}... is {len(os.fsencode(name))} bytes; "
                              f"the filesystem of {base} takes at most {limit}")
    if base == out.parent and out.is_dir():
        raise ConfigError(f"-o {out}: is a folder; give the path of the MP4 to write")
    if not os.access(base, os.W_OK | os.X_OK) or not _can_create_in(base):
        raise ConfigError(f"-o {out}: folder {base} is not writable")
    return out


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return False  # cannot exist; the name check reports it
        raise


def _can_create_in(folder: Path) -> bool:
    """Create and remove a temporary file there: permission bits do not bind root, a read-only mount does."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".audioscenic-", suffix=".probe")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _resolve_input(given: str, media: str, cfg) -> Path:
    """A path, or (with a config) an id from that config's catalog."""
    p = Path(given).expanduser()
    try:
        exists = p.exists()
        if exists and not (p.is_file() or p.is_dir()):  # a device or a pipe: never linked (a copy would not end)
            raise ConfigError(f"--{media} {given!r}: not a regular file or folder")
    except OSError as e:  # e.g. a name over the file-name limit
        raise ConfigError(f"--{media} {given!r}: cannot be read ({e.strerror or e})") from None
    if exists:
        return p.resolve()
    if cfg is not None and cfg.catalog_path.exists():
        from tasks.catalog import read_catalog

        entry = read_catalog(cfg.catalog_path).by_id(media).get(given)
        if entry is not None:
            return Path(entry["path"]).resolve()
    where = f" nor a {media} id in {cfg.catalog_path}" if cfg is not None else ""
    raise ConfigError(f"--{media} {given!r}: no such file or folder{where}")


def _link(src: Path, folder: Path) -> Path:
    """Put src into folder under its own name (a symlink; a copy where links are not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    if dst.is_symlink() and dst.resolve() == src:
        return dst
    tmp = folder / temp_name(src.name)  # src.name may already be near the file-name limit
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


def _remove(p: Path) -> None:
    """Drop an entry of inputs/: unlink a link (never its target), or delete a copy this module made."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


_IN_FLIGHT = re.compile(r"^\..*\.[0-9a-f]{32}\.tmp$")  # another edit's link between creation and rename


def _why_left_out(catalog, media: str, p: Path) -> list[str]:
    """Why the catalog left `p` out: its issues (a frame folder's name the frame), else what it is not."""
    from tasks.ids import is_valid_utf8_name
    from tasks.media import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS

    reasons = [i.problem for i in catalog.issues
               if i.severity == "error" and (Path(i.path) == p or p in Path(i.path).parents)]
    if reasons:
        return reasons
    if not is_valid_utf8_name(p.name):
        return ["its file name is not valid UTF-8; rename it"]
    if media == "audio" and p.is_dir():
        return ["is a folder, not an audio file"]
    if p.is_file():
        exts = AUDIO_EXTENSIONS if media == "audio" else VIDEO_EXTENSIONS
        if p.suffix.lower() not in exts:
            return [f"has no {media} file extension ({', '.join(sorted(exts))})"]
    if media == "video" and p.is_dir():
        return ["holds no .jpg/.png frames"]
    return ["not recognised"]


def _tidy_inputs(cfg, inputs: Path):
    """Catalogue inputs/ and remove every entry the catalog leaves out, so a rejected input (now, or
    linked by an earlier version) never stays to fail later edits. Returns (catalog, {path: reasons})."""
    from tasks.catalog import update_catalog

    catalog = update_catalog(cfg)
    kept = {Path(e["path"]) for e in catalog.entries}
    rejected: dict[Path, list[str]] = {}
    for media in ("video", "audio"):
        folder = inputs / media
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if p in kept or _IN_FLIGHT.match(p.name):
                continue
            rejected[p] = _why_left_out(catalog, media, p)
            _remove(p)
    if rejected:
        catalog = update_catalog(cfg)  # rewrite it without them (and without their issues)
    return catalog, rejected


def _catalog_id(catalog, rejected: dict[Path, list[str]], media: str, link: Path, src: Path) -> str:
    for e in catalog.entries:
        if e["media"] == media and Path(e["path"]) == link:
            return e["id"]
    reasons = rejected.get(link) or ["not recognised"]
    raise ConfigError(f"{src}: cannot be used as {media}: " + "; ".join(reasons))


def prepare(video: str, audio: str, config: str | None = None, workdir: str | None = None,
            source_audio: str | None = None, variant: str | None = None,
            overrides: dict[str, Any] | None = None) -> SingleEdit:
    """Link the inputs, write the one-pair config and catalogue it; errors are ConfigError."""
    if config:
        base = load_config(config, overrides, require_catalogs=False)  # the catalog is the linked inputs
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
    chosen = variant or data["stages"]["finetune"]["variants"][0]
    if chosen not in data["variants"]:
        raise ConfigError(f"--variant {chosen!r}: not one of the config's variants ({', '.join(data['variants'])})")
    inputs = work / "inputs"
    v_path = _link(v_src, inputs / "video")
    a_path = _link(a_src, inputs / "audio")
    s_path = _link(s_src, inputs / "audio")

    data.update(workdir=str(work), storage={},
                catalogs={"videos": [{"kind": "folder", "root": str(inputs / "video")}],
                          "audio": [{"kind": "folder", "root": str(inputs / "audio")}]},
                report={**data.get("report", {}), "dir": None})
    cfg = config_from_dict(data, work, "edit")
    catalog, rejected = _tidy_inputs(cfg, inputs)
    vid = _catalog_id(catalog, rejected, "video", v_path, v_src)
    aid = _catalog_id(catalog, rejected, "audio", a_path, a_src)
    sid = _catalog_id(catalog, rejected, "audio", s_path, s_src)
    data["grid"] = {"selection": "one", "subsets": {"one": {"pairs": [[vid, aid]]}}, "source_audio": {vid: sid}}
    data["stages"] = {**data.get("stages", {}),
                      "finetune": {**data.get("stages", {}).get("finetune", {}), "variants": [chosen]}}
    config_from_dict(data, work, "edit")  # validate before writing
    path = work / bounded_name(f"edit-{vid}-{aid}-{chosen}", ".yaml")  # ids can be long: hash-shortened then
    with atomic_path(path) as tmp:
        tmp.write_text(dump_yaml(data))
    return SingleEdit(path, vid, aid, sid, chosen)


def deliver(mp4: Path, out: Path) -> Path:
    """Copy the edit's MP4 to the user's path, atomically (never a half-copied file under `out`)."""
    out = Path(out).expanduser().resolve()
    with atomic_path(out) as tmp:
        shutil.copyfile(mp4, tmp)
    return out
