"""What the four video stages share (tasks.frames, tasks.masks, tasks.depth, tasks.latents).

Storage layout (DESIGN 3): each stage writes its own artifact group, so each has its
own commit and key, and one array named like the group:

    video/{id}/frames   array "frames"   uint8   (F, R, R, 3)
    video/{id}/masks    array "masks"    bool    (F, R, R)        1 = foreground
    video/{id}/depth    array "depth"    float16 (F, R, R)        [0, 1], 1 = nearest (or float32)
    video/{id}/latents  array "latents"  float32 (F, 4, R/8, R/8) VAE mean x scaling_factor

R = stages.video.resolution. A single `video/{id}` group for all four would not work:
writing one artifact resets the whole group (the commit protocol), and the stages
have different keys.

Frame geometry: the largest centred square of the source frame is resampled to R x R
(PIL's resize with a source box: the same as resizing the shorter side to R and
centre-cropping, without rounding the intermediate size). Frames use bicubic
filtering, masks nearest neighbour through the *same* box, so masks stay aligned
with frames pixel for pixel.

Too few frames: num_frames frames at `stride` from `start` need
start + stride * (num_frames - 1) + 1 source frames. A shorter video is not padded or
resampled (the audio features and the edit assume exactly num_frames frames): the
item fails with a message naming the video and both counts.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models import toy as toy_models
from storage import ArtifactStore, Ledger
from storage.artifacts import ArtifactWriter
from storage.claims import Claims
from storage.hashing import file_fingerprint
from tasks.config import BUILTIN_PRESETS
from tasks.media import MediaError, frame_files
from tasks.stage import BatchResult, WorkItem, run_items

# ----------------------------------------------------------------------------- errors


class VideoItemError(ValueError):
    """A video cannot go through a stage; the message names the video and the problem."""

    def __init__(self, video_id: str, problem: str):
        self.video_id, self.problem = video_id, problem
        super().__init__(f"video '{video_id}': {problem}")


class TooFewFramesError(VideoItemError):
    pass


# ----------------------------------------------------------------------------- frame selection


def frames_needed(num_frames: int, stride: int, start: int) -> int:
    return start + stride * (num_frames - 1) + 1


def frame_indices(total: int, num_frames: int, stride: int, start: int, video_id: str, source: str = "") -> list[int]:
    """Source indices start, start+stride, ...; TooFewFramesError (with counts) when the video is short."""
    need = frames_needed(num_frames, stride, start)
    if total < need:
        where = f" ({source})" if source else ""
        raise TooFewFramesError(
            video_id,
            f"has {total} frame{'s' if total != 1 else ''}{where}; {num_frames} frames at stride {stride} "
            f"from frame {start} need {need}. Lower stages.video.num_frames/stride/start or leave the video out.",
        )
    return [start + stride * k for k in range(num_frames)]


# ----------------------------------------------------------------------------- geometry


def crop_box(height: int, width: int) -> tuple[float, float, float, float]:
    """The largest centred square, (x0, y0, x1, y1) in source pixels."""
    side = min(height, width)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return (x0, y0, x0 + side, y0 + side)


def resize_crop_frame(image, resolution: int) -> np.ndarray:
    """RGB frame (PIL image or uint8 (H, W, 3)) -> uint8 (R, R, 3), bicubic."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    im = im.convert("RGB")
    out = im.resize((resolution, resolution), Image.Resampling.BICUBIC, box=crop_box(im.height, im.width))
    return np.asarray(out, np.uint8)


def resize_crop_mask(mask, resolution: int) -> np.ndarray:
    """Mask (H, W) (bool or object ids) -> bool (R, R), nearest neighbour through the frames' box."""
    from PIL import Image

    m = np.asarray(mask)
    im = Image.fromarray((m > 0).astype(np.uint8) * 255, mode="L")
    out = im.resize((resolution, resolution), Image.Resampling.NEAREST, box=crop_box(m.shape[0], m.shape[1]))
    return np.asarray(out) > 127


# ----------------------------------------------------------------------------- reading media


def _open_rgb(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:
        raise MediaError(path, f"is not a readable image ({type(e).__name__}: {e})") from e


def read_frames(
    entry: dict[str, Any], num_frames: int, stride: int, start: int, resolution: int
) -> tuple[np.ndarray, list[int], tuple[int, int]]:
    """uint8 (F, R, R, 3) frames of a catalog video entry, their source indices and source (H, W)."""
    vid, path, kind = entry["id"], Path(entry["path"]), entry["kind"]
    if kind == "frames":
        if not path.is_dir():
            raise VideoItemError(vid, f"frame folder '{path}' is missing")
        files = frame_files(path)
        idx = frame_indices(len(files), num_frames, stride, start, vid, str(path))
        images = [_open_rgb(files[i]) for i in idx]
        size = (images[0].height, images[0].width)
        return np.stack([resize_crop_frame(im, resolution) for im in images]), idx, size
    if kind == "video_file":
        return _read_video_file(vid, path, num_frames, stride, start, resolution)
    raise VideoItemError(vid, f"unknown catalog kind {kind!r} (expected 'frames' or 'video_file')")


def _read_video_file(vid: str, path: Path, num_frames: int, stride: int, start: int, resolution: int):
    import av

    from PIL import Image

    need = frames_needed(num_frames, stride, start)
    wanted = set(range(start, need, stride))
    picked: dict[int, np.ndarray] = {}
    size = None
    decoded = 0
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise MediaError(path, "has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if decoded in wanted:
                    rgb = frame.to_ndarray(format="rgb24")
                    size = rgb.shape[:2]
                    picked[decoded] = resize_crop_frame(Image.fromarray(rgb), resolution)
                decoded += 1
                if decoded >= need:
                    break  # the rest of the file is not needed
    except MediaError:
        raise
    except FileNotFoundError as e:
        raise VideoItemError(vid, f"video file '{path}' is missing") from e
    except Exception as e:
        raise MediaError(path, f"cannot be decoded after {decoded} frames ({type(e).__name__}: {e})") from e
    idx = frame_indices(decoded, num_frames, stride, start, vid, str(path))
    return np.stack([picked[i] for i in idx]), idx, tuple(size)


def read_annotation_masks(
    vid: str,
    annotations_path: str | None,
    frames_path: str,
    indices: Sequence[int],
    object_id: int | None,
    resolution: int,
    source_size: Sequence[int] | None = None,
) -> np.ndarray:
    """bool (F, R, R) from DAVIS palette PNGs: the union of object ids (> 0), or one id.

    `source_size` (H, W) of the frames: a mask of another size would be cropped
    differently from its frame, so it is an error rather than a silent misalignment.
    """
    from PIL import Image

    if not annotations_path:
        raise VideoItemError(vid, "has no dataset annotations; set stages.video.mask_source: grounded_sam")
    ann = Path(annotations_path)
    if not ann.is_dir():
        raise VideoItemError(vid, f"annotation folder '{ann}' is missing")
    files = frame_files(ann)
    total = len(frame_files(frames_path)) if Path(frames_path).is_dir() else None
    if total is not None and len(files) != total:
        raise VideoItemError(
            vid, f"has {len(files)} annotation masks for {total} frames ({ann}); they must correspond one to one"
        )
    if len(files) <= max(indices):
        raise VideoItemError(vid, f"has {len(files)} annotation masks, frame {max(indices)} is needed ({ann})")
    out = []
    for i in indices:
        try:
            with Image.open(files[i]) as im:
                ids = np.asarray(im)  # palette PNGs read as their indices = object ids
        except Exception as e:
            raise MediaError(files[i], f"is not a readable mask image ({type(e).__name__}: {e})") from e
        if source_size is not None and tuple(ids.shape[:2]) != tuple(source_size):
            raise VideoItemError(
                vid, f"annotation {files[i].name} is {ids.shape[1]}x{ids.shape[0]}, its frame is "
                f"{source_size[1]}x{source_size[0]} ({ann})"
            )
        if ids.ndim == 3:  # an RGB(A) mask: any non-black pixel is foreground
            ids = ids[..., :3].max(axis=-1)
        m = ids == object_id if object_id is not None else ids > 0
        out.append(resize_crop_mask(m, resolution))
    return np.stack(out)


# ----------------------------------------------------------------------------- models, keys


def model_identity(cfg, name: str, subpath: str | None = None) -> dict[str, Any]:
    """What identifies a model in a cache key: the tiny preset and seed, or the weights' fingerprint.

    A missing path is part of the key rather than an error here, so planning never
    fails; the item fails at run time with the loader's message.
    """
    if cfg.models.preset in BUILTIN_PRESETS:
        if cfg.models.preset == "toy":
            # the base folder (models/toy/base: vae/ and unet/); its blank prompt is the seed-0 tiny one
            trained = {("base", "vae"): "vae", ("base", None): "unet"}.get((name, subpath), name)
            if trained in toy_models.TRAINED:
                return toy_models.identity(trained)
            if name == "controlnet":
                return {"preset": "tiny", "seed": cfg.models.seed, "latent_downsample": toy_models.vae_downsample()}
        return {"preset": "tiny", "seed": cfg.models.seed}  # toy: the parts not trained yet are tiny's
    path = getattr(cfg.models.paths, name)
    if path is None:
        return {"path": None, "missing": True}
    p = Path(path) / subpath if subpath else Path(path)
    if not p.exists():
        return {"path": str(p), "missing": True}
    return file_fingerprint(p)


class Lazy:
    """Build a model at most once per batch, on first use; a failed build fails every item alike."""

    def __init__(self, build: Callable[[], Any]):
        self._build, self._value, self._error = build, None, None

    def get(self):
        if self._error is not None:
            raise self._error
        if self._value is None:
            try:
                self._value = self._build()
            except Exception as e:
                self._error = e
                raise
        return self._value


def catalog_videos(catalog) -> list[dict[str, Any]]:
    entries = catalog.entries if hasattr(catalog, "entries") else list(catalog)
    return [e for e in entries if e.get("media", "video") == "video"]


def entry_payload(entry: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "kind", "path", "name", "label", "annotations_path", "num_frames")
    return {k: entry.get(k) for k in keep}


def read_upstream_frames(store: ArtifactStore, item: WorkItem) -> np.ndarray:
    """The frames artifact this item's key was built on; a clear error if it is not there."""
    path, key = item.payload["frames_artifact"], item.key.upstream["frames"]
    data = store.read(path, key, names=["frames"])
    if data is None:
        state = store.status(path, key)
        raise VideoItemError(
            item.video_id, f"its frames artifact {path} is {state} (not complete under the expected key); "
            "the frames stage must succeed first"
        )
    return data["frames"]


def run_video_items(
    items: Sequence[WorkItem],
    store: ArtifactStore,
    ledger: Ledger,
    compute: Callable[[WorkItem, ArtifactWriter], None],
    progress: Callable[[WorkItem, str], None] | None = None,
    claims: Claims | None = None,
) -> BatchResult:
    """tasks.stage.run_items, with every failure message naming the video."""

    def named(item: WorkItem, writer: ArtifactWriter) -> None:
        try:
            compute(item, writer)
        except VideoItemError:
            raise
        except Exception as e:
            raise VideoItemError(item.video_id or item.item_id, f"{type(e).__name__}: {e}") from e

    return run_items(items, store, ledger, named, progress=progress, claims=claims)


