"""Hostile config files: YAML aliases (billion laughs), huge or deep files, empty configs.

Every case goes through the CLI (`audioscenic run cfg.yaml`) and must be refused with
exit 2 and a one-line error naming the file, before anything is expanded or run.
"""
from __future__ import annotations

import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from flows.cli import main
from tasks.config import MAX_CONFIG_BYTES, Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]

# Nine levels of nine-fold aliases: 9**9 (~387 million) strings once expanded.
BOMB = ("{l0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol], "
        + ", ".join(f"l{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9))
        + ", l9: [" + ", ".join(["*a8"] * 9) + "]}")
MARK = "BOMB_GOES_HERE"


def _types(annotation) -> list:
    """The concrete types inside Optional/Union/Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _types(a)]
    return [annotation]


def _is_model(t) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def bomb_sites(model: type[BaseModel] = Config, prefix: tuple = ()) -> list[tuple]:
    """Key paths where a value can go: every field of every section (scalars too), an entry of every
    dict-typed field, an item (and an item's field) of every list field. A `0` step is a list index."""
    sites = []
    for name, field in model.model_fields.items():
        path = prefix + (name,)
        sites.append(path)
        for t in _types(field.annotation):
            origin, args = typing.get_origin(t), typing.get_args(t)
            if _is_model(t):
                sites.extend(bomb_sites(t, path))
            elif origin is dict:
                sites.append(path + ("x",))
                value = _types(args[1])
                if any(typing.get_origin(v) is dict for v in value):
                    sites.append(path + ("x", "y"))
                for v in value:
                    if _is_model(v):
                        sites.extend(bomb_sites(v, path + ("x",)))
            elif origin is list:
                sites.append(path + (0,))
                for v in _types(args[0]):
                    if _is_model(v):
                        sites.extend(bomb_sites(v, path + (0,)))
    return sorted(set(sites), key=str)


def _document(site: tuple) -> str:
    node: typing.Any = MARK
    for step in reversed(site):
        node = [node] if step == 0 else {step: node}
    return yaml.safe_dump(node, default_flow_style=False).replace(MARK, BOMB)


def test_the_sites_cover_every_mapping_field():
    sites = {".".join(map(str, s)) for s in bomb_sites()}
    for expected in ("storage.storage_options", "storage.storage_options.x", "grid.subsets.x",
                     "grid.subsets.x.pairs", "grid.source_audio.x", "variants.x", "variants.x.y",
                     "stages.video.xmem.x", "catalogs.videos.0", "catalogs.audio.0.root", "models.paths.base"):
        assert expected in sites, expected
    assert len(sites) > 100


def test_billion_laughs_is_refused_everywhere_within_a_second(tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    for site in bomb_sites():
        config.write_text(_document(site))
        assert yaml.safe_load(config.read_text()) is not None  # the plain loader would expand it
        started = time.perf_counter()
        code = main(["run", str(config)])
        elapsed = time.perf_counter() - started
        err = capsys.readouterr().err
        where = ".".join(map(str, site))
        assert code == 2, where
        assert elapsed < 1.0, (where, elapsed)
        assert err.count("\n") == 1 and str(config) in err and "anchors or aliases" in err, (where, err)


def test_billion_laughs_through_the_console_script(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(_document(("storage", "storage_options", "x")))
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config)], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {config}: line 3,") and done.stderr.count("\n") == 1, done.stderr
    assert "YAML anchor &a0 refused" in done.stderr


def test_aliases_in_set_values_are_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"catalogs": {"audio": [{"kind": "folder", "root": "clips"}]}}))
    with pytest.raises(SystemExit) as e:
        main(["run", str(config), "--set", f"storage.storage_options={BOMB}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--set storage.storage_options" in err and "anchors or aliases" in err
    with pytest.raises(SystemExit) as e:
        main(["status", str(config), "--set", "no-equals-sign"])
    assert e.value.code == 2 and "--set expects key=value" in capsys.readouterr().err
    assert main(["run", str(config), "--set", "catalogs.audio.root=x"]) == 2  # audio is a list
    assert "--set catalogs.audio.root: catalogs.audio is a value, not a section" in capsys.readouterr().err


def test_oversized_deep_and_binary_configs(tmp_path, capsys):
    config = tmp_path / "big.yaml"
    # Valid YAML (comments), just too much of it: refused by size, not parsed.
    line = "# padding padding padding padding padding padding padding padding padding\n"
    config.write_text("workdir: w\n" + line * (MAX_CONFIG_BYTES // len(line) + 1))
    started = time.perf_counter()
    assert main(["run", str(config)]) == 2
    assert time.perf_counter() - started < 1.0
    assert f"{config}: larger than 1024 KiB" in capsys.readouterr().err

    config.write_text("storage: {storage_options: {x: " + "[" * 5000 + "]" * 5000 + "}}\n")
    assert main(["run", str(config)]) == 2
    assert "nested more than 64 levels deep" in capsys.readouterr().err

    config.write_bytes(b"workdir: \xff\xfe\n")
    assert main(["run", str(config)]) == 2
    assert f"{config}: not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "{}\n", "# nothing but a comment\n", "catalogs: {videos: [], audio: []}\n"])
def test_a_config_without_catalogs_is_exit_2(tmp_path, capsys, text):
    config = tmp_path / "empty.yaml"
    config.write_text(text)
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}: no catalogs" in err and err.count("\n") == 1
    assert not (tmp_path / "work").exists()  # nothing was run
    with pytest.raises(ConfigError, match="no catalogs"):
        load_config(config)
    assert load_config(config, require_catalogs=False).catalogs.videos == []  # `edit --config` takes it


def test_shipped_configs_still_load():
    for name in ("demo.yaml", "paper.yaml"):
        assert load_config(REPO / "configs" / name).catalogs.videos


def test_configs_the_tool_writes_load_back(tmp_path):
    from tasks.config import dump_yaml

    subset = {"videos": ["v"]}
    data = {"catalogs": {"audio": [{"kind": "folder", "root": "a"}]}, "grid": {"subsets": {"x": subset, "y": subset}}}
    assert "&id" in yaml.safe_dump(data)  # one object twice: safe_dump writes an alias, which is refused
    config = tmp_path / "c.yaml"
    config.write_text(dump_yaml(data))
    assert load_config(config).grid.subsets["y"].videos == ["v"]
