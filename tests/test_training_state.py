"""The training-state format (`common.training_state`, `common.tensor_tree`) on a tiny model: exact, checked, no pickle."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file, save_file

from common.checkpoints import find_resume_checkpoint
from common.errors import BadInputError
from common.tensor_tree import join_tensors, split_tensors
from common.training_state import (
    MANIFEST_NAME,
    TENSORS_NAME,
    TRAINING_STATE_DIR,
    Resumable,
    TrainedWeights,
    check_training_state,
    load_training_state,
    save_training_state,
)
from tests.kit.planted import plant_pickle

WEIGHTS = "weights.safetensors"


class Trainer:
    """A linear layer, AdamW, a warmup-cosine schedule and a CPU gradient scaler whose scale moves every step."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(4, 3)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.01)
        self.scheduler = get_scheduler("cosine", self.optimizer, num_warmup_steps=2, num_training_steps=10)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
        self.weights = TrainedWeights(
            WEIGHTS,
            save=lambda path: save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(path)),
            load=lambda path: self.model.load_state_dict(load_file(str(path))),
        )

    @property
    def resumable(self) -> Resumable:
        return Resumable(self.weights, self.optimizer, self.scheduler, self.scaler)

    def step(self, index: int) -> None:
        inputs = torch.Generator().manual_seed(index)  # the batch is keyed on the step, as training keys it on the pair
        x, y = torch.randn(8, 4, generator=inputs), torch.randn(8, 3, generator=inputs)
        self.scaler.scale(torch.nn.functional.mse_loss(self.model(x), y)).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


@pytest.fixture()
def saved(tmp_path) -> Path:
    """checkpoint-2 of a Trainer run (its training state), in `tmp_path/out`."""
    trainer = Trainer()
    for index in range(2):
        trainer.step(index)
    save_training_state(Accelerator(cpu=True), tmp_path / "out" / "checkpoint-2", trainer.resumable, 2, {"seed": 0})
    return tmp_path / "out" / "checkpoint-2"


def test_split_and_join_give_back_a_state_dict_bit_for_bit():
    trainer = Trainer()
    for index in range(3):
        trainer.step(index)
    for owner in (trainer.optimizer, trainer.scheduler, trainer.scaler):
        state = owner.state_dict()
        tensors: dict = {}
        tree = json.loads(json.dumps(split_tensors(state, "part", tensors)))  # through JSON text, as on disk
        back = join_tensors(tree, load_file_roundtrip(tensors))
        assert_identical(back, state)
    odd = {"floats": [0.1 + 0.2, -0.0, math.inf, 1e-300], "pair": (1, (2.5, None)), 7: "int key"}
    with pytest.raises(TypeError, match="all strings or all integers"):
        split_tensors(odd, "odd", {})
    del odd[7]
    back = join_tensors(json.loads(json.dumps(split_tensors(odd, "odd", {}))), {})
    assert back == odd and type(back["pair"]) is tuple and math.copysign(1, back["floats"][1]) == -1


def load_file_roundtrip(tensors: dict) -> dict:
    from safetensors.torch import load, save

    return load(save(tensors))


def assert_identical(a, b) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert a == b or (a != a and b != b)


def test_a_value_json_cannot_hold_exactly_is_refused_when_saving():
    with pytest.raises(TypeError, match="float32 cannot be stored"):
        split_tensors({"lr": np.float32(0.1)}, "optimizer", {})
    with pytest.raises(ValueError, match="are a .safetensors file"):
        TrainedWeights("weights.bin", print, print)


def test_a_resumed_run_continues_exactly_as_the_uninterrupted_one(saved):
    straight = Trainer()
    for index in range(4):
        straight.step(index)
    resumed = Trainer(seed=1)  # other starting weights: everything must come from the state
    checked = find_resume_checkpoint(saved.parent, "latest")
    assert load_training_state(checked, resumed.resumable) == 2
    for index in (2, 3):
        resumed.step(index)
    assert_identical(resumed.model.state_dict(), straight.model.state_dict())
    assert_identical(resumed.optimizer.state_dict(), straight.optimizer.state_dict())
    assert_identical(resumed.scheduler.state_dict(), straight.scheduler.state_dict())
    assert resumed.scaler.state_dict() == straight.scaler.state_dict() and straight.scaler.get_scale() != 2.0**8


def test_a_state_holds_no_pickle_and_lists_every_file_with_its_digest(saved):
    state = saved / TRAINING_STATE_DIR
    assert sorted(p.name for p in state.iterdir()) == sorted([MANIFEST_NAME, TENSORS_NAME, WEIGHTS, "settings.json"])
    manifest = json.loads((state / MANIFEST_NAME).read_text())
    assert manifest["step"] == 2 and sorted(manifest["files"]) == sorted([TENSORS_NAME, WEIGHTS, "settings.json"])
    assert manifest["optimizer"]["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.999]}
    assert not (saved / (TRAINING_STATE_DIR + ".partial")).exists()


@pytest.mark.parametrize("damage", ["truncated", "code-running pickle", "valid but other values"])
def test_a_damaged_or_changed_file_is_one_line_naming_it_and_runs_nothing(saved, tmp_path, damage):
    marker = tmp_path / "code_ran"
    state = saved / TRAINING_STATE_DIR
    for path in sorted(state.iterdir()):
        original = path.read_bytes()
        if damage == "truncated":
            path.write_bytes(original[: len(original) // 2])
        elif damage == "code-running pickle":
            plant_pickle(path, marker)
        elif path.suffix == ".safetensors":
            save_file({k: v + 1 for k, v in load_file(str(path)).items()}, str(path))
        elif path.name == MANIFEST_NAME:
            path.write_text(json.dumps({**json.loads(original), "step": 3}))  # the folder says checkpoint-2
        else:
            path.write_text(json.dumps({"seed": 1}))
        with pytest.raises(BadInputError) as raised:
            find_resume_checkpoint(saved.parent, str(saved))
        assert str(path) in str(raised.value) and "\n" not in str(raised.value)
        assert not marker.exists()
        path.write_bytes(original)
    check_training_state(state)


def test_latest_falls_back_past_a_damaged_state_naming_it(saved, caplog):
    newer = saved.with_name("checkpoint-3")
    shutil.copytree(saved, newer)
    manifest = json.loads((newer / TRAINING_STATE_DIR / MANIFEST_NAME).read_text())
    (newer / TRAINING_STATE_DIR / MANIFEST_NAME).write_text(json.dumps({**manifest, "step": 3}))
    (newer / TRAINING_STATE_DIR / TENSORS_NAME).write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(saved.parent, "latest").directory == saved
    assert f"skipping a damaged training state: {newer / TRAINING_STATE_DIR / TENSORS_NAME}" in caplog.text
    assert find_resume_checkpoint(saved.parent / "empty", "latest") is None  # a first start of a requeued job


def test_a_renamed_checkpoint_is_refused(saved):
    renamed = saved.rename(saved.with_name("checkpoint-5"))
    with pytest.raises(BadInputError, match="saved at step 2, but its folder is named checkpoint-5"):
        find_resume_checkpoint(renamed.parent, "checkpoint-5")


def test_a_state_saved_through_accelerate_s_pickles_is_refused_naming_its_weights(tmp_path):
    marker = tmp_path / "code_ran"
    state = tmp_path / "out" / "checkpoint-4" / TRAINING_STATE_DIR
    for name in ("optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"):
        plant_pickle(state / name, marker)
    save_file({"w": torch.zeros(1)}, str(state / "ip_adapter_state.safetensors"))
    with pytest.raises(BadInputError) as raised:
        find_resume_checkpoint(tmp_path / "out", "checkpoint-4")
    message = str(raised.value)
    assert "earlier version" in message and "custom_checkpoint_0.pkl, optimizer.bin, random_states_0.pkl" in message
    assert str(state / "ip_adapter_state.safetensors") in message and not marker.exists()


def test_a_state_whose_owners_differ_from_the_run_is_refused(saved):
    bare = Trainer()
    checked = find_resume_checkpoint(saved.parent, "latest")
    with pytest.raises(BadInputError, match="saved with a scaler state and this run has none"):
        load_training_state(checked, Resumable(bare.weights, bare.optimizer, bare.scheduler))
    other = TrainedWeights("other.safetensors", bare.weights.save, bare.weights.load)
    with pytest.raises(BadInputError, match=f"holds {WEIGHTS}, this trainer resumes from other.safetensors"):
        load_training_state(checked, Resumable(other, bare.optimizer, bare.scheduler, bare.scaler))
