"""--report_to (common.trackers): a tracker that is not installed stops the run before anything loads; the last line names only used logs."""

from __future__ import annotations

import pytest
from accelerate.utils import LoggerType

import train_patchdpo
from common.errors import BadInputError
from common.trackers import check_report_to
from tests.kit.cli import bad_input_message
from tests.test_train_patchdpo import train_args


@pytest.fixture
def only_tensorboard_installed(monkeypatch):
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: [LoggerType.TENSORBOARD])


def test_a_tracker_that_is_not_installed_names_the_install(only_tensorboard_installed):
    with pytest.raises(BadInputError) as error:
        check_report_to("wandb")
    assert str(error.value) == "--report_to wandb: the wandb package is not installed: pip install wandb, or pass --report_to tensorboard"
    with pytest.raises(
        BadInputError, match=r"--report_to tensorbord: not a tracker accelerate knows; pass one of .*tensorboard, wandb.* or all"
    ):
        check_report_to("tensorbord")
    assert check_report_to("all") == check_report_to("tensorboard") == ["tensorboard"]


def test_train_refuses_a_missing_tracker_before_any_model_loads(
    tiny_models, tiny_pair_data, tmp_path, monkeypatch, only_tensorboard_installed
):
    monkeypatch.setattr("patchdpo.loop.load_training_models", lambda *a, **k: pytest.fail("models loaded before the tracker check"))
    message = bad_input_message(train_patchdpo.main, train_args(tiny_models, tiny_pair_data, tmp_path / "out", "--report_to", "wandb"))
    assert (
        message
        == "train_patchdpo.py: error: --report_to wandb: the wandb package is not installed: pip install wandb, or pass --report_to tensorboard"
    )
    assert not (tmp_path / "out").exists()


def test_the_last_line_names_only_the_logs_that_were_written(tiny_models, tiny_pair_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: [])  # --report_to all with no tracker installed
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, tmp_path / "none", "--report_to", "all", steps=1))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"adapter checkpoints: {(tmp_path / 'none').resolve()}/checkpoint-*/model.bin"
    assert not (tmp_path / "none" / "logs").exists()
    monkeypatch.undo()
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, tmp_path / "tb", steps=1))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(f"model.bin, TensorBoard logs: {(tmp_path / 'tb').resolve() / 'logs'}") and (tmp_path / "tb" / "logs").is_dir()
