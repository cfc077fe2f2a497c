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
