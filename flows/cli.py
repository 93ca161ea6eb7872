"""`audioscenic`: sample data, the demo, runs, status.

Exit codes: 0 success; 1 finished, but some items failed (see the messages);
2 bad usage or config (nothing was run); 130 stopped by Ctrl-C or SIGTERM (finished work kept).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import flows  # noqa: F401  (sets the offline Prefect environment before Prefect loads)
from tasks import interrupts

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, interrupts.EXIT_INTERRUPTED


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False, soft_wrap=True)  # never break a path across lines


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    """--set key=value pairs, each value read as YAML (no aliases); bad usage exits 2 at once, as argparse does."""
    from tasks.config import ConfigError, parse_yaml

    out = {}
    try:
        for p in pairs or []:
            if "=" not in p:
                raise ConfigError(f"--set expects key=value, got {p!r}")
            k, v = p.split("=", 1)
            out[k.strip()] = parse_yaml(v, f"--set {k.strip()}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    return out


# The demo's method variants: the full method and the two ablations whose claims its report shows
# (w/o TASI: audio semantics do not reach the scene; w/o SceneMasker: the object is not kept).
DEMO_VARIANTS = ["full", "no_tasi", "no_scene_masker"]
# The toy preset keeps the object best at 2.5 with every edit still in the sound's class (README "Guidance").
DEMO_GUIDANCE = 2.5


def demo_config(workdir: Path, videos: int = 2, clips: int = 4, seed: int = 0) -> dict[str, Any]:
    """The demo: the toy world's sample data in <workdir>/data and the toy preset (models/toy: the models
    trained on that world; the tiny random ones where none is trained, so masks come from the data set),
    each video fine-tuned with the clip of its own look, every video edited with every clip."""
    from tasks.config import QUICK_STAGES
    from tasks.sample_data import toy_source_audio

    stages = copy.deepcopy(QUICK_STAGES)
    stages["video"]["mask_source"] = "dataset"
    stages["finetune"]["variants"] = list(DEMO_VARIANTS)
    stages["edit"] = {"guidance_scale": DEMO_GUIDANCE}
    return {
        "workdir": ".",
        "catalogs": {
            "videos": [{"kind": "davis", "root": "data/davis"}],
            "audio": [{"kind": "esc50", "root": "data/esc50"}],
        },
        "models": {"preset": "toy"},
        "stages": stages,
        "grid": {"source_audio": toy_source_audio(videos, clips, seed)},
    }


def cmd_sample_data(args) -> int:
    from tasks.sample_data import write_sample_data

    s = write_sample_data(args.dir, videos=args.videos, clips=args.clips, seed=args.seed, frames=args.frames,
                          world=args.world)
    print(f"DAVIS-layout videos ({len(s.videos)}): {s.davis_root}")
    print(f"ESC-50-layout clips ({len(s.clips)}): {s.esc50_root}")
    return EXIT_OK


def _bars() -> bool:
    """Progress bars only on a terminal (logs and CI get the per-item log lines instead)."""
    return sys.stderr.isatty()


def _run(config_path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Plan first: with nothing to do, the answer comes from the ledger (no Prefect server, no model library).

    Signals (tasks.interrupts): a first Ctrl-C or SIGTERM stops the run at its next safe point and the summary
    says what was done; a second one exits at once. The temporary Prefect server lives outside the terminal's
    process group, so the first Ctrl-C does not take it from the run that is stopping."""
    from flows.preflight import run_pipeline

    try:
        return run_pipeline(config_path, overrides or None, progress=_bars(), detached_server=True)
    except BaseException as e:
        if isinstance(e, (Exception, SystemExit)):
            raise
        # KeyboardInterrupt, or SIGTERM as Prefect's TerminationSignal while its flow engine held the signal:
        # it landed outside a stage's batches; finished work is already committed.
        interrupts.request_stop(type(e).__name__)
        return {"catalog": {}, "interrupted": True}


def _summarise(summary: dict[str, Any], cfg) -> int:
    console = _console()
    failed = 0
    cat = summary.get("catalog", {})
    console.print(f"catalog: {cat.get('videos', 0)} videos, {cat.get('audio', 0)} clips, "
                  f"{cat.get('errors', 0)} left out -> {cat.get('path')}")
    failed += int(cat.get("errors", 0))
    for stage, s in summary.items():
        if stage in ("catalog", "report") or not isinstance(s, dict):
            continue
        busy = f", {s['busy']} still being computed by another worker" if s.get("busy") else ""
        stopped = f", {s['not_started']} not started (stopped)" if s.get("not_started") else ""
        console.print(f"{stage}: {s.get('computed', 0)} computed, {s.get('skipped', 0) + s.get('adopted', 0)} already done, "
                      f"{len(s.get('failed', {}))} failed{busy}{stopped}")
        for item, err in (s.get("failed") or {}).items():
            console.print(f"  [red]failed[/red] {item}: {err}")
        failed += len(s.get("failed") or {})
    if isinstance(summary.get("report"), dict):
        console.print(f"report: {summary['report'].get('report')}")
    console.print(f"store:  {cfg.store_url}")
    console.print(f"ledger: {cfg.ledger_url}")
    if summary.get("interrupted") or interrupts.stop_requested():
        console.print(f"[yellow]stopped[/yellow] ({interrupts.stop_reason() or 'interrupted'}): finished work is kept; "
                      "rerun the same command to continue")
        return EXIT_INTERRUPTED
    return EXIT_ITEMS_FAILED if failed else EXIT_OK


def cmd_run(args) -> int:
    from tasks.config import ConfigError, load_config

    overrides = _parse_sets(args.set)
    try:
        cfg = load_config(args.config, overrides)
        cfg.require_weights()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    summary = _run(Path(args.config), overrides)
    return _summarise(summary, cfg)


def cmd_demo(args) -> int:
    from tasks.config import dump_yaml, load_config
    from tasks.sample_data import write_sample_data

    t0 = time.time()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    if not (data / "davis").exists() or not (data / "esc50").exists():
        write_sample_data(data, videos=args.videos, clips=args.clips, seed=args.seed, frames=args.frames, world="toy")
    config_path = workdir / "demo.yaml"
    config_path.write_text(dump_yaml(demo_config(workdir, args.videos, args.clips, args.seed)))
    cfg = load_config(config_path)
    summary = _run(config_path, {})
    code = _summarise(summary, cfg)
    mp4s = sorted(cfg.outputs_dir.rglob("*.mp4")) if cfg.outputs_dir.exists() else []
    print(f"edited videos: {len(mp4s)} MP4s under {cfg.outputs_dir}/<variant>/<video>/<clip>.mp4")
    for p in mp4s[:4]:
        print(f"  {p}")
    if len(mp4s) > 4:
        print(f"  ... and {len(mp4s) - 4} more")
    print(f"config: {config_path}  (rerun: audioscenic run {config_path})")
    print(f"demo finished in {time.time() - t0:.1f} s")
    return code


def cmd_edit(args) -> int:
    from flows.single_edit import check_output, deliver, prepare
    from storage import ArtifactStore
    from tasks import edit as edit_stage
    from tasks.catalog import read_catalog
    from tasks.config import ConfigError, load_config

    try:
        output = check_output(args.output)  # bad usage is found now, not after minutes of work
        job = prepare(args.video, args.audio, args.config, args.workdir, args.source_audio, args.variant,
                      _parse_sets(args.set))
        cfg = load_config(job.config_path)
        cfg.require_weights()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"editing video {job.video_id} with clip {job.audio_id} (fine-tuned with {job.source_id}, "
          f"variant {job.variant}); workdir {cfg.workdir}")
    summary = _run(job.config_path, {})
    if _summarise(summary, cfg) == EXIT_INTERRUPTED:
        return EXIT_INTERRUPTED
    # The grid is this one pair, so every stage failure is this edit's; catalog errors are not
    # (files another edit linked into the shared workdir meanwhile).
    own_failures = any(s.get("failed") for stage, s in summary.items()
                       if stage not in ("catalog", "report") and isinstance(s, dict))
    items = [it for it in edit_stage.work_items(cfg, read_catalog(cfg.catalog_path))
             if (it.video_id, it.audio_id, it.variant) == (job.video_id, job.audio_id, job.variant)]
    store = ArtifactStore(cfg.store_url, cfg.storage.storage_options)
    if not items or not store.is_complete(items[0].artifact, items[0].key.key):
        print(f"error: the edit of {job.video_id} with {job.audio_id} did not complete (see the failures above)",
              file=sys.stderr)
        return EXIT_ITEMS_FAILED
    mp4 = (store.attrs(items[0].artifact, items[0].key.key) or {}).get("mp4")
    if not mp4 or not Path(mp4).exists():
        print(f"error: the edit is stored but has no MP4 (stages.edit.write_mp4 is off?): {items[0].artifact}",
              file=sys.stderr)
        return EXIT_ITEMS_FAILED
    print(f"edit: {deliver(Path(mp4), output)}")
    return EXIT_ITEMS_FAILED if own_failures else EXIT_OK


def cmd_status(args) -> int:
    from flows.status import status
    from tasks.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, _parse_sets(args.set))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    report = status(cfg, rescan=not args.no_rescan)
    if args.json:
        print(json.dumps(report, indent=1))
        return EXIT_OK
    console = _console()
    for stage, s in report["stages"].items():
        console.print(f"[bold]{stage}[/bold]: {s['done']} done, {s['stale']} stale, {s['missing']} missing, {s['failed']} failed")
        for it in s.get("items", [])[: args.limit]:
            console.print(f"  {it['state']:8} {it['item']}: {'; '.join(it['reasons'])}")
        extra = len(s.get("items", [])) - args.limit
        if extra > 0:
            console.print(f"  ... and {extra} more (use --json for all)")
        for issue in s.get("issues", []):
            console.print(f"  {issue}")
    return EXIT_OK


def cmd_report(args) -> int:
    from tasks import metrics
    from tasks.catalog import read_catalog
    from tasks.config import ConfigError, load_config
    from tasks.report import write_report

    try:
        cfg = load_config(args.config, _parse_sets(args.set))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not cfg.catalog_path.exists():
        print(f"error: no catalog at {cfg.catalog_path}; run `audioscenic run {args.config}` first", file=sys.stderr)
        return EXIT_USAGE
    catalog = read_catalog(cfg.catalog_path)
    if not args.keep_tables:
        metrics.collect(cfg, catalog)
    print(f"report: {write_report(cfg, catalog=catalog)}")
    return EXIT_OK


def cmd_ablation(args) -> int:
    from flows.pipeline import ablation_flow
    from tasks.config import ConfigError, load_config

    overrides = _parse_sets(args.set)
    try:
        load_config(args.config, overrides).require_weights()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from flows.progress import show_progress

    with show_progress(_bars()):
        out = ablation_flow(str(args.config), args.variants or None, overrides or None)
    print(f"variants: {', '.join(out['variants'])}")
    for name, path in out["tables"].items():
        print(f"table {name}: {path}")
    print(f"report: {out['report']}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="audioscenic",
        description="Audio-driven video scene editing (AudioScenic) as cached, incremental Prefect flows. "
        "Every stage's output is keyed by its inputs, parameters and code version, so a rerun "
        "redoes only what changed.",
        epilog="Exit codes: 0 ok; 1 finished but some items failed; 2 bad usage or config; "
        "130 stopped by Ctrl-C or SIGTERM (finished work is kept; rerun to continue).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("sample-data", help="write a small synthetic DAVIS-layout + ESC-50-layout data set")
    s.add_argument("dir", type=Path, help="output folder (davis/ and esc50/ are created inside)")
    s.add_argument("--videos", type=int, default=2, help="number of videos (default 2)")
    s.add_argument("--clips", type=int, default=4, help="number of audio clips (default 4)")
    s.add_argument("--frames", type=int, default=48, help="frames per video (default 48: 2 s at 24 fps)")
    s.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    s.add_argument("--world", choices=["plain", "toy"], default="plain",
                   help="plain: backgrounds unrelated to the sound (default); toy: video i shows the look of clip i's "
                        "class, pulsing with its loudness (the world the toy preset is trained on)")
    s.set_defaults(func=cmd_sample_data)

    s = sub.add_parser("demo", help="the toy world's sample data + the toy preset's trained models + the whole pipeline, on this machine")
    s.add_argument("--workdir", type=Path, default=Path("work/demo"), help="where data, store, ledger and outputs go")
    s.add_argument("--videos", type=int, default=2)
    s.add_argument("--clips", type=int, default=4)
    s.add_argument("--frames", type=int, default=24, help="frames per sample video (24 = 1 s: each edit is 1 s)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("run", help="run the pipeline for a config; only missing or stale work is done")
    s.add_argument("config", type=Path)
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. stages.audio.temperature=0.5")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser(
        "edit", help="edit one video with one audio clip and write the MP4",
        description="Edit one video's scene with one audio clip. Runs the pipeline for that single pair in its "
        "own workdir (default <config workdir>/single, or work/single), so reruns and more clips for the same "
        "video reuse its cached stages. Without --config, the tiny demo models are used (random weights).",
    )
    s.add_argument("--video", required=True, help="video file, frames folder, or a video id of the config's catalog")
    s.add_argument("--audio", required=True, help="audio file, or a clip id of the config's catalog")
    s.add_argument("--config", help="config for models, stage settings and variants (default: tiny demo settings)")
    s.add_argument("--source-audio", help="clip the video is fine-tuned with (default: --audio); "
                   "keep it fixed to reuse one fine-tuning for many clips")
    s.add_argument("--variant", help="method variant (default: the config's first, 'full')")
    s.add_argument("--workdir", help="where the single-edit store, ledger and outputs go")
    s.add_argument("-o", "--output", required=True, type=Path, help="the MP4 to write")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    s.set_defaults(func=cmd_edit)

    s = sub.add_parser("report", help="write the metrics tables and the HTML report of a config's edits")
    s.add_argument("config", type=Path)
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.add_argument("--keep-tables", action="store_true",
                   help="render the existing metrics tables (e.g. an ablation's) instead of this config's edits")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("ablation", help="run method variants (the paper's Table 2) over one grid; writes tables + report")
    s.add_argument("config", type=Path)
    s.add_argument("--variants", nargs="*", help="variant names from the config's `variants` (default: all)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.set_defaults(func=cmd_ablation)

    s = sub.add_parser("status", help="per stage: done / stale / missing / failed, with reasons")
    s.add_argument("config", type=Path)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--limit", type=int, default=20, help="items listed per stage (default 20)")
    s.add_argument("--no-rescan", action="store_true",
                   help="use the catalog of the last run instead of rehashing the media (faster, may miss changes)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE")
    s.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if _bars():
        # On a terminal the bars show progress; per-item INFO lines would scroll them away
        # (they stay in the Prefect UI). PREFECT_LOGGING_LEVEL set by the user wins.
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    try:
        with interrupts.handle_signals():
            return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; completed artifacts are kept, rerun to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
