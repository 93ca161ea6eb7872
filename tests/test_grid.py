import pytest

from tasks.catalog import Catalog
from tasks.config import ConfigError, config_from_dict
from tasks.grid import select_pairs, source_audio


def catalog():
    entries = [{"id": v, "media": "video", "label": v} for v in ("bear", "car")]
    labels = {"r1": "rain", "r2": "rain", "r3": "rain", "f1": "fire", "f2": "fire", "d1": "dog"}
    entries += [{"id": a, "media": "audio", "label": lab} for a, lab in labels.items()]
    return Catalog(entries=entries)


def cfg(grid):
    return config_from_dict({"grid": grid})


def test_all_by_all():
    pairs = select_pairs(cfg({}), catalog())
    assert len(pairs) == 2 * 6 and pairs[0] == ("bear", "r1") and pairs[-1] == ("car", "d1")


def test_named_subset_and_per_class():
    c = cfg({"selection": "small", "subsets": {"small": {"videos": ["car"], "per_class": 2}}})
    assert select_pairs(c, catalog()) == [("car", "r1"), ("car", "r2"), ("car", "f1"), ("car", "f2"), ("car", "d1")]
    c = cfg({"selection": "one", "subsets": {"one": {"audio": ["f2", "r3"], "per_class": 1}}})
    assert select_pairs(c, catalog()) == [("bear", "r3"), ("bear", "f2"), ("car", "r3"), ("car", "f2")]


def test_explicit_pairs_deduplicated():
    c = cfg({"selection": "p", "subsets": {"p": {"pairs": [["car", "d1"], ["bear", "r1"], ["car", "d1"]]}}})
    assert select_pairs(c, catalog()) == [("car", "d1"), ("bear", "r1")]


@pytest.mark.parametrize("grid, message", [
    ({"selection": "nope"}, "unknown subset 'nope'"),
    ({"selection": "s", "subsets": {"s": {"videos": ["bear", "cat"]}}}, "video(s) not in the catalog: cat"),
    ({"selection": "s", "subsets": {"s": {"pairs": [["bear", "zz"]]}}}, "clip(s) not in the catalog: zz"),
])
def test_unknown_ids_are_named(grid, message):
    with pytest.raises(ConfigError) as e:
        select_pairs(cfg(grid), catalog())
    assert message in str(e.value)


def test_source_audio():
    assert source_audio(cfg({}), catalog(), "bear") == "r1"
    c = cfg({"source_audio": {"car": "d1"}, "default_source_audio": "f1"})
    assert source_audio(c, catalog(), "car") == "d1" and source_audio(c, catalog(), "bear") == "f1"
    with pytest.raises(ConfigError, match="source audio for video 'bear'"):
        source_audio(cfg({"default_source_audio": "xx"}), catalog(), "bear")


def test_selected_clips_include_source_audio():
    from tasks.grid import selected_clips

    c = cfg({"selection": "s", "subsets": {"s": {"videos": ["car"], "audio": ["f1"]}}, "default_source_audio": "d1"})
    assert selected_clips(c, catalog()) == {"f1", "d1"}
    audio_only = Catalog(entries=[e for e in catalog().entries if e["media"] == "audio"])
    assert selected_clips(cfg({}), audio_only) == {"r1", "r2", "r3", "f1", "f2", "d1"}
