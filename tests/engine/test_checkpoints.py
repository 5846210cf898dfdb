"""A stopped edit resumes where it stopped: the loops it finished are not redone, the one it stopped in
continues from its step, and the result is the one an edit never stopped gives."""

import pytest
import torch

from imagic.engine.checkpoints import Checkpoints, Preempted


def stop_at(loop_step: tuple[str, int]):
    """`should_stop` that answers yes once the given loop reaches the given step."""
    seen = []

    def should_stop():
        seen.append(None)
        return len(seen) == loop_step[1] + (loop_step[0] == "finetune") * 6  # 6 embedding steps come first

    return should_stop


@pytest.mark.parametrize("preset, where", [("anchored", ("embedding", 4)), ("anchored", ("finetune", 3)),
                                           ("community", ("finetune", 2))])
def test_a_stopped_edit_resumes_to_the_edit_never_stopped(family_editor, scene, quick_config, preset, where,
                                                          monkeypatch):
    config = quick_config(preset)
    base = {name: value.clone() for name, value in family_editor.unet.state_dict().items()}
    whole = family_editor.edit(scene, "a blue circle", config, [0.0, 1.0], [0])

    saved = []
    stopping = Checkpoints(every_steps=2, save=lambda c: saved.append(c.to_bytes()), should_stop=stop_at(where))
    with pytest.raises(Preempted, match=f"step {where[1]} of 6 of base.{where[0]}"):
        family_editor.edit(scene, "a blue circle", config, [0.0, 1.0], [0], checkpoints=stopping)
    after = family_editor.unet.state_dict()  # the base weights back after the stop, no adapters left
    assert after.keys() == base.keys() and all(torch.equal(after[name], value) for name, value in base.items())

    resumed = Checkpoints.from_bytes(saved[-1], save=lambda c: None)
    assert resumed.resumed[f"base.{where[0]}"] == where[1]
    steps, loss = [], family_editor.denoising_loss
    monkeypatch.setattr(family_editor, "denoising_loss", lambda *a, **k: steps.append(1) or loss(*a, **k))
    again = family_editor.edit(scene, "a blue circle", config, [0.0, 1.0], [0], checkpoints=resumed)
    done_before = where[1] + 6 * (where[0] == "finetune")
    assert len(steps) == 12 - done_before  # the training steps before the stop are not redone
    assert torch.equal(again.e_opt, whole.e_opt)
    assert again.losses == whole.losses
    for key, image in whole.images.items():
        assert list(again.images[key].getdata()) == list(image.getdata())


def test_a_saved_state_that_does_not_fit_the_model_is_refused(editor, scene, quick_config):
    saved = []
    stopping = Checkpoints(save=lambda c: saved.append(c.to_bytes()), should_stop=lambda: True)
    with pytest.raises(Preempted):
        editor.edit(scene, "a blue circle", quick_config("anchored"), [1.0], [0], checkpoints=stopping)
    state = Checkpoints.from_bytes(saved[-1])
    state.loops["base.embedding"].params[0] = torch.zeros(3)
    with pytest.raises(ValueError, match="does not fit"):
        editor.edit(scene, "a blue circle", quick_config("anchored"), [1.0], [0], checkpoints=state)
