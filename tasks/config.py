"""The one YAML config that drives every flow, validated with pydantic.

Relative paths are resolved against the config file's folder. Unknown fields
are errors (a typo must not silently fall back to a default), and every error
names the field, e.g. ``stages.audio.temperature: Input should be greater than 0``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    pass


# A stage's code version is text; `--set stages.x.code_version=2` (YAML reads 2 as a number) means "2".
CodeVersion = Annotated[str, BeforeValidator(lambda v: str(v) if type(v) in (int, float) else v)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CatalogSource(_Strict):
    kind: Literal["davis", "esc50", "folder"]
    root: Path
    split: Literal["train", "val"] | None = None  # DAVIS only
    include: list[str] | None = None  # DAVIS: only these sequences


class CatalogsConfig(_Strict):
    videos: list[CatalogSource] = Field(default_factory=list)
    audio: list[CatalogSource] = Field(default_factory=list)


class StorageConfig(_Strict):
    store: str | None = None  # Zarr store: folder or fsspec URL; default <workdir>/store.zarr
    ledger: str | None = None  # ledger folder or URL; default <workdir>/ledger
    storage_options: dict[str, Any] = Field(default_factory=dict)


# Presets whose models are built in code (no local weights): tiny (seeded random) and toy
# (trained on the toy world, weights committed under models/toy; untrained parts as tiny).
BUILTIN_PRESETS = ("tiny", "toy")


class ModelPaths(_Strict):
    """Local weights. With preset 'tiny' or 'toy' none are needed; with 'paper' all of them are."""

    imagebind: Path | None = None  # imagebind_huge.pth
    base: Path | None = None  # diffusers folder of SD 2.1 unCLIP H
    controlnet: Path | None = None  # diffusers folder of the depth ControlNet
    grounding_dino: Path | None = None
    sam: Path | None = None
    xmem: Path | None = None  # XMem.pth
    depth: Path | None = None  # dpt-hybrid-midas folder
    clip: Path | None = None  # clip-vit-large-patch14 folder


class ModelsConfig(_Strict):
    # tiny: seeded random models; toy: the same models trained on the toy world where trained
    # (models/toy.py: the audio encoder, the CLIP scorer, the VAE and the U-Net), tiny elsewhere; paper: local weights.
    preset: Literal["tiny", "toy", "paper"] = "tiny"
    paths: ModelPaths = Field(default_factory=ModelPaths)
    device: str = "cpu"
    seed: int = 0
    # Inversion and editing forwards (U-Net, ControlNet): float32, or bfloat16 autocast with float32
    # weights. On a GPU bfloat16 is ~4x faster per step at 768 px (benchmarks/results/h200); it is
    # part of the cache keys, since the latents differ. Fine-tuning always autocasts on a GPU.
    precision: Literal["float32", "bfloat16"] = "float32"


class AudioStageConfig(_Strict):
    # M_a's softmax temperature (eq. 4). M_a and F_a are derived per edit from the stored
    # per-clip features (one row per frame of the edit's span), so this enters the keys of
    # fine-tuning and edits, not of the audio stage.
    temperature: float = Field(0.25, gt=0)
    n_mels: int = Field(128, gt=0)
    batch_size: int = Field(16, gt=0)
    code_version: CodeVersion = "2"  # 2: stores a 100 Hz envelope and 10 ms log-Mel frames, not N rows

    @model_validator(mode="before")
    @classmethod
    def _no_num_frames(cls, data: Any) -> Any:
        if isinstance(data, dict) and "num_frames" in data:
            raise ValueError(
                "num_frames is no longer a setting: M_a and F_a have one row per frame of each edit's span "
                "(stages.video.span, README 'What an edit covers'); remove stages.audio.num_frames"
            )
        return data


class VideoStageConfig(_Strict):
    """Video preprocessing: frames, masks, depth and latents (tasks.frames/masks/depth/latents)."""

    # XMem's own option names (DESIGN 7); unset ones take XMem's defaults (DESIGN 1).
    XMEM_OPTIONS: ClassVar[tuple[str, ...]] = (
        "mem_every", "deep_update_every", "top_k", "min_mid_term_frames", "max_mid_term_frames",
        "num_prototypes", "max_long_term_elements", "enable_long_term",
    )

    # What an edit covers (tasks.span): "clip" (default) the first min(video, clip, max_seconds)
    # seconds from `start`, every frame at the source rate / stride; "video" the whole video up to
    # max_seconds (the sound padded or looped, stages.edit.audio_fit); "frames" exactly num_frames
    # frames (the paper's 8-frame figures; M_a/F_a split the whole clip into them).
    span: Literal["clip", "video", "frames"] = "clip"
    max_seconds: float = Field(120.0, gt=0)  # cap on the preprocessed and edited span of any video
    # span "frames": num_frames frames at `stride` from `start`; too few -> the item fails, naming the counts.
    num_frames: int = Field(8, gt=0)
    stride: int = Field(1, gt=0)
    start: int = Field(0, ge=0)
    resolution: int = Field(768, gt=0, multiple_of=8)  # square side after resize + centre crop; /8 for the VAE
    # Masks: Grounded-SAM + XMem (caption = the catalog label) or the dataset's annotation PNGs.
    mask_source: Literal["grounded_sam", "dataset"] = "grounded_sam"
    mask_object_id: int | None = Field(None, ge=1, le=255)  # dataset masks: this object only; None = all objects
    box_threshold: float = Field(0.35, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    mask_threshold: float = Field(0.5, gt=0, lt=1)  # XMem foreground probability -> mask
    xmem: dict[str, int | bool] = Field(default_factory=dict)  # memory options by XMem's names
    # Depth and latents.
    depth_dtype: Literal["float16", "float32"] = "float16"
    depth_batch: int = Field(4, gt=0)  # frames per DPT forward (memory knob, not in the cache key)
    latent_chunk: int = Field(4, gt=0)  # frames per VAE encode (memory knob, not in the cache key)
    batch_size: int = Field(16, gt=0)  # videos per Prefect task

    @field_validator("xmem")
    @classmethod
    def _known_xmem_options(cls, value: dict[str, int | bool]) -> dict[str, int | bool]:
        unknown = sorted(set(value) - set(cls.XMEM_OPTIONS))
        if unknown:
            raise ValueError(f"unknown XMem option(s) {unknown}; known: {list(cls.XMEM_OPTIONS)}")
        return value


class MetricsStageConfig(_Strict):
    """Evaluation (tasks.metrics, DESIGN 1 "Metrics"): CLIP-T, CLIP-F, Temp-S, Sem-A, masked SSIM per edit."""

    # CLIP-T / Sem-A text from a clip's class label ("crackling_fire" -> "crackling fire").
    prompt: str = "a photo of {label}"
    clip_batch: int = Field(8, gt=0)  # frames per CLIP forward (memory knob, not in the cache key)
    batch_size: int = Field(16, gt=0)  # edits per Prefect task
    code_version: CodeVersion = "1"

    @field_validator("prompt")
    @classmethod
    def _has_label(cls, value: str) -> str:
        if "{label}" not in value:
            raise ValueError("must contain '{label}' (where the clip's class label goes)")
        return value


# Variant names are Zarr path segments (edits/{video}/{audio}/{variant}).
# Stage settings for tiny-preset runs (the demo, tests, soak and grid benchmarks): 64 px
# frames and few diffusion steps keep a whole DAG to minutes on two CPU cores. The
# paper's settings (50 DDIM steps, 300 fine-tuning steps) are the defaults.
QUICK_STAGES: dict[str, dict[str, Any]] = {
    "video": {"resolution": 64}, "inversion": {"steps": 10}, "finetune": {"steps": 30},
    "windows": {"window": 8, "overlap": 2},
}

# At most 64 characters: a variant name is part of file names (outputs/, the report's images).
_VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
# The paper's ablations (Table 2) plus the Magnitude Modulator and the Frequency Fuser
# outside SceneMasker: name -> U-Net switch overrides (models.unet3d.UNet3DConfig
# fields). "full" is the method itself.
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_tasi": {"tasi": False},
    "no_scene_masker": {"scene_masker": False},
    "no_frequency_fuser": {"frequency_fuser": False},
    "no_magnitude_modulator": {"magnitude_modulator": False},
    "unmasked_frequency_fuser": {"fuser_scene_masked": False},
}


class InversionStageConfig(_Strict):
    """DDIM inversion of the source latents (tasks.inversion, DESIGN 1 "Inversion and editing")."""

    steps: int = Field(50, gt=0, le=1000)  # DDIM steps of the inversion and of the edits that start from it
    # "base": the inflated base model (new parts at init) inverts, once per video for every variant.
    # "finetuned": each variant's fine-tuned model inverts its own copy (Tune-A-Video's practice).
    model: Literal["base", "finetuned"] = "base"
    # Keep every intermediate latent (steps + 1 of them); editing with foreground blending needs it
    # and turns it on by itself.
    save_trajectory: bool = False
    # Beyond plain DDIM inversion: re-solve each step this many times with the model evaluated
    # at the current estimate of the noisier latent (each costs one more U-Net call per step;
    # the round trip then approaches the sampler's exact inverse). 0 = plain DDIM inversion.
    fixed_point_iters: int = Field(0, ge=0, le=10)
    batch_size: int = Field(8, gt=0)  # videos per Prefect task
    # "2": the zero audio condition is unCLIP's null label (issue 14).
    code_version: CodeVersion = "2"


class FinetuneStageConfig(_Strict):
    """Per (video, source audio, variant) fine-tuning (tasks.finetune, DESIGN 1 "Fine-tuning")."""

    # Variants to fine-tune and edit with (names in the top-level `variants`).
    variants: list[str] = Field(default_factory=lambda: ["full"], min_length=1)
    steps: int = Field(300, gt=0)
    learning_rate: float = Field(3e-5, gt=0)
    weight_decay: float = Field(1e-2, ge=0)  # AdamW's (torch's default, as Tune-A-Video)
    max_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    condition_dropout: float = Field(0.1, ge=0, le=1)  # fraction of steps with the zero audio condition
    seed: int = 0  # timesteps, noise and dropout draws
    checkpoint_every: int = Field(50, gt=0)  # steps between resumable checkpoints
    keep_checkpoints: bool = False  # delete an item's checkpoint once its weights are committed
    weights_dir: Path | None = None  # default <workdir>/finetune
    batch_size: int = Field(1, gt=0)  # fine-tuning items per Prefect task
    # "2": unCLIP's null label for condition dropout; Frequency Fuser on the normalised
    # temporal spectrum of F_a with bounded gains (issue 14).
    code_version: CodeVersion = "2"

    @field_validator("variants")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not _VARIANT_NAME.fullmatch(v)]
        if bad:
            raise ValueError(f"variant names must be path segments of at most 64 letters, digits, _ . -: {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"variants listed twice: {value}")
        return value


class EditStageConfig(_Strict):
    """Audio-driven editing: DDIM from z_T (tasks.edit, paper eq. 6)."""

    # DDIM steps: the inversion's (stages.inversion.steps), so sampling retraces its schedule from z_T.
    guidance_scale: float = Field(7.5, ge=0)  # classifier-free guidance against the zero condition; 1 = none
    controlnet: bool = True  # depth ControlNet (models.paths.controlnet)
    controlnet_scale: float = Field(1.0, ge=0)
    # Beyond the paper (off by default): after each step, foreground latents are replaced by
    # the inversion trajectory's latents of the same noise level.
    foreground_blend: bool = False
    fps: float | None = Field(None, gt=0)  # MP4 rate; None = the source's fps / stages.video.stride
    # span "video": past the clip's end the sound (M_a, F_a and the MP4's track) is silence or the clip again.
    audio_fit: Literal["pad", "loop"] = "pad"
    write_mp4: bool = True
    clip_batch: int = Field(1, gt=0)  # clips denoised together (memory knob, not in the cache key)
    decode_chunk: int = Field(4, gt=0)  # frames per VAE decode (memory knob, not in the cache key)
    batch_size: int = Field(16, gt=0)  # edits per Prefect task (a batch never mixes videos)
    # "2": unCLIP's null label, Frequency Fuser under SceneMasker and on the audio's
    # temporal spectrum, max-pooled coarse masks (issue 14).
    code_version: CodeVersion = "2"


class WindowsConfig(_Strict):
    """Denoising windows over a span (models.windows, DESIGN 6): inversion, fine-tuning and editing.

    Each U-Net call sees `window` frames (plus the span's first frame as the sparse-causal
    anchor), overlapping windows are blended at every step, so peak memory is set by the
    window, not by the span. null = the whole span at once (big GPUs). Fine-tuning draws one
    window per step. Part of the inversion, fine-tuning and edit cache keys.
    """

    window: int | None = Field(16, ge=2)
    overlap: int = Field(4, ge=0)

    @model_validator(mode="after")
    def _overlap_below_window(self):
        if self.window is not None and self.overlap >= self.window:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than window ({self.window})")
        return self


class StagesConfig(_Strict):
    audio: AudioStageConfig = Field(default_factory=AudioStageConfig)
    video: VideoStageConfig = Field(default_factory=VideoStageConfig)
    metrics: MetricsStageConfig = Field(default_factory=MetricsStageConfig)
    inversion: InversionStageConfig = Field(default_factory=InversionStageConfig)
    finetune: FinetuneStageConfig = Field(default_factory=FinetuneStageConfig)
    edit: EditStageConfig = Field(default_factory=EditStageConfig)
    windows: WindowsConfig = Field(default_factory=WindowsConfig)


class GridSelection(_Strict):
    """Which (video, clip) pairs to edit. Ids are catalog ids."""

    videos: list[str] | Literal["all"] = "all"
    audio: list[str] | Literal["all"] = "all"
    per_class: int | None = Field(None, gt=0)  # keep only the first k clips (by id) of each label
    pairs: list[tuple[str, str]] | None = None  # explicit (video, clip) pairs; overrides the above


class GridConfig(_Strict):
    selection: str = "all"  # "all" (every video x every clip) or the name of a subset below
    subsets: dict[str, GridSelection] = Field(default_factory=dict)
    # Fine-tuning audio per video (DAVIS has no sound): a mapping, else one default clip.
    source_audio: dict[str, str] = Field(default_factory=dict)
    default_source_audio: str | None = None

    def active(self) -> GridSelection:
        if self.selection == "all":
            return self.subsets.get("all", GridSelection())
        if self.selection not in self.subsets:
            known = ", ".join(sorted(self.subsets)) or "none defined"
            raise ConfigError(f"grid.selection: unknown subset {self.selection!r} (known: {known})")
        return self.subsets[self.selection]


class ReportConfig(_Strict):
    """The static HTML report (tasks.report)."""

    dir: Path | None = None  # default <workdir>/report
    thumb: int = Field(96, ge=16, le=512)  # contact-sheet frame side in pixels
    strip_frames: int = Field(8, ge=1, le=64)  # evenly spaced frames per contact-sheet row (not every frame)
    link_media: bool = True  # hard-link MP4s into the report when possible (else copy)


class ExecutionConfig(_Strict):
    """How a flow runs its stage batches."""

    max_concurrency: int = Field(1, gt=0)  # batches of one stage in flight at once
    # Run batches on a Dask cluster (prefect-dask): a scheduler address ("tcp://host:8786"),
    # or "local" for a local cluster of `dask_workers` processes. None: Prefect's default runner.
    dask_address: str | None = None
    dask_workers: int = Field(2, gt=0)
    # Work claims are leases renewed while an item is computed: a dead worker's items go to
    # another worker once its lease lapses (storage.claims).
    claim_lease_s: float = Field(300.0, gt=0)


class Config(_Strict):
    workdir: Path = Path("work")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    catalogs: CatalogsConfig = Field(default_factory=CatalogsConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    grid: GridConfig = Field(default_factory=GridConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    # Method variants for fine-tuning and editing (ablations): name -> U-Net switch overrides
    # (models.unet3d.UNet3DConfig fields); stages.finetune.variants picks the ones to run.
    variants: dict[str, dict[str, bool | int | float | str]] = Field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_VARIANTS.items()}
    )

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        bad = [k for k in value if not _VARIANT_NAME.fullmatch(k)]
        if bad:
            raise ValueError(f"variant names must be path segments of at most 64 letters, digits, _ . -: {bad}")
        return value

    # -- derived locations -------------------------------------------------
    @property
    def store_url(self) -> str:
        return self.storage.store or str(self.workdir / "store.zarr")

    @property
    def ledger_url(self) -> str:
        return self.storage.ledger or str(self.workdir / "ledger")

    @property
    def claims_url(self) -> str:
        """Work claims live beside the ledger (shared by every worker of a grid)."""
        return f"{self.ledger_url.rstrip('/')}/claims"

    @property
    def catalog_path(self) -> Path:
        return self.workdir / "catalog" / "catalog.parquet"

    @property
    def outputs_dir(self) -> Path:
        return self.workdir / "outputs"

    def missing_weights(self) -> list[str]:
        """With the paper preset: each configured model path that is unset or absent."""
        if self.models.preset != "paper":
            return []
        out = []
        for name, value in self.models.paths.model_dump().items():
            if value is None:
                out.append(f"models.paths.{name}: not set")
            elif not Path(value).exists():
                out.append(f"models.paths.{name}: '{value}' does not exist")
        return out

    def require_weights(self) -> None:
        missing = self.missing_weights()
        if missing:
            raise ConfigError(
                "the 'paper' preset needs local weights (nothing is downloaded); fill in the config:\n  "
                + "\n  ".join(missing)
                + "\nSee README 'Bringing real weights'."
            )


def _resolve(obj: Any, base: Path) -> Any:
    """Make every Path (and local store/ledger string) absolute relative to `base`."""
    if isinstance(obj, BaseModel):
        updates = {}
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            new = _resolve(value, base)
            if name in ("store", "ledger") and isinstance(value, str) and "://" not in value:
                new = str((base / value).resolve()) if not os.path.isabs(value) else value
            if new is not value:
                updates[name] = new
        return obj.model_copy(update=updates) if updates else obj
    if isinstance(obj, Path):
        p = obj.expanduser()
        return p if p.is_absolute() else (base / p).resolve()
    if isinstance(obj, list):
        new = [_resolve(v, base) for v in obj]
        return new if any(a is not b for a, b in zip(new, obj)) else obj
    return obj


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and its section)"
        lines.append(f"  {loc}: {msg}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def config_from_dict(data: dict[str, Any] | None, base_dir: str | Path = ".", source: str = "<dict>") -> Config:
    try:
        cfg = Config.model_validate(data or {})
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    return _resolve(cfg, Path(base_dir).resolve())


# A config is a few kilobytes; anything near this is a mistake or an attack.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 64  # nesting levels (the composer recurses per level)


class _Refused(yaml.MarkedYAMLError):
    pass


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases as it composes, before any value exists.

    An alias is a reference, so a few lines of nested aliases ("billion laughs") expand
    to billions of nodes wherever a field accepts a mapping or a list; refusing them at
    the event stage costs nothing. Deep nesting is refused too (each level is a Python frame).
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(None, None, f"YAML alias *{event.anchor} refused: a config may not use "
                           "anchors or aliases; write each value out", event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _Refused(None, None, f"YAML anchor &{event.anchor} refused: a config may not use "
                           "anchors or aliases; write each value out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _one_line_mark(e: yaml.MarkedYAMLError) -> str:
    mark = e.problem_mark or e.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (e.problem or e.context or "invalid YAML")


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> plain data (no Python objects, anchors or aliases); errors are one-line ConfigErrors naming `source`."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass
    except _Refused as e:
        raise ConfigError(f"{source}: {_one_line_mark(e)}") from None
    except yaml.YAMLError as e:
        detail = _one_line_mark(e) if isinstance(e, yaml.MarkedYAMLError) else str(e)
        raise ConfigError(f"{source}: not valid YAML ({detail})") from None


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # an object met twice is written out twice: the loader above refuses aliases


def dump_yaml(data: Any) -> str:
    """Config data as YAML that `parse_yaml` reads back (never an anchor or alias, key order kept)."""
    return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False)


def read_config_file(path: str | Path) -> Any:
    """The parsed YAML of a config file: a regular file of at most MAX_CONFIG_BYTES of UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # never more, whatever stat said
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a config is a few KiB of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_yaml(text, str(path))


def load_config(path: str | Path, overrides: dict[str, Any] | None = None, *,
                require_catalogs: bool = True) -> Config:
    """Read YAML safely (no arbitrary objects, no aliases), apply dotted overrides, validate.

    require_catalogs: a config with no catalog source at all has nothing to run and is an
    error (`edit --config` passes False: its catalog is the inputs it links).
    """
    path = Path(path)
    data = read_config_file(path)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    cfg = config_from_dict(apply_overrides(dict(data or {}), overrides), path.parent, str(path))
    if require_catalogs and not (cfg.catalogs.videos or cfg.catalogs.audio):
        raise ConfigError(f"{path}: no catalogs: nothing to edit; list video and audio sources under "
                          "catalogs.videos and catalogs.audio (see configs/demo.yaml)")
    return cfg


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys ("stages.audio.temperature": 0.5) in a config mapping, in place."""
    for dotted, value in (overrides or {}).items():
        node = data
        parts = dotted.split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node[parts[-1]] = value
    return data
