"""Fault injection on the tiny models: bad inputs and broken outputs fail loudly and lose nothing.

Each test injects one fault of issue 14 (NaN or out-of-range quality maps, NaN / wiped checkpoints,
NaN losses and gradients, corrupt images, unusable output folders, live writers' temporary files,
boxes outside their photos, bad numeric flags, damaged training states, orphan temporary files) and
asserts the one-line `prog: error:` exit with code 2 (via `bad_input_message`) and that nothing
was written or lost.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import evaluate_dreambooth
import inference_dreambooth
import train_patchdpo
from common.io import atomic_path, remove_stale_temp_files
from common.run_lock import LOCK_NAME
from common.stop_signals import STOPPED_EXIT_CODE
from common.training_state import MANIFEST_NAME, SETTINGS_NAME, TENSORS_NAME, TRAINING_STATE_DIR, check_training_state
from dreambench.data import load_conditioning_images
from ip_adapter import load_ip_adapter_checkpoint
from patch_quality import convert_pkl, maps, ssl_train, visualize
from patch_quality.store import FORMAT_KEY, FORMAT_VALUE, QualityMaps
from patchdpo import method as method_module
from patchdpo.models import ADAPTER_STATE_NAME, adapter_weights, load_training_models
from patchdpo.step_guard import TrainingDivergedError
from stand_ins.pairs import save_pair_data
from tests.kit.cli import bad_input_message
from tests.test_train_patchdpo import LATENT, train_args
from training_data import construct

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO.parent / "shared" / "dreambench"
UNWRITABLE = Path("/proc/patchdpo_faults_out")  # /proc refuses new files even for root


def files_under(root: Path) -> list[str]:
    """The outputs under `root`: everything but the lock file a run holds while it owns the folder."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != LOCK_NAME) if root.exists() else []


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def orphan_temp(folder: Path, name: str) -> Path:
    """A temporary file as `atomic_path` names it, left by a process that no longer runs."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.pid{dead_pid()}@{os.uname().nodename.replace('.', '_')}.abc123.tmp{Path(name).suffix}"
    path.write_bytes(b"half written")
    return path


# ----------------------------------------------------------------------------------------------
# Finding 1: NaN or out-of-range quality maps


def write_maps(path: Path, edit: dict[str, float], metadata: dict[str, str] | None = None) -> None:
    """Rewrite a quality-map file with `edit[tensor name]` poked into [0, 0] (save_quality_maps refuses NaN)."""
    stored = QualityMaps.load(path)
    tensors = {}
    for sample, k in stored.keys():
        for role, tensor in zip(("reference_map", "generated_map"), stored.get(sample, k)):
            name = f"{sample}/{k}/{role}"
            if name in edit:
                tensor[0, 0] = edit[name]
            tensors[name] = tensor.half().contiguous()
    save_file(tensors, str(path), metadata={**stored.metadata, **(metadata or {}), FORMAT_KEY: FORMAT_VALUE})


@pytest.mark.parametrize("value, fragment", [(math.nan, "NaN/inf"), (3.0, "values in [0"), (-0.5, "values in [-0.5")])
def test_bad_quality_map_stops_training_before_any_step(tiny_models, tmp_path, value, fragment):
    data = save_pair_data(tmp_path / "data", 3, 32, LATENT)
    write_maps(data.quality_file, {"sample2/0/generated_map": value})
    out = tmp_path / "out"
    message = bad_input_message(train_patchdpo.main, train_args(tiny_models, data, out, "--use_dpo_loss", "True", "--save_steps", "1"))
    assert str(data.quality_file) in message and "sample 'sample2'" in message and "sample2/0/generated_map" in message
    assert fragment in message
    assert not list(out.glob("checkpoint-*"))


def test_signed_maps_accept_their_declared_range(tiny_models, tmp_path):
    data = save_pair_data(tmp_path / "data", 2, 32, LATENT)
    write_maps(data.quality_file, {"sample1/0/generated_map": -0.5}, {"signed": "true"})
    train_patchdpo.main(train_args(tiny_models, data, tmp_path / "out", "--use_dpo_loss", "True", steps=1))
    assert (tmp_path / "out" / "checkpoint-1" / "model.bin").is_file()
    write_maps(data.quality_file, {"sample1/0/reference_map": -0.5}, {"signed": "true"})  # reference maps are never signed
    message = bad_input_message(train_patchdpo.main, train_args(tiny_models, data, tmp_path / "out2", "--use_dpo_loss", "True"))
    assert "sample1/0/reference_map" in message


# ----------------------------------------------------------------------------------------------
# Item 2: a non-finite loss or gradient stops training before the optimizer step


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


@pytest.mark.parametrize("fault, accumulation", [("loss", 1), ("gradient", 1), ("loss", 2), ("gradient", 2)])
def test_non_finite_step_stops_before_the_optimizer_step_and_any_checkpoint(
    tiny_models, tiny_pair_data, tmp_path, monkeypatch, fault, accumulation
):
    """Checked once per optimizer step: a NaN in the first of two accumulated micro-batches is still caught before the step."""
    real = method_module.compute_loss
    calls = []

    def faulty(*args, **kwargs):
        output = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == accumulation + 1:  # the first micro-batch of step 2
            output = output._replace(loss=output.loss * math.nan if fault == "loss" else _NaNGradient.apply(output.loss))
        return output

    monkeypatch.setattr(method_module, "compute_loss", faulty)
    out = tmp_path / "out"
    # --logging_steps 10: the old check ran only when logging, after checkpoint-2 was saved.
    extra = ("--use_dpo_loss", "True", "--save_steps", "1", "--logging_steps", "10", "--gradient_accumulation_steps", str(accumulation))
    argv = train_args(tiny_models, tiny_pair_data, out, *extra, steps=3, batch=2 // accumulation)
    message = bad_input_message(train_patchdpo.main, argv, exit_code=TrainingDivergedError.exit_code)
    assert f"step 2: non-finite {fault}" in message and "sample" in message and "(index " in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    state = torch.load(out / "checkpoint-1" / "model.bin", weights_only=True)
    assert all(torch.isfinite(t).all() for section in state.values() for t in section.values())


# ----------------------------------------------------------------------------------------------
# Finding 2: NaN or wiped checkpoints, NaN or negative --scale


def broken_checkpoint(tiny_models, tmp_path: Path, how: str) -> Path:
    checkpoint = load_ip_adapter_checkpoint(tiny_models.ip_ckpt)
    if how == "nan":
        key = sorted(checkpoint["ip_adapter"])[0]
        checkpoint["ip_adapter"][key][0] = math.nan
    else:
        checkpoint["image_proj"] = {k: torch.zeros_like(v) for k, v in checkpoint["image_proj"].items()}
    path = tmp_path / f"{how}.bin"
    torch.save(checkpoint, path)
    return path


def inference_argv(tiny_models, out: Path, *extra: str, ip_ckpt: Path | None = None, data_root: Path = DREAMBENCH) -> list[str]:
    return [
        "--base_model_path", str(tiny_models.sdxl_dir), "--image_encoder_path", str(tiny_models.image_encoder_dir),
        "--ip_ckpt", str(ip_ckpt or tiny_models.ip_ckpt), "--data_root", str(data_root), "--output_dir", str(out),
        "--subjects", "backpack", "--prompts_per_subject", "1", "--num_inference_steps", "1", "--height", "32", "--width", "32",
        *extra,
    ]  # fmt: skip


def construct_argv(tiny_models, out: Path, *extra: str, ip_ckpt: Path | None = None) -> list[str]:
    return [
        "--base_model_path", str(tiny_models.sdxl_dir), "--image_encoder_path", str(tiny_models.image_encoder_dir),
        "--ip_ckpt", str(ip_ckpt or tiny_models.ip_ckpt), "--output_dir", str(out), "--num_samples", "1",
        "--num_inference_steps", "1", "--height", "32", "--width", "32",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("how, fragment", [("nan", "NaN/inf value"), ("zero", "'image_proj' is all zeros")])
def test_nan_or_wiped_checkpoint_is_refused_by_inference_construct_and_training(tiny_models, tiny_pair_data, tmp_path, how, fragment):
    ckpt = broken_checkpoint(tiny_models, tmp_path, how)
    message = bad_input_message(inference_dreambooth.main, inference_argv(tiny_models, tmp_path / "gen", ip_ckpt=ckpt))
    assert str(ckpt) in message and fragment in message
    assert files_under(tmp_path / "gen") == []
    message = bad_input_message(construct.main, construct_argv(tiny_models, tmp_path / "data", ip_ckpt=ckpt))
    assert str(ckpt) in message and fragment in message
    assert files_under(tmp_path / "data") == []
    message = bad_input_message(
        train_patchdpo.main, [*train_args(tiny_models, tiny_pair_data, tmp_path / "run"), "--pretrained_ip_adapter_path", str(ckpt)]
    )
    assert str(ckpt) in message and fragment in message
    assert files_under(tmp_path / "run") == []


@pytest.mark.parametrize("scale", ["nan", "inf", "-0.5"])
def test_bad_scale_is_refused_before_anything_is_written(tiny_models, tmp_path, scale):
    message = bad_input_message(inference_dreambooth.main, inference_argv(tiny_models, tmp_path / "gen", "--scale", scale))
    assert f"--scale must be finite and >= 0, got {float(scale)}" in message
    assert files_under(tmp_path / "gen") == []  # no run_config.json with "scale": NaN
    message = bad_input_message(construct.main, construct_argv(tiny_models, tmp_path / "data", "--scale", scale))
    assert "--scale must be finite and >= 0" in message
    assert files_under(tmp_path / "data") == []


# ----------------------------------------------------------------------------------------------
# Finding 3: bf16 training saves the starting image_proj bit for bit


def test_bf16_training_saves_the_starting_image_proj_exactly(tiny_models, tiny_pair_data, tmp_path):
    out = tmp_path / "out"
    extra = ("--use_dpo_loss", "True", "--mixed_precision", "bf16", "--checkpointing_steps", "1")
    # Accelerate fixes the precision once per process: run the script in its own.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = train_args(tiny_models, tiny_pair_data, out, *extra, steps=1)
    result = subprocess.run([sys.executable, "train_patchdpo.py", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    initial = load_ip_adapter_checkpoint(tiny_models.ip_ckpt)["image_proj"]
    saved = load_ip_adapter_checkpoint(out / "checkpoint-1" / "model.bin")["image_proj"]
    state = load_ip_adapter_checkpoint(out / "checkpoint-1" / TRAINING_STATE_DIR / ADAPTER_STATE_NAME)["image_proj"]
    assert [k for k in initial if not torch.equal(saved[k], initial[k].half())] == []
    assert [k for k in initial if not torch.equal(state[k], initial[k])] == []


def test_resume_saves_the_image_proj_of_the_training_state(tiny_models, tiny_pair_data, tmp_path):
    out = tmp_path / "out"
    argv = train_args(tiny_models, tiny_pair_data, out, "--checkpointing_steps", "1", steps=1)
    train_patchdpo.main(argv)
    other = load_ip_adapter_checkpoint(tiny_models.ip_ckpt)
    other["image_proj"] = {k: v * 2 for k, v in other["image_proj"].items()}
    torch.save(other, tmp_path / "other.bin")
    argv = train_args(tiny_models, tiny_pair_data, out, "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest", steps=2)
    argv[argv.index("--pretrained_ip_adapter_path") + 1] = str(tmp_path / "other.bin")
    message = bad_input_message(train_patchdpo.main, argv)  # another starting checkpoint is another run
    assert "pretrained_ip_adapter_sha256" in message and "checkpoint-1" in message
    # Loading a state makes its Resampler tensors the ones saved from then on, whatever the model started from.
    models = load_training_models(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tmp_path / "other.bin", "cpu", torch.float32)
    adapter_weights(models.model).load(out / "checkpoint-1" / TRAINING_STATE_DIR / ADAPTER_STATE_NAME)
    saved = load_ip_adapter_checkpoint(out / "checkpoint-1" / TRAINING_STATE_DIR / ADAPTER_STATE_NAME)["image_proj"]
    assert saved.keys() == models.model.adapter.image_proj_state.keys()
    assert all(torch.equal(saved[k], models.model.adapter.image_proj_state[k]) for k in saved)
    assert all(torch.equal(saved[k], v) for k, v in models.model.image_proj_model.state_dict().items())


def test_a_state_without_its_settings_is_refused(tiny_models, tiny_pair_data, fresh_run):
    (fresh_run / "checkpoint-1" / TRAINING_STATE_DIR / SETTINGS_NAME).unlink()
    argv = train_args(tiny_models, tiny_pair_data, fresh_run, "--use_dpo_loss", "True", "--resume_from_checkpoint", "latest", steps=2)
    message = bad_input_message(train_patchdpo.main, [*argv, "--checkpointing_steps", "1"])
    assert "--resume_from_checkpoint latest" in message and "damaged" in message  # the only state is incomplete
    message = bad_input_message(train_patchdpo.main, [*argv[:-2], "--resume_from_checkpoint", str(fresh_run / "checkpoint-1")])
    assert str(fresh_run / "checkpoint-1" / TRAINING_STATE_DIR / SETTINGS_NAME) in message and "missing" in message


# ----------------------------------------------------------------------------------------------
# Finding 4: a corrupt training image fails before the first step


def test_corrupt_generated_image_fails_before_any_checkpoint(tiny_models, tmp_path):
    data = save_pair_data(tmp_path / "data", 4, 32, LATENT)
    corrupt = next((data.root / "sample3").glob("*_gen_0.png"))
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    out = tmp_path / "out"
    message = bad_input_message(train_patchdpo.main, train_args(tiny_models, data, out, "--save_steps", "1", steps=2))
    assert str(corrupt) in message and "unreadable image" in message
    assert not list(out.glob("checkpoint-*"))


# ----------------------------------------------------------------------------------------------
# Finding 5: unusable output paths fail before any model loads, in every CLI


def _cli_cases(tiny_models, tmp_path: Path) -> dict[str, tuple]:
    """name -> (main, argv builder taking the output path, flag text)."""
    missing = str(tmp_path / "no_model")  # a model path that would fail if anything loaded before the output check
    return {
        "train": (
            train_patchdpo.main,
            lambda out: ["--pretrained_model_name_or_path", missing, "--image_encoder_path", missing,
                         "--data_root_path", missing, "--output_dir", str(out)],
        ),
        "inference": (inference_dreambooth.main, lambda out: inference_argv(tiny_models, out)),
        "construct": (construct.main, lambda out: construct_argv(tiny_models, out)),
        "maps": (maps.main, lambda out: ["--data_root", missing, "--backbone", missing, "--output", str(out / "maps.safetensors")]),
        "ssl_train": (ssl_train.main, lambda out: ["--backbone", missing, "--train_data", missing, "--output_dir", str(out)]),
        "visualize": (visualize.main, lambda out: ["--data_root", missing, "--output_dir", str(out)]),
        "convert_pkl": (convert_pkl.main, lambda out: [missing, str(out / "maps.safetensors"), "--data_root", missing]),
    }  # fmt: skip


@pytest.mark.parametrize("cli", ["train", "inference", "construct", "maps", "ssl_train", "visualize", "convert_pkl"])
@pytest.mark.parametrize("problem", ["is_a_file", "unwritable"])
def test_unusable_output_fails_first_in_every_cli(tiny_models, tmp_path, cli, problem):
    main, argv = _cli_cases(tiny_models, tmp_path)[cli]
    if problem == "is_a_file":
        out = tmp_path / "taken"
        out.write_text("not a folder")
        expected = str(out)
    else:
        out = UNWRITABLE
        expected = "cannot write in /proc"
    message = bad_input_message(main, argv(out))
    assert expected in message, message
    assert "no_model" not in message  # nothing was loaded or read before the output check
    assert files_under(tmp_path) == (["taken"] if problem == "is_a_file" else [])


@pytest.fixture()
def one_generation(tmp_path) -> Path:
    out = tmp_path / "gen"
    (out / "backpack").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(out / "backpack" / "a backpack in the jungle.png")
    return out


def evaluate_argv(out: Path, clip: Path, dino: Path) -> list[str]:
    return ["--output_dir", str(out), "--data_root", str(DREAMBENCH), "--clip_model", str(clip), "--dino_model", str(dino),
            "--device", "cpu", "--subjects", "backpack", "--allow_partial"]  # fmt: skip


def test_evaluation_checks_its_score_file_before_loading_models(one_generation, tiny_clip_path, tiny_dino_dir, monkeypatch):
    (one_generation / "all_score.json").mkdir()
    monkeypatch.setattr("dreambench.evaluation.load_clip", lambda *a: pytest.fail("a model loaded before the output check"))
    message = bad_input_message(evaluate_dreambooth.main, evaluate_argv(one_generation, tiny_clip_path, tiny_dino_dir))
    assert str(one_generation / "all_score.json") in message and "is a folder" in message


def test_failed_score_write_names_the_path_and_keeps_the_printed_scores(one_generation, tiny_clip_path, tiny_dino_dir, monkeypatch):
    def disk_full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("dreambench.evaluation.atomic_write_json", disk_full)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        message = bad_input_message(evaluate_dreambooth.main, evaluate_argv(one_generation, tiny_clip_path, tiny_dino_dir))
    assert str(one_generation / "all_score.json") in message and "No space left" in message
    printed = stdout.getvalue()
    assert "backpack" in printed and "dino_score: " in printed and "clipt_score: " in printed
    assert not (one_generation / "all_score.json").exists()


@pytest.mark.parametrize("script", ["construct", "maps", "inference", "evaluate"])
def test_a_file_size_limit_in_construct_maps_inference_and_evaluate_is_one_line(
    script, tiny_models, tiny_dinov2_dir, tiny_clip_path, tiny_dino_dir, one_generation, tmp_path
):
    """What each script writes first or largest (images, map parts, the score file) under `ulimit -f`: one line, exit 2."""
    if script == "maps":
        data = tmp_path / "data"
        construct.main(construct_argv(tiny_models, data))
        command, failing = ["-m", "patch_quality.maps", "--data_root", str(data), "--backbone", str(tiny_dinov2_dir), "--cpu"], data
        command += ["--resolution", "32", "--vae_scale_factor", "8"]
    elif script == "construct":
        command, failing = ["-m", "training_data.construct", *construct_argv(tiny_models, tmp_path / "data")], tmp_path / "data"
    elif script == "inference":
        command, failing = [str(REPO / "inference_dreambooth.py"), *inference_argv(tiny_models, tmp_path / "gen")], tmp_path / "gen"
    else:
        command = [str(REPO / "evaluate_dreambooth.py"), *evaluate_argv(one_generation, tiny_clip_path, tiny_dino_dir)]
        failing = one_generation / "all_score.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600, preexec_fn=_limited(100)
    )
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert f"cannot write {failing}" in errors[0] and "file too large" in errors[0], errors[0]


# ----------------------------------------------------------------------------------------------
# Finding 6: a starting run never deletes a live writer's temporary files

_WRITER = """
import sys
from pathlib import Path
from common.io import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"finished image")
    print("writing", flush=True)
    sys.stdin.readline()
"""


def test_live_writers_temp_files_survive_a_cleanup_orphans_do_not(tmp_path, caplog):
    target = tmp_path / "out" / "backpack" / "a.png"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        orphan = orphan_temp(target.parent, "b.png")
        removed = remove_stale_temp_files(tmp_path / "out", ["backpack"])
        assert removed == [orphan]
        assert f"pid {writer.pid}@" in caplog.text and "another run is writing" in caplog.text
    finally:
        writer.communicate("done\n", timeout=60)
    assert writer.returncode == 0
    assert target.read_bytes() == b"finished image"
    assert files_under(target.parent) == ["a.png"]


def test_own_temp_files_are_never_removed(tmp_path):
    with atomic_path(tmp_path / "x.png") as tmp:
        tmp.write_bytes(b"x")
        assert remove_stale_temp_files(tmp_path, ["."]) == []
    assert (tmp_path / "x.png").read_bytes() == b"x"


# ----------------------------------------------------------------------------------------------
# Finding 7: a DreamBench box outside its photo


def test_box_outside_its_photo_is_refused(tiny_models, tmp_path):
    root = tmp_path / "dreambench"
    for sub in ("dataset", "json_data"):
        (root / sub / "backpack").mkdir(parents=True)
    for photo in sorted((DREAMBENCH / "dataset" / "backpack").iterdir()):
        (root / "dataset" / "backpack" / photo.name).symlink_to(photo)
        box_file = DREAMBENCH / "json_data" / "backpack" / f"{photo.stem}.json"
        (root / "json_data" / "backpack" / box_file.name).write_text(box_file.read_text())
    bad = root / "json_data" / "backpack" / "02.json"
    bad.write_text(json.dumps({"mask": [{}, {"box": [700.0, 100.0, 900.0, 300.0]}]}))
    message = bad_input_message(inference_dreambooth.main, inference_argv(tiny_models, tmp_path / "gen", data_root=root))
    assert str(bad) in message and "lies outside its" in message
    assert files_under(tmp_path / "gen") == []
    with pytest.raises(ValueError, match="lies outside its"):
        load_conditioning_images(root, "backpack", kosmosg=False)


# ----------------------------------------------------------------------------------------------
# Finding 8: tracebacks that are now one-line errors; damaged states and orphans on resume


@pytest.mark.parametrize(
    "main, argv, fragment",
    [
        ("train", ["--resolution", "0"], "--resolution must be >= 1, got 0"),
        ("maps", ["--vae_scale_factor", "0"], "--vae_scale_factor must be >= 1, got 0"),
        ("maps", ["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
        ("construct", ["--reference_template", "a {object} on {surface}"], "unknown field {surface}"),
        ("construct", ["--reference_template", "a photo"], "must contain {object}"),
    ],
)
def test_bad_flags_are_one_line_errors(tiny_models, tiny_pair_data, tiny_dinov2_dir, tmp_path, main, argv, fragment):
    if main == "train":
        message = bad_input_message(train_patchdpo.main, train_args(tiny_models, tiny_pair_data, tmp_path / "out", *argv))
    elif main == "maps":
        message = bad_input_message(maps.main, ["--data_root", str(tiny_pair_data.root), "--backbone", str(tiny_dinov2_dir), *argv])
    else:
        message = bad_input_message(construct.main, construct_argv(tiny_models, tmp_path / "out", *argv))
    assert fragment in message
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("category, problem", [("x" * 300, "more than the 255"), ("cup\0", "NUL character"), ("cup/lid", "path separator")])
def test_a_category_that_cannot_name_a_file_is_refused_before_any_model_loads(tiny_models, tmp_path, monkeypatch, category, problem):
    categories = tmp_path / "categories.txt"
    categories.write_text(category + "\n")
    monkeypatch.setattr(
        construct, "load_generation_pipeline", lambda *args: pytest.fail("the model loaded before the categories were checked")
    )
    message = bad_input_message(construct.main, construct_argv(tiny_models, tmp_path / "out", "--categories", str(categories)))
    assert "cannot name a data file" in message and problem in message
    assert not (tmp_path / "out").exists()


@pytest.fixture()
def two_states(tiny_models, tiny_pair_data, tmp_path) -> Path:
    out = tmp_path / "out"
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, out, "--checkpointing_steps", "1", "--save_steps", "1"))
    return out


@pytest.mark.parametrize(
    "name, damage, fragment",
    [
        (TENSORS_NAME, b"", "sha256 differs"),
        (TENSORS_NAME, b"garbage, not safetensors", "sha256 differs"),
        (MANIFEST_NAME, b"{", "unreadable"),
    ],
)
def test_damaged_training_state(two_states, tiny_models, tiny_pair_data, caplog, name, damage, fragment):
    damaged = two_states / "checkpoint-2" / TRAINING_STATE_DIR / name
    damaged.write_bytes(damage)
    argv = train_args(tiny_models, tiny_pair_data, two_states, "--checkpointing_steps", "1", "--save_steps", "1", steps=3)
    explicit = [*argv, "--resume_from_checkpoint", str(two_states / "checkpoint-2")]
    message = bad_input_message(train_patchdpo.main, explicit)
    assert str(damaged) in message and fragment in message
    assert damaged.read_bytes() == damage and not (two_states / "checkpoint-3").exists()

    train_patchdpo.main([*argv, "--resume_from_checkpoint", "latest"])  # falls back to checkpoint-1 and redoes step 2
    assert "skipping a damaged training state" in caplog.text and str(damaged) in caplog.text
    check_training_state(two_states / "checkpoint-2" / TRAINING_STATE_DIR)  # rewritten whole
    assert (two_states / "checkpoint-3" / "model.bin").is_file()


def test_orphans_in_checkpoint_folders_are_removed_on_resume(two_states, tiny_models, tiny_pair_data):
    orphans = [
        orphan_temp(two_states / "checkpoint-1", "model.bin"),
        orphan_temp(two_states / "checkpoint-2" / TRAINING_STATE_DIR, TENSORS_NAME),
    ]
    partial = two_states / "checkpoint-2" / (TRAINING_STATE_DIR + ".partial")
    partial.mkdir()
    (partial / TENSORS_NAME).write_bytes(b"half")
    argv = train_args(tiny_models, tiny_pair_data, two_states, "--checkpointing_steps", "1", "--save_steps", "1", steps=3)
    train_patchdpo.main([*argv, "--resume_from_checkpoint", "latest"])
    assert not any(path.exists() for path in [*orphans, partial])
    assert not [p for p in two_states.rglob(".*.tmp*")]


def test_orphans_next_to_the_maps_file_are_removed(tmp_path, tiny_dinov2_dir):
    data = save_pair_data(tmp_path / "data", 1, 32, LATENT)
    orphans = [orphan_temp(data.root, "patch_quality.safetensors"), orphan_temp(data.root / maps.PARTS_DIR_NAME, "sample0.safetensors")]
    maps.main(["--data_root", str(data.root), "--backbone", str(tiny_dinov2_dir), "--cpu", "--resolution", "32", "--vae_scale_factor", "2"])
    assert not any(path.exists() for path in orphans)
    assert QualityMaps.load(data.quality_file).keys() == [("sample0", 0)]


# ----------------------------------------------------------------------------------------------
# The adapter starts from the checkpoint bit for bit, in every precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adapter_starts_bit_identical_to_the_checkpoint(tiny_models, dtype):
    """The UNet is cast to the compute dtype around the adapter; the trainable weights must not be rounded by it."""
    models = load_training_models(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", dtype)
    checkpoint = load_ip_adapter_checkpoint(tiny_models.ip_ckpt)["ip_adapter"]
    started = models.model.adapter_modules.state_dict()
    assert all(t.dtype == torch.float32 for t in checkpoint.values())  # an fp32 stand-in checkpoint
    assert [k for k in checkpoint if started[k].dtype != torch.float32 or not torch.equal(started[k], checkpoint[k])] == []
    assert models.model.unet.conv_in.weight.dtype == dtype


# ----------------------------------------------------------------------------------------------
# A run owns its output folder


def test_a_second_run_into_a_busy_output_folder_is_refused(tiny_models, tiny_pair_data, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from common.run_lock import claim_output_dir; claim_output_dir({str(out)!r}); print('held', flush=True); input()",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        message = bad_input_message(train_patchdpo.main, train_args(tiny_models, tiny_pair_data, out))
        assert f"{out} is in use by another run (pid {holder.pid} on " in message
        assert files_under(out) == []
    finally:
        holder.kill()
        holder.wait()
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, out))  # its holder died: the folder is free again
    assert (out / "checkpoint-2" / "model.bin").is_file()


# ----------------------------------------------------------------------------------------------
# A resume is the same run


@pytest.fixture(scope="module")
def resumable_run(tiny_models, tiny_pair_data, tmp_path_factory):
    """A finished 1-step run with a training state, copied fresh into each test (`fresh_run`)."""
    out = tmp_path_factory.mktemp("resumable") / "out"
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, out, "--use_dpo_loss", "True", "--checkpointing_steps", "1", steps=1))
    return out


@pytest.fixture()
def fresh_run(resumable_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(resumable_run, out)
    return out


def _grown_data(tiny_pair_data, tmp_path):
    """The same data plus one more sample folder, maps remade for all."""
    return save_pair_data(tmp_path / "grown", tiny_pair_data.num_samples + 1, 32, LATENT)


@pytest.mark.parametrize(
    "change, differing",
    [
        (("--learning_rate", "0.5", "--lr_scheduler", "linear"), ["learning_rate", "lr_scheduler", "schedule_total_steps"]),
        (("--train_batch_size", "1"), ["pairs_per_step"]),
        (("--seed", "7"), ["seed"]),
        (("--official_time_ids",), ["official_time_ids"]),
        ("grown data", ["num_pairs", "pairs_sha256", "quality_maps_sha256"]),
    ],
)
def test_resume_with_other_settings_is_refused_naming_each_difference(tiny_models, tiny_pair_data, fresh_run, tmp_path, change, differing):
    data = _grown_data(tiny_pair_data, tmp_path) if change == "grown data" else None
    argv = train_args(tiny_models, data or tiny_pair_data, fresh_run, steps=2)
    argv += ["--use_dpo_loss", "True", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"]
    if change != "grown data":
        argv += list(change)
    message = bad_input_message(train_patchdpo.main, argv)
    assert "cannot resume from" in message and "checkpoint-1" in message
    named = sorted(part.split(":")[0].strip() for part in message.split("(", 1)[1].split(")")[0].split("; "))
    assert [name for name in named if name] == differing, message
    assert not (fresh_run / "checkpoint-2").exists()


def test_a_deliberate_learning_rate_change_reaches_optimizer_schedule_and_logs(tiny_models, tiny_pair_data, fresh_run):
    argv = train_args(tiny_models, tiny_pair_data, fresh_run, steps=3)
    argv += ["--use_dpo_loss", "True", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"]
    argv[argv.index("--learning_rate") + 1] = "0.002"
    argv += ["--lr_scheduler", "linear", "--change_on_resume", "learning_rate", "lr_scheduler"]
    train_patchdpo.main(argv)
    state = fresh_run / "checkpoint-2" / TRAINING_STATE_DIR
    recorded = json.loads((state / MANIFEST_NAME).read_text())
    scheduler, optimizer = recorded["scheduler"], recorded["optimizer"]
    assert scheduler["base_lrs"] == [0.002]
    # linear decay over 3 steps: after step 2 the rate is 0.002 x 1/3 (the old schedule kept 1e-3, constant)
    assert optimizer["param_groups"][0]["lr"] == pytest.approx(0.002 / 3)
    assert json.loads((state / SETTINGS_NAME).read_text())["learning_rate"] == 0.002  # the next resume compares the new value
    runs = sorted((fresh_run / "logs").rglob("hparams.yml"), key=lambda path: float(path.parent.name))  # one per start, named by its time
    assert "learning_rate: 0.001\n" in runs[0].read_text() and "learning_rate: 0.002" in runs[-1].read_text()


# ----------------------------------------------------------------------------------------------
# A stop signal saves the step and the run resumes as if never stopped


def test_sigterm_mid_step_saves_and_the_resumed_run_equals_an_uninterrupted_one(tiny_models, tiny_pair_data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    base = ("--use_dpo_loss", "True", "--save_steps", "10")
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, straight, *base, steps=4))
    real, calls = method_module.compute_loss, []

    def signalled(*args, **kwargs):  # SIGTERM arrives in the middle of step 2 (between forward and backward)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(method_module, "compute_loss", signalled)
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as raised, contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stderr):
        train_patchdpo.main(train_args(tiny_models, tiny_pair_data, stopped, *base, steps=4))
    assert raised.value.code == STOPPED_EXIT_CODE
    assert "stopped by SIGTERM after step 2" in stderr.getvalue() and "--resume_from_checkpoint latest" in stderr.getvalue()
    assert sorted(p.name for p in stopped.glob("checkpoint-*")) == ["checkpoint-2"]
    check_training_state(stopped / "checkpoint-2" / TRAINING_STATE_DIR)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone after the run
    monkeypatch.setattr(method_module, "compute_loss", real)
    train_patchdpo.main([*train_args(tiny_models, tiny_pair_data, stopped, *base, steps=4), "--resume_from_checkpoint", "latest"])
    final, expected = (load_ip_adapter_checkpoint(out / "checkpoint-4" / "model.bin") for out in (stopped, straight))
    assert all(torch.equal(final["ip_adapter"][k], expected["ip_adapter"][k]) for k in expected["ip_adapter"])


# ----------------------------------------------------------------------------------------------
# Say what will happen


def test_start_up_says_how_many_steps_and_why_and_which_flag_is_ignored(tiny_models, tiny_pair_data, tmp_path, capsys, caplog):
    argv = train_args(tiny_models, tiny_pair_data, tmp_path / "out", "--num_train_epochs", "1", steps=5)  # 5 pairs // 2 = 2 steps
    train_patchdpo.main(argv)
    assert (
        "training 2 optimizer steps of 2 pairs (the epoch cap: --num_train_epochs 1 x 2 steps per epoch (5 pairs // 2 pairs per step) "
        "= 2 < --stop_step 5; the last checkpoint is checkpoint-2, pass --num_train_epochs 3 to reach --stop_step)"
    ) in capsys.readouterr().out
    assert "--patch_quality_file is ignored: --loss mse does not use quality maps" in caplog.text


# ----------------------------------------------------------------------------------------------
# Every write error is one line naming the file and the cause, exit 2, earlier outputs intact


def _limited(limit_bytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


@pytest.mark.parametrize(
    "extra, limit, failing, kept",
    [
        ((), 20_000, "checkpoint-2/model.bin", []),  # torch.save reports only "iostream error": the cause is diagnosed
        (("--save_steps", "1", "--checkpointing_steps", "1"), 1_000_000, "training_state.partial", ["checkpoint-1/model.bin"]),
    ],
)
def test_a_file_size_limit_while_saving_is_one_line(tiny_models, tiny_pair_data, tmp_path, extra, limit, failing, kept):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "train_patchdpo.py", *train_args(tiny_models, tiny_pair_data, out, *extra, steps=2)]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, preexec_fn=_limited(limit))
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert run.returncode == 2 and len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert f"train_patchdpo.py: error: cannot write {out}" in errors[0] and failing in errors[0] and "file too large" in errors[0]
    assert [p for p in out.rglob("*") if ".tmp" in p.name] == []
    for name in kept:
        torch.load(out / name, weights_only=True)  # what was saved before the failure is whole
