import pytest

from zoomfeat.errors import ConfigError
from zoomfeat.mags import grid_width, mag_index, mag_name, parse_mag, parse_mags


@pytest.mark.parametrize(
    "text,value", [("20x", 20.0), ("2_5x", 2.5), ("2.5x", 2.5), ("0.15625x", 0.15625), ("5", 5.0), (10, 10.0)]
)
def test_parse_mag_accepts_canonical_and_underscore_forms(text, value):
    assert parse_mag(text) == value


@pytest.mark.parametrize("bad", ["40x", "abc", "", "3x"])
def test_parse_mag_rejects_unknown_with_the_list_of_valid_names(bad):
    with pytest.raises(ConfigError, match="unknown magnification.*20x, 10x"):
        parse_mag(bad)


def test_parse_mags_orders_finest_first_and_deduplicates():
    assert parse_mags("5x,20x,5x") == (20.0, 5.0)
    assert len(parse_mags("all")) == 8


def test_names_indices_and_grid_widths_follow_the_design():
    assert [mag_name(m) for m in parse_mags("all")] == [
        "20x", "10x", "5x", "2.5x", "1.25x", "0.625x", "0.3125x", "0.15625x"]
    assert [mag_index(m) for m in parse_mags("all")] == list(range(8))
    assert [grid_width(m) for m in parse_mags("all")] == [1, 2, 4, 8, 16, 32, 64, 128]


def test_magdict_keys_are_magnifications_parsed_once():
    from zoomfeat.mags import MagDict, Magnification

    d = MagDict({"20x": 1, 5.0: 2})
    d[Magnification("2.5x")] = 3
    d["2_5x"] = 4  # the same entry, written another way
    assert len(d) == 3 and d[20] == 1 and d["5x"] == 2 and d[2.5] == 4
    assert all(type(k) is Magnification for k in d) and [str(k) for k in d] == ["20x", "5x", "2.5x"]
    assert "10x" not in d and "bogus" not in d and d.get("10x", 9) == 9
    assert d == {"20x": 1, "5x": 2, "2.5x": 4} and d != {"20x": 1}
    with pytest.raises(KeyError):
        d["7x"]
    assert d.pop("5x") == 2 and list(d.copy()) == [20.0, 2.5]


def test_tile_grid_is_keyed_by_magnification():
    import numpy as np

    from zoomfeat.mags import Magnification
    from zoomfeat.tiling import grid_from_mask

    grid = grid_from_mask(2048, 1024, 20.0, ["5x", "20x"], None, 0.0)
    assert grid.mags == (20.0, 5.0) and all(type(m) is Magnification for m in grid.mags)
    assert all(type(m) is Magnification for m in grid.coords)
    assert grid.patch_size_level0[Magnification("5x")] == 1024 and len(grid.coords["5x"]) == 2
    np.testing.assert_array_equal(grid.parents["20x"]["5x"], np.repeat([0, 1], 16))
