"""Upstream for the inversion, fine-tuning and edit tests: one synthetic video, three clips, tiny models.

The audio and video stages run once per test session into a template work folder
(64 px frames -> 8 x 8 latents, 4 frames, dataset masks); each test gets its own
copy of that folder, so tests never see each other's artifacts.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tasks import audio, depth, frames, latents, masks
from tasks.catalog import build_catalog
from tasks.config import config_from_dict
from tasks.sample_data import write_sample_data
from tasks.stage_task import open_store_and_ledger

FRAMES, RES = 4, 64
UPSTREAM = [audio, frames, masks, depth, latents]
_TEMPLATE: dict[str, Any] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one torch thread is as fast, and does not spin against other jobs on shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def settings(workdir: Path, **stages) -> dict[str, Any]:
    base = {
        "video": {"num_frames": FRAMES, "resolution": RES, "mask_source": "dataset"},
        "inversion": {"steps": 4},
        "finetune": {"steps": 2, "checkpoint_every": 1},
    }
    for name, values in stages.items():
        base[name] = {**base.get(name, {}), **values}
    return {"workdir": str(workdir), "stages": base}


def make_cfg(workdir: Path, variants: dict | None = None, **stages):
    data = settings(workdir, **stages)
    if variants is not None:
        data["variants"] = variants
    return config_from_dict(data)


def _template():
    if not _TEMPLATE:
        root = Path(tempfile.mkdtemp(prefix="audioscenic-diffusion-"))
        sd = write_sample_data(root / "data", videos=1, clips=3, seed=0, frames=FRAMES, height=RES, width=RES)
        catalog = build_catalog([
            {"kind": "davis", "root": sd.davis_root, "media": "video"},
            {"kind": "esc50", "root": sd.esc50_root, "media": "audio"},
        ])
        cfg = make_cfg(root / "work")
        store, ledger = open_store_and_ledger(cfg)
        for mod in UPSTREAM:
            r = mod.run_batch(cfg, mod.work_items(cfg, catalog), store, ledger)
            assert not r.failed, (mod.STAGE, r.failed)
        _TEMPLATE.update(root=root, catalog=catalog)
    return _TEMPLATE


def workspace(dest: Path, **stages):
    """(cfg, catalog): a copy of the prepared upstream in `dest`, with the given stage settings."""
    t = _template()
    shutil.copytree(t["root"] / "work", dest, dirs_exist_ok=True)
    return make_cfg(dest, **stages), t["catalog"]


def run(cfg, catalog, *mods, **kwargs):
    """Run whole stages (all their items, one batch each); returns {stage: BatchResult}."""
    store, ledger = open_store_and_ledger(cfg)
    out = {}
    for mod in mods:
        out[mod.STAGE] = r = mod.run_batch(cfg, mod.work_items(cfg, catalog), store, ledger, **kwargs.get(mod.STAGE, {}))
        assert not r.failed, (mod.STAGE, r.failed)
    return out
