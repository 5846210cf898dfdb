"""The automatic choice: picks and flags as designed on constructed scores."""

import pytest

from imagic import make_config
from imagic.engine.selection import select

CONFIG = make_config(select_min_edit=0.1, select_min_fidelity=0.6, select_min_reconstruction=0.8)


def scores(**by_eta):
    return {(float(eta[2:].replace("_", ".")), 0): {"edit": e, "fidelity": f} for eta, (e, f) in by_eta.items()}


def test_picks_the_best_sum_among_outputs_that_pass_both_thresholds():
    chosen = select(scores(e_0_8=(0.05, 0.95), e_1_0=(0.3, 0.7), e_1_2=(0.5, 0.65), e_1_4=(0.9, 0.3)), 0.9, CONFIG)
    assert (chosen.verdict, chosen.eta, chosen.seed) == ("selected", 1.2, 0)


def test_ties_go_to_the_smaller_eta_then_seed():
    tied = {(1.2, 1): {"edit": 0.3, "fidelity": 0.8}, (1.0, 1): {"edit": 0.3, "fidelity": 0.8},
            (1.0, 0): {"edit": 0.3, "fidelity": 0.8}}
    assert (select(tied, 0.9, CONFIG).eta, select(tied, 0.9, CONFIG).seed) == (1.0, 0)


@pytest.mark.parametrize("outputs, reconstruction, reason", [
    ({"e_1_0": (0.3, 0.9)}, 0.5, "η=0 does not reproduce the input"),
    ({"e_1_0": (0.05, 0.9), "e_1_2": (0.08, 0.9)}, 0.9, "no output edits enough (best edit score 0.080"),
    ({"e_1_0": (0.3, 0.5), "e_1_2": (0.05, 0.9)}, 0.9, "no output edits enough without losing the input"),
    ({}, 0.9, "not scored"),
])
def test_flags_needs_review_with_the_reason(outputs, reconstruction, reason):
    chosen = select(scores(**outputs), reconstruction, CONFIG)
    assert chosen.verdict == "needs_review" and chosen.eta is None
    assert reason in chosen.reason


def test_without_an_eta_zero_check_the_rest_of_the_rule_still_applies():
    assert select(scores(e_1_0=(0.3, 0.9)), None, CONFIG).verdict == "selected"


def test_thresholds_come_from_the_config():
    outputs = scores(e_1_0=(0.3, 0.7))
    assert select(outputs, 0.9, CONFIG).verdict == "selected"
    assert select(outputs, 0.9, make_config(select_min_fidelity=0.75)).verdict == "needs_review"


def test_relative_fidelity_judges_outputs_against_the_eta_zero_render():
    # Every output loses what η=0 loses (the VAE, the inversion): 0.72 of a 0.8 reconstruction is 0.9 of it.
    outputs = scores(e_1_0=(0.3, 0.72))
    absolute = make_config(select_min_edit=0.1, select_min_fidelity=0.85, select_min_reconstruction=0.5)
    relative = absolute.model_copy(update={"select_fidelity": "relative"})
    assert select(outputs, 0.8, absolute).verdict == "needs_review"
    assert (select(outputs, 0.8, relative).verdict, select(outputs, 0.8, relative).eta) == ("selected", 1.0)
    low = select(scores(e_1_0=(0.3, 0.6)), 0.8, relative)
    assert low.verdict == "needs_review" and "relative to η=0's" in low.reason and "0.750" in low.reason
