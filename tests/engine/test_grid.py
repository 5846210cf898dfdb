"""The η and seed rules (imagic/engine/grid.py): what every layer accepts, and the interpolation they index."""

import pytest
import torch

from imagic.engine.grid import check_grid, check_image_etas, interpolate


@pytest.mark.parametrize(
    "etas, seeds, message",
    [([], [0], "etas: "), ([0.5], [], "seeds: "), ([2.5], [0], r"etas: .*got \[2.5\]"),
     ([-0.1], [0], r"etas: .*\[0, 2\]"), ([0.5], [-1], r"seeds: .*integers in \[0, "),
     ([0.5], [2**63], r"seeds: .*9223372036854775807\]"), ([0.5, 0.5], [0], "etas: .*distinct"),
     ([0.5], [1.5], "seeds: .*integers")],
)
def test_bad_grid(etas, seeds, message):
    """The same rules, and words, as a manifest's (one annotated type in imagic/engine/grid.py)."""
    with pytest.raises(ValueError, match=message):
        check_grid(etas, seeds)


def test_grid_allows_eta_past_one():
    check_grid([0.0, 1.0, 1.2, 2.0], [0, 7])


def test_eta_zero_is_rendered_beside_scored_outputs_only_when_missing():
    assert check_image_etas([0.8, 1.0], scored=True) == [0.0]
    assert check_image_etas([0.0, 1.0], scored=True) == []
    assert check_image_etas([0.8, 1.0], scored=False) == []


def test_eta_zero_is_e_opt_and_eta_one_is_e_tgt_exactly():
    e_tgt, e_opt = torch.randn(1, 8, 32), torch.randn(1, 8, 32)
    assert torch.equal(interpolate(e_tgt, e_opt, 0.0), e_opt)
    assert torch.equal(interpolate(e_tgt, e_opt, 1.0), e_tgt)
    assert torch.allclose(interpolate(e_tgt, e_opt, 0.25), 0.25 * e_tgt + 0.75 * e_opt)
