"""XMem: official checkpoint layout, strict loading, propagation and memory mechanics."""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoints import CheckpointMismatchError
from models.xmem import InferenceCore, MemoryConfig, XMem, processing_size, propagate

# Key/shape manifest of the official network (hkchengrex/XMem model/network.py, multi-object,
# key_dim 64, value_dim 512, hidden_dim 64), computed once by instantiating the reference code:
# sha256 over sorted lines "key [shape]". 412 entries (BatchNorm counters included), 62,220,354 values.
OFFICIAL_MANIFEST_SHA256 = "360c52deecfc6257ddf300f8988ae3e745255e21971ddd1a0541da6b0a6da164"
OFFICIAL_NUM_KEYS = 412
OFFICIAL_NUM_VALUES = 62_220_354

H = W = 64  # tiny tests: 64x64 frames -> 4x4 feature maps -> 16 memory elements per frame
HW = (H // 16) * (W // 16)


@pytest.fixture(scope="module")
def full_model() -> XMem:
    torch.manual_seed(1234)
    return XMem()


@pytest.fixture(scope="module")
def full_ckpt(full_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("xmem") / "XMem.pth"
    torch.save(full_model.state_dict(), path)
    return path


def _video(n: int, h: int = H, w: int = W, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bright square moving over a textured background, and its first-frame mask."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(0, 120, size=(h, w, 3), dtype=np.uint8)
    frames = np.repeat(bg[None], n, axis=0)
    side = max(h // 4, 2)
    for t in range(n):
        y, x = h // 4 + t % 4, w // 4 + t
        frames[t, y : y + side, x : x + side] = (230, 200, 40)
    mask = np.zeros((h, w), dtype=bool)
    mask[h // 4 : h // 4 + side, w // 4 : w // 4 + side] = True
    return frames, mask


def _normalised(frame: np.ndarray) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (torch.from_numpy(frame).permute(2, 0, 1).float() / 255 - mean) / std


# ------------------------------------------------------------------------------------------
# Layout and loading
# ------------------------------------------------------------------------------------------


def test_full_size_state_dict_equals_official_layout(full_model):
    sd = full_model.state_dict()
    manifest = "\n".join(f"{k} {list(v.shape)}" for k, v in sorted(sd.items()))
    assert len(sd) == OFFICIAL_NUM_KEYS
    assert sum(v.numel() for v in sd.values()) == OFFICIAL_NUM_VALUES
    assert {k.split(".")[0] for k in sd} == {"key_encoder", "value_encoder", "key_proj", "decoder"}
    spot = {
        "key_encoder.conv1.weight": (64, 3, 7, 7),
        "key_encoder.res2.0.downsample.0.weight": (256, 64, 1, 1),
        "key_encoder.layer3.5.conv3.weight": (1024, 256, 1, 1),
        "key_proj.key_proj.weight": (64, 1024, 3, 3),
        "key_proj.d_proj.weight": (1, 1024, 3, 3),
        "key_proj.e_proj.weight": (64, 1024, 3, 3),
        "value_encoder.conv1.weight": (64, 5, 7, 7),
        "value_encoder.layer3.0.downsample.1.running_var": (256,),
        "value_encoder.fuser.block1.downsample.weight": (512, 1280, 3, 3),
        "value_encoder.fuser.attention.ChannelGate.mlp.1.weight": (32, 512),
        "value_encoder.fuser.attention.SpatialGate.spatial.conv.weight": (1, 2, 7, 7),
        "value_encoder.hidden_reinforce.transform.weight": (192, 576, 3, 3),
        "decoder.fuser.block1.conv1.weight": (512, 1600, 3, 3),
        "decoder.hidden_update.g4_conv.weight": (256, 257, 1, 1),
        "decoder.hidden_update.transform.weight": (192, 320, 3, 3),
        "decoder.up_16_8.skip_conv.weight": (512, 512, 3, 3),
        "decoder.up_8_4.out_conv.conv2.weight": (256, 256, 3, 3),
        "decoder.pred.weight": (1, 256, 3, 3),
    }
    for k, shape in spot.items():
        assert tuple(sd[k].shape) == shape, k
    assert hashlib.sha256(manifest.encode()).hexdigest() == OFFICIAL_MANIFEST_SHA256


def test_full_size_checkpoint_round_trip(full_model, full_ckpt):
    loaded = XMem.from_checkpoint(full_ckpt)
    a, b = full_model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    frames, mask = _video(3)
    out_a = propagate(full_model, frames, mask)
    out_b = propagate(loaded, frames, mask)
    assert torch.equal(out_a, out_b)
    assert out_a.shape == (3, H, W) and torch.isfinite(out_a).all()


def _save_variant(full_ckpt: Path, tmp_path: Path, edit) -> Path:
    sd = torch.load(full_ckpt, weights_only=True)
    edit(sd)
    out = tmp_path / "variant.pth"
    torch.save(sd, out)
    return out


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda sd: sd.pop("decoder.up_8_4.skip_conv.bias"), "decoder.up_8_4.skip_conv.bias"),
        (
            lambda sd: sd.__setitem__("key_encoder.layer2.1.conv2.weight", torch.zeros(128, 128, 1, 1)),
            "key_encoder.layer2.1.conv2.weight",
        ),
        (lambda sd: sd.__setitem__("decoder.extra.weight", torch.zeros(3)), "decoder.extra.weight"),
    ],
    ids=["missing", "wrong-shape", "unexpected"],
)
def test_mismatched_checkpoint_is_rejected_naming_the_key(full_ckpt, tmp_path, edit, named):
    path = _save_variant(full_ckpt, tmp_path, edit)
    with pytest.raises(CheckpointMismatchError) as err:
        XMem.from_checkpoint(path)
    assert named in str(err.value) and str(path) in str(err.value)


def test_four_channel_value_conv1_is_zero_padded(full_model, full_ckpt, tmp_path):
    w5 = full_model.state_dict()["value_encoder.conv1.weight"]

    def to_single_object(sd):
        sd["value_encoder.conv1.weight"] = sd["value_encoder.conv1.weight"][:, :4].clone()
        # Older files may also lack BatchNorm step counters; those are accepted too.
        for k in [k for k in sd if k.endswith("num_batches_tracked")]:
            del sd[k]

    loaded = XMem.from_checkpoint(_save_variant(full_ckpt, tmp_path, to_single_object))
    w = loaded.state_dict()["value_encoder.conv1.weight"]
    assert w.shape == (64, 5, 7, 7)
    assert torch.equal(w[:, :4], w5[:, :4])
    assert torch.count_nonzero(w[:, 4]) == 0


def test_tiny_round_trip_and_dims_read_from_checkpoint(tmp_path):
    tiny = XMem.tiny(seed=3)
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    arch = {k: v for k, v in XMem.TINY.items() if k not in ("key_dim", "value_dim", "hidden_dim")}
    loaded = XMem.from_checkpoint(path, **arch)  # key/value/hidden dims come from the file
    assert (loaded.key_dim, loaded.value_dim, loaded.hidden_dim) == (16, 32, 8)
    frames, mask = _video(4)
    assert torch.equal(propagate(tiny, frames, mask), propagate(loaded, frames, mask))


def test_tiny_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    a, b, c = XMem.tiny(seed=0), XMem.tiny(seed=0), XMem.tiny(seed=1)
    assert torch.rand(1) == expected_next
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    key = "decoder.pred.weight"
    assert torch.equal(sa[key], sb[key]) and not torch.equal(sa[key], sc[key])
    assert type(a) is XMem and sum(p.numel() for p in a.parameters()) < 1_000_000


# ------------------------------------------------------------------------------------------
# Propagation
# ------------------------------------------------------------------------------------------


def test_propagate_eight_frames_on_cpu():
    frames, mask = _video(8)
    calls = []
    out = propagate(XMem.tiny(seed=0), frames, mask, progress=lambda d, n: calls.append((d, n)))
    assert out.shape == (8, H, W) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(out[0], torch.from_numpy(mask).float())  # first frame: the given mask
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out[1], out[0])  # later frames are predictions
    assert calls == [(i, 8) for i in range(1, 9)]


def test_probabilities_sum_to_one_with_background_first():
    model = XMem.tiny(seed=0)
    frames, mask = _video(6)
    # Two objects: the square's left and right halves.
    m = torch.from_numpy(mask)
    left, right = m.clone(), m.clone()
    left[:, W // 2 - 4 :] = False
    right[:, : W // 2 - 4] = False
    masks = torch.stack([left, right]).float()
    core = InferenceCore(model, MemoryConfig.from_kwargs({"mem_every": 2}, num_frames=6))
    for t in range(6):
        prob = core.step(_normalised(frames[t]), masks if t == 0 else None, end=t == 5)
        assert prob.shape == (3, H, W)
        torch.testing.assert_close(prob.sum(0), torch.ones(H, W), atol=1e-5, rtol=0)
        assert prob.min() >= 0
        if t == 0:
            # Index 0 is background: ~1 outside both objects, ~0 inside; objects follow in order.
            assert prob[0][~m].min() > 0.999 and prob[0][m].max() < 1e-3
            assert prob[1][left].min() > 0.999 and prob[2][right].min() > 0.999


def test_working_memory_grows_every_mem_every_frames():
    model = XMem.tiny(seed=0)
    frames, mask = _video(10)
    cfg = MemoryConfig.from_kwargs({"mem_every": 3}, num_frames=10)
    core = InferenceCore(model, cfg)
    sizes = []
    for t in range(10):
        core.step(_normalised(frames[t]), torch.from_numpy(mask)[None].float() if t == 0 else None, end=t == 9)
        sizes.append(core.memory.work_mem.size)
    # Frame 0 is always memorised, then every 3rd frame; the last frame never is.
    assert sizes == [HW * n for n in (1, 1, 1, 2, 2, 2, 3, 3, 3, 3)]
    assert core.memory.work_mem.value.shape == (1, model.value_dim, 3 * HW)
    assert core.memory.long_mem.size == 0 and core.memory.consolidations == 0


def test_long_term_consolidation_at_configured_sizes():
    model = XMem.tiny(seed=0)
    frames, mask = _video(12)
    options = dict(
        mem_every=1, min_mid_term_frames=2, max_mid_term_frames=4, num_prototypes=8, max_long_term_elements=20
    )
    core = InferenceCore(model, MemoryConfig.from_kwargs(options, num_frames=12))
    assert core.config.enable_long_term_count_usage  # 12 / (4 - 2) * 8 >= 20, as XMem decides
    work, long, n_cons = [], [], []
    first_keys = None
    for t in range(12):
        before = core.memory.work_mem.key.clone() if core.memory.work_mem.engaged() else None
        prob = core.step(_normalised(frames[t]), torch.from_numpy(mask)[None].float() if t == 0 else None, end=t == 11)
        torch.testing.assert_close(prob.sum(0), torch.ones(H, W), atol=1e-5, rtol=0)
        if t == 0:
            first_keys = core.memory.work_mem.key.clone()
        if t == 3:
            # Prototypes are copies of consolidated keys: frames 1-2 (not the permanent frame 0,
            # not the newest min_mid_term_frames - 1 frames).
            cand = before[0, :, HW : 3 * HW].T
            protos = core.memory.long_mem.key[0].T
            assert protos.shape == (8, model.key_dim)
            assert all((cand == p).all(1).any() for p in protos)
        work.append(core.memory.work_mem_frames)
        long.append(core.memory.long_mem.size)
        n_cons.append(core.memory.consolidations)
    # Working memory reaches max_mid_term_frames (4), is cut back to min_mid_term_frames (2);
    # each cut adds num_prototypes (8) long-term elements; the long-term memory is capped at 20
    # by dropping its least-used elements before adding.
    assert work == [1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 3]
    assert long == [0, 0, 0, 8, 8, 16, 16, 20, 20, 20, 20, 20]
    assert n_cons == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4]
    assert torch.equal(core.memory.work_mem.key[..., :HW], first_keys)  # frame 0 stays in working memory
    lm = core.memory.long_mem
    assert lm.value.shape == (1, model.value_dim, 20) and lm.shrinkage.shape == (1, 1, 20)
    assert lm.selection is None and (lm.shrinkage >= 1 - 1e-5).all()


def test_long_term_disabled_keeps_all_memory_frames():
    frames, mask = _video(7)
    core = InferenceCore(XMem.tiny(seed=0), MemoryConfig.from_kwargs({"mem_every": 1, "enable_long_term": False}))
    for t in range(7):
        core.step(_normalised(frames[t]), torch.from_numpy(mask)[None].float() if t == 0 else None, end=t == 6)
    assert core.memory.work_mem_frames == 6 and core.memory.long_mem.size == 0
    assert core.memory.work_mem.selection is None


def test_memory_options_are_validated():
    frames, mask = _video(2)
    with pytest.raises(TypeError, match="mem_evry"):
        propagate(XMem.tiny(), frames, mask, mem_evry=3)
    with pytest.raises(ValueError, match="max_mid_term_frames"):
        MemoryConfig.from_kwargs({"min_mid_term_frames": 5, "max_mid_term_frames": 5})
    defaults = MemoryConfig.from_kwargs({}, num_frames=80)
    assert (defaults.mem_every, defaults.top_k, defaults.min_mid_term_frames, defaults.max_mid_term_frames) == (
        5,
        30,
        5,
        10,
    )
    assert (defaults.num_prototypes, defaults.max_long_term_elements, defaults.deep_update_every) == (128, 10000, -1)
    assert defaults.enable_long_term and not defaults.enable_long_term_count_usage  # 80/5*128 < 10000


def test_other_sizes_variants_and_bad_inputs(monkeypatch):
    assert processing_size(480, 854) == (480, 854)
    assert processing_size(720, 1280) == (480, 853)
    assert processing_size(1080, 608) == (852, 480)

    seen = []
    real_step = InferenceCore.step

    def spy(self, image, mask=None, end=False):
        seen.append(tuple(image.shape[-2:]))
        return real_step(self, image, mask, end)

    monkeypatch.setattr(InferenceCore, "step", spy)
    model = XMem.tiny(seed=0)
    for (h, w), processed in [((50, 70), (64, 80)), ((496, 500), (480, 496))]:
        seen.clear()
        frames, mask = _video(2, h, w)
        out = propagate(model, frames, mask)
        assert out.shape == (2, h, w) and torch.equal(out[0], torch.from_numpy(mask).float())
        assert seen == [processed, processed]  # resized to short side 480 if larger, padded to /16

    frames, mask = _video(5)
    for variant in (XMem.tiny(seed=0, hidden_dim=0), model):
        out = propagate(variant, frames, mask, deep_update_every=2, mem_every=2)
        assert torch.isfinite(out).all() and out.shape == (5, H, W)
    with pytest.raises(ValueError, match="uint8"):
        propagate(model, frames.astype(np.float32), mask)
    with pytest.raises(ValueError, match="first_mask"):
        propagate(model, frames, mask[:10])


def test_models_xmem_imports_only_torch_side_code():
    banned = {"prefect", "storage", "tasks", "flows", "torchvision"}
    root = Path(__file__).resolve().parents[1] / "models"
    for path in sorted(root.glob("xmem*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] in banned for n in names), (path.name, names)
