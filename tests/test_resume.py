"""Where a training run starts: a resume reads no code, a damaged state is one line, a run's folder is never silently reused.

One finished 2-step run (a training state at steps 1 and 2, its TensorBoard logs) is trained once per
module and copied fresh into each test (`run_copy`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_patchdpo
from common.training_state import TRAINING_STATE_DIR
from patchdpo import loop
from patchdpo.models import ADAPTER_STATE_NAME
from tests.kit.cli import bad_input_message
from tests.kit.planted import plant_pickle
from tests.test_train_patchdpo import train_args

CHECKPOINTING = ("--checkpointing_steps", "1", "--save_steps", "1")


@pytest.fixture(scope="module")
def finished_run(tiny_models, tiny_pair_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, out, *CHECKPOINTING, steps=2))
    return out


@pytest.fixture()
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)  # copy2: the files keep their modification times
    return out


@pytest.fixture()
def resume_argv(tiny_models, tiny_pair_data, run_copy):
    def argv(resume_from: str, steps: int = 3, *extra: str) -> list[str]:
        return [
            *train_args(tiny_models, tiny_pair_data, run_copy, *CHECKPOINTING, *extra, steps=steps),
            "--resume_from_checkpoint",
            resume_from,
        ]

    return argv


@pytest.fixture()
def no_model_loads(monkeypatch):
    monkeypatch.setattr(loop, "load_training_models", lambda *args, **kwargs: pytest.fail("a model loaded before the start was checked"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` (itself included) with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in [folder, *folder.rglob("*")]}


def adapter(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"checkpoint-{step}" / TRAINING_STATE_DIR / ADAPTER_STATE_NAME))


# ----------------------------------------------------------------------------------------------
# Nothing a resume reads runs code; a damaged state is one line


def test_pickles_planted_where_accelerate_looked_never_run(run_copy, resume_argv, tmp_path):
    marker = tmp_path / "code_ran"
    state = run_copy / "checkpoint-2" / TRAINING_STATE_DIR
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "scaler.pt"):  # accelerate's load_state reads these
        plant_pickle(state / name, marker)
    train_patchdpo.main(resume_argv("latest"))
    assert not marker.exists()
    assert (run_copy / "checkpoint-3" / "model.bin").is_file()


@pytest.mark.parametrize("damage", ["code-running pickle", "truncated"])
def test_every_file_of_a_state_damaged_or_replaced_is_a_one_line_refusal_naming_it(run_copy, resume_argv, tmp_path, damage):
    marker = tmp_path / "code_ran"
    state = run_copy / "checkpoint-2" / TRAINING_STATE_DIR
    files = sorted(path for path in state.iterdir() if path.is_file())
    assert len(files) >= 4
    for path in files:
        original = path.read_bytes()
        if damage == "truncated":
            path.write_bytes(original[: len(original) // 2])
        else:
            plant_pickle(path, marker)
        message = bad_input_message(train_patchdpo.main, resume_argv(str(run_copy / "checkpoint-2")))
        assert str(path) in message, message
        assert not marker.exists()
        path.write_bytes(original)
    assert not (run_copy / "checkpoint-3").exists()


# ----------------------------------------------------------------------------------------------
# --resume_from_checkpoint: latest, a checkpoint-N name inside --output_dir, or a path


def test_a_checkpoint_name_resumes_from_the_output_dir_and_redoes_the_later_steps_exactly(
    run_copy, finished_run, resume_argv, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the working folder holds no checkpoint-1
    train_patchdpo.main(resume_argv("checkpoint-1", steps=2))
    redone, original = adapter(run_copy, 2), adapter(finished_run, 2)
    assert redone.keys() == original.keys() and all(torch.equal(redone[k], original[k]) for k in original)


@pytest.mark.parametrize("resume_from", ["checkpoint-7", "/nowhere/checkpoint-7"])
def test_a_checkpoint_that_does_not_exist_is_one_line_listing_those_that_do(run_copy, resume_argv, no_model_loads, resume_from):
    before = snapshot(run_copy)
    message = bad_input_message(train_patchdpo.main, resume_argv(resume_from))
    assert "checkpoint-7" in message and "does not exist" in message and "checkpoint-1, checkpoint-2" in message, message
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("stop_step", [1, 2])
def test_a_resume_with_no_step_left_is_refused_before_any_model_loads(run_copy, resume_argv, no_model_loads, stop_step):
    message = bad_input_message(train_patchdpo.main, resume_argv("latest", steps=stop_step))
    assert "step 2" in message and f"--stop_step {stop_step}" in message and "--stop_step above 2" in message, message


def test_a_resume_whose_epoch_cap_leaves_no_step_is_refused(run_copy, resume_argv):
    message = bad_input_message(train_patchdpo.main, resume_argv("latest", 5, "--num_train_epochs", "1"))  # 5 pairs // 2 = 2 steps
    assert "step 2" in message and "--num_train_epochs 1" in message, message
    assert not (run_copy / "checkpoint-3").exists()


def test_latest_without_any_training_state_is_refused_not_restarted(tiny_models, tiny_pair_data, tmp_path, no_model_loads):
    out = tmp_path / "out"
    for step in (1, 2):  # a run saved without --checkpointing_steps: weights only
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "model.bin").write_bytes(b"weights")
    before = snapshot(out)
    argv = [*train_args(tiny_models, tiny_pair_data, out, steps=3), "--resume_from_checkpoint", "latest"]
    message = bad_input_message(train_patchdpo.main, argv)
    assert "checkpoint-1, checkpoint-2" in message and "--checkpointing_steps" in message and "--overwrite_output_dir" in message
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------------------
# A run's folder is never silently reused


def test_a_fresh_start_into_an_earlier_run_is_refused_and_touches_nothing(tiny_models, tiny_pair_data, run_copy, no_model_loads):
    before = snapshot(run_copy)
    argv = train_args(tiny_models, tiny_pair_data, run_copy, steps=1)
    argv[argv.index("--learning_rate") + 1] = "0.01"  # another run
    message = bad_input_message(train_patchdpo.main, argv)
    assert "holds checkpoint-1, checkpoint-2 and logs/patchdpo of an earlier run" in message, message
    assert "--resume_from_checkpoint latest" in message and "--overwrite_output_dir" in message
    assert snapshot(run_copy) == before


def test_overwrite_output_dir_starts_over_removing_only_the_earlier_checkpoints_and_logs(tiny_models, tiny_pair_data, run_copy):
    (run_copy / "notes.txt").write_text("mine")
    events = sorted((run_copy / "logs").rglob("events.out.tfevents.*"))
    argv = train_args(tiny_models, tiny_pair_data, run_copy, "--use_dpo_loss", "True", "--checkpointing_steps", "1", steps=1)
    train_patchdpo.main([*argv, "--overwrite_output_dir"])  # another loss: another run
    assert sorted(p.name for p in run_copy.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not any(path.exists() for path in events)
    assert len(list((run_copy / "logs").rglob("events.out.tfevents.*"))) == len(events)  # those of one start (scalars, hparams)
    assert (run_copy / "notes.txt").read_text() == "mine"
    argv[argv.index("--stop_step") + 1] = "2"
    train_patchdpo.main([*argv, "--resume_from_checkpoint", "latest"])  # the new run's own state, without the flag
    assert (run_copy / "checkpoint-2" / "model.bin").is_file()


def test_overwrite_output_dir_with_a_bad_input_removes_nothing(tiny_models, tiny_pair_data, run_copy):
    before = snapshot(run_copy)
    argv = [*train_args(tiny_models, tiny_pair_data, run_copy, steps=1), "--overwrite_output_dir", "--resolution", "31"]
    message = bad_input_message(train_patchdpo.main, argv)
    assert "--resolution 31" in message
    changed = {name for name in before.keys() | snapshot(run_copy).keys() if before.get(name) != snapshot(run_copy).get(name)}
    assert changed == {".run.lock"}  # rewritten by every start that claims the folder: it names the run that holds it


def test_overwrite_output_dir_contradicts_a_resume(tiny_models, tiny_pair_data, tmp_path, capsys):
    argv = [*train_args(tiny_models, tiny_pair_data, tmp_path / "out"), "--overwrite_output_dir", "--resume_from_checkpoint", "latest"]
    with pytest.raises(SystemExit) as raised:
        train_patchdpo.main(argv)
    assert raised.value.code == 2 and "--overwrite_output_dir" in capsys.readouterr().err
