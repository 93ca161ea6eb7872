"""Fine-tuning: the loss goes down, outputs are committed whole, a killed run resumes to the same weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from storage import Ledger
from tasks import diffusion, edit, finetune
from tasks.config import ConfigError
from tasks.stage import plan
from tasks.stage_task import open_store_and_ledger
from tests import diffusion_factory as fx
from tests.diffusion_factory import one_thread  # noqa: F401  (autouse fixture)


@pytest.mark.heavy(50)
def test_300_steps_lower_the_loss_and_commit_weights_and_json(tmp_path):
    cfg, catalog = fx.workspace(tmp_path, finetune={"steps": 300, "checkpoint_every": 100})
    assert cfg.stages.finetune.learning_rate == 3e-5 and cfg.stages.finetune.condition_dropout == 0.1
    (item,) = finetune.work_items(cfg, catalog)
    assert item.artifact == f"finetune/ball/{item.audio_id}/full" and set(item.key.upstream) == {"latents", "audio"}
    assert fx.run(cfg, catalog, finetune)["finetune"].computed == [item.item_id]

    store, ledger = open_store_and_ledger(cfg)
    attrs = store.attrs(item.artifact, item.key.key)
    losses = store.read(item.artifact, item.key.key)["loss"]
    assert losses.shape == (300,) and np.isfinite(losses).all()
    # Loss on the same fixed (t, noise) draws before and after: down by well over its noise.
    assert attrs["eval_loss_after"] < 0.9 * attrs["eval_loss_before"], attrs
    assert losses[-100:].mean() < losses[:100].mean()

    info = json.loads(Path(attrs["info"]).read_text())
    assert info["trained_on"]["latents"]["key"] == item.key.upstream["latents"]
    assert info["trained_on"]["audio"]["key"] == item.key.upstream["audio"]
    assert info["source_audio_id"] == item.audio_id and info["variant"] == "full"
    s = info["settings"]
    assert (s["steps"], s["learning_rate"], s["condition_dropout"], s["prediction_type"]) == (300, 3e-5, 0.1, "v_prediction")
    assert info["mixed_precision"] == "float32" and info["gradient_checkpointing"] is False  # CPU: neither
    assert info["losses"] == pytest.approx(losses.tolist())
    # 10% condition dropout: replay the run's draws.
    gen = torch.Generator().manual_seed(s["seed"])
    drops = sum(finetune._draw(gen, (1, 4, fx.FRAMES, 8, 8), 1000, 0.1)[3] for _ in range(300))
    assert 15 <= drops <= 45

    # The weights load into a fresh model: only trainable parts changed.
    weights = finetune.weights_file(store, item.artifact, item.key.key)
    fresh = diffusion.load_unet(cfg, item.payload["unet3d"])
    init = {k: v.clone() for k, v in fresh.trainable_state_dict().items()}
    fresh.load_trainable(weights)
    saved = load_file(str(weights))
    assert set(saved) == set(init) and attrs["trainable_parameters"] == sum(v.numel() for v in saved.values())
    assert all(torch.equal(fresh.trainable_state_dict()[k], saved[k]) for k in saved)
    assert sum(not torch.equal(init[k], saved[k]) for k in saved) > 0.9 * len(saved)
    assert not Path(item.payload["checkpoint"]).exists()  # removed once committed
    assert [e.state for e in plan(finetune.work_items(cfg, catalog), ledger)] == ["done"]


class Killed(RuntimeError):
    pass


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    steps = {"steps": 12, "checkpoint_every": 5}
    ref_cfg, catalog = fx.workspace(tmp_path / "ref", finetune=steps)
    fx.run(ref_cfg, catalog, finetune)
    (ref_item,) = finetune.work_items(ref_cfg, catalog)
    ref_store, _ = open_store_and_ledger(ref_cfg)

    cfg, _ = fx.workspace(tmp_path / "killed", finetune=steps)
    (item,) = finetune.work_items(cfg, catalog)
    assert item.key == ref_item.key
    store, ledger = open_store_and_ledger(cfg)

    def kill(step, loss):
        if step == 8:
            raise Killed("simulated kill after step 8")

    r = finetune.run_batch(cfg, [item], store, ledger, callback=kill)
    assert r.failed and "simulated kill" in r.failed[item.item_id]
    # Nothing that looks done: no committed artifact, no output folder; the step-5 checkpoint is there.
    assert store.status(item.artifact, item.key.key) != "complete" and not Path(item.payload["out_dir"]).exists()
    assert torch.load(item.payload["checkpoint"], weights_only=True)["step"] == 5
    assert plan([item], ledger)[0].state == "failed"

    r = finetune.run_batch(cfg, [item], store, ledger)
    assert r.computed == [item.item_id]
    attrs = store.attrs(item.artifact, item.key.key)
    assert attrs["resumed_from_step"] == 5
    a = load_file(str(finetune.weights_file(store, item.artifact, item.key.key)))
    b = load_file(str(finetune.weights_file(ref_store, ref_item.artifact, ref_item.key.key)))
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert np.array_equal(store.read(item.artifact, item.key.key)["loss"],
                          ref_store.read(ref_item.artifact, ref_item.key.key)["loss"])
    assert Ledger(cfg.ledger_url).read(stage="finetune", status="done").num_rows == 1


def test_variants_share_fine_tuning_only_where_training_is_the_same(tmp_path):
    cfg, catalog = fx.workspace(tmp_path, finetune={"variants": ["full", "no_scene_masker", "no_tasi"]})
    items = finetune.work_items(cfg, catalog)
    assert [it.variant for it in items] == ["full", "no_tasi"]
    assert items[1].payload["unet3d"]["tasi"] is False and items[0].key != items[1].key
    edits = edit.work_items(cfg, catalog)
    assert len(edits) == 3 * 3  # 3 clips x 3 variants
    ft_of = {(e.audio_id, e.variant): e.key.upstream["finetune"] for e in edits}
    aid = edits[0].audio_id
    assert ft_of[(aid, "no_scene_masker")] == ft_of[(aid, "full")] != ft_of[(aid, "no_tasi")]
    assert {e.variant: e.payload["use_mask"] for e in edits} == {"full": True, "no_scene_masker": False, "no_tasi": True}
    assert len({e.key.key for e in edits}) == 9  # every edit its own key
    # Changing an edit-only setting leaves fine-tuning alone.
    g = fx.make_cfg(tmp_path, finetune={"variants": ["full"]}, edit={"guidance_scale": 3.0})
    assert finetune.work_items(g, catalog)[0].key == items[0].key
    bad = fx.make_cfg(tmp_path, finetune={"variants": ["nope"]})
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        finetune.work_items(bad, catalog)
    typo = fx.make_cfg(tmp_path, variants={"full": {"tasii": False}})
    with pytest.raises(ConfigError, match="variants.full"):
        finetune.work_items(typo, catalog)
