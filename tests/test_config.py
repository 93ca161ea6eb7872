from pathlib import Path

import pytest

from tasks.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_validate():
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.models.preset == "toy" and demo.missing_weights() == []
    assert demo.workdir == (REPO / "work" / "demo").resolve()
    assert demo.catalogs.videos[0].root == (REPO / "work/demo/data/davis").resolve()
    paper = load_config(REPO / "configs" / "paper.yaml")
    assert paper.stages.audio.temperature == 0.25


def test_shipped_demo_config_is_what_the_demo_command_runs(tmp_path):
    """configs/demo.yaml and `audioscenic demo` (flows.cli.demo_config) run the same settings."""
    import yaml

    from flows.cli import demo_config

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(demo_config(tmp_path)))
    ours, shipped = load_config(tmp_path / "a.yaml"), load_config(REPO / "configs" / "demo.yaml")
    for part in ("models", "stages", "grid", "variants"):
        assert getattr(ours, part) == getattr(shipped, part), part


def test_paper_config_names_each_missing_weight():
    paper = load_config(REPO / "configs" / "paper.yaml")
    with pytest.raises(ConfigError) as e:
        paper.require_weights()
    for name in ("imagebind", "base", "controlnet", "grounding_dino", "sam", "xmem", "depth", "clip"):
        assert f"models.paths.{name}" in str(e.value)


def test_bad_fields_are_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stages:\n  audio:\n    temprature: 0.3\n    n_mels: -1\nmodels: {preset: huge}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert str(f) in msg
    assert "stages.audio.temprature: unknown field" in msg
    assert "stages.audio.n_mels: Input should be greater than 0" in msg
    assert "models.preset" in msg


def test_yaml_is_parsed_safely(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("workdir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_relative_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "c.yaml"
    f.write_text("workdir: out\ncatalogs:\n  audio: [{kind: folder, root: ../clips}]\nstorage: {store: 's3://b/x.zarr'}\n")
    cfg = load_config(f)
    assert cfg.workdir == tmp_path / "sub" / "out"
    assert cfg.catalogs.audio[0].root == tmp_path / "clips"
    assert cfg.store_url == "s3://b/x.zarr"
    assert cfg.ledger_url == str(tmp_path / "sub" / "out" / "ledger")


def test_overrides():
    cfg = load_config(REPO / "configs" / "demo.yaml", {"stages.audio.temperature": 0.5})
    assert cfg.stages.audio.temperature == 0.5
    with pytest.raises(ConfigError, match="stages.audio.temperature"):
        load_config(REPO / "configs" / "demo.yaml", {"stages.audio.temperature": "hot"})


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/c.yaml")


def test_top_level_must_be_mapping(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("- workdir\n- x\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f)
    assert config_from_dict(None).workdir.is_absolute()


def test_span_settings_and_the_retired_audio_frame_count():
    cfg = config_from_dict({})
    assert (cfg.stages.video.span, cfg.stages.video.max_seconds, cfg.stages.edit.audio_fit) == ("clip", 120.0, "pad")
    cfg = config_from_dict({"stages": {"video": {"span": "video", "max_seconds": 30}, "edit": {"audio_fit": "loop"}}})
    assert (cfg.stages.video.span, cfg.stages.video.max_seconds, cfg.stages.edit.audio_fit) == ("video", 30.0, "loop")
    # M_a / F_a follow each edit's span: a fixed audio frame count is an error that says so
    with pytest.raises(ConfigError, match=r"stages.audio: .*num_frames is no longer a setting.*remove stages.audio.num_frames"):
        config_from_dict({"stages": {"video": {"num_frames": 16}, "audio": {"num_frames": 16}}})
    with pytest.raises(ConfigError, match=r"stages.video.span: Input should be 'clip', 'video' or 'frames'"):
        config_from_dict({"stages": {"video": {"span": "all"}}})
    with pytest.raises(ConfigError, match=r"stages.video.max_seconds: Input should be greater than 0"):
        config_from_dict({"stages": {"video": {"max_seconds": 0}}})
    with pytest.raises(ConfigError, match=r"stages.edit.audio_fit: Input should be 'pad' or 'loop'"):
        config_from_dict({"stages": {"edit": {"audio_fit": "stretch"}}})
