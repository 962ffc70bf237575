"""The one-command demo, reduced in size: every stage runs through the real scripts and a report appears."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import demo
from ip_adapter.checkpoint import load_ip_adapter_checkpoint
from ip_adapter.xlabs import read_xlabs_file
from patch_quality.store import QualityMaps

REPO = Path(__file__).resolve().parents[1]

SHARED_DREAMBENCH = demo.DEFAULT_DATA_ROOT


@pytest.fixture(scope="module")
def demo_argv(tmp_path_factory) -> list[str]:
    return [
        "--output_dir",
        str(tmp_path_factory.mktemp("demo_out")),
        "--data_root",
        str(SHARED_DREAMBENCH),
        "--subjects",
        "backpack",
        "cat",
        "--train_subjects",
        "can",
        "dog",
        "--train_steps",
        "3",
        "--ssl_steps",
        "4",
        "--prompts_per_subject",
        "2",
        "--num_inference_steps",
        "2",
        "--size",
        "32",
        "--resolution",
        "32",
    ]


class DemoRun(NamedTuple):
    out: Path
    report: Path
    files: dict[str, object]  # `_digests` right after the run, before any test touches the folder


@pytest.fixture(scope="module")
def demo_run(demo_argv) -> DemoRun:
    out = Path(demo_argv[1])
    report = demo.main(demo_argv)
    return DemoRun(out, report, _digests(out))


def test_demo_writes_a_complete_report(demo_run) -> None:
    out, report, _ = demo_run
    text = report.read_text()
    assert report == out / "report.md"
    assert "| `num_threads` | `1` |" in text  # the tiny stand-ins run on one thread
    assert "tiny RANDOM models" in text and "--base_model_path" in text
    for figure in re.findall(r"\]\((figures/[^)]+)\)", text):
        assert (out / figure).is_file(), figure
    assert "figures/loss_curve.png" in text and "figures/compare_backpack.png" in text and "figures/compare_cat.png" in text
    assert len(re.findall(r"figures/overlay_sample\d+_gen_0\.png", text)) >= 1
    assert "subjects can, dog" in text and "disjoint subjects backpack, cat" in text
    assert re.search(r"Total wall time: \*\*\d+ s\*\*", text) and "| device | CPU" in text and "| torch |" in text
    assert "| `train_steps` | `3` |" in text and "does not mean it was reproduced" in text
    for label in ("IP-Adapter-Plus (start)", "PatchDPO (trained)"):
        assert re.search(
            rf"\| \*\*{re.escape(label)}\*\* \| \*\*mean\*\* \| \*\*[0-9.]+\*\* \| \*\*[0-9.]+\*\* \| \*\*-?[0-9.]+\*\* \|", text
        )


def test_demo_runs_each_stage_for_real(demo_run) -> None:
    out, _, _ = demo_run
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["samples"]) == 11  # 6 can + 5 dog photos
    assert {sample["object"] for sample in manifest["samples"]} == {"can", "dog"}
    assert (out / "data" / "patch_quality.safetensors").is_file()
    assert (out / "ssl" / "ssl_backbone.safetensors").is_file()
    assert (
        "top-1 patch matching between two augmented views (random crop, flip, colour jitter) of 12 held-out synthetic textures"
        in (out / "report.md").read_text()
    )
    trained = load_ip_adapter_checkpoint(out / "train" / "checkpoint-3" / "model.bin")
    initial = load_ip_adapter_checkpoint(out / "models" / "generator" / "ip-adapter-plus.bin")
    assert any(not trained["ip_adapter"][k].float().equal(initial["ip_adapter"][k].half().float()) for k in trained["ip_adapter"])
    for folder in ("dreambench_start", "dreambench"):
        scores = json.loads((out / folder / "all_score.json").read_text())
        assert set(scores["subjects"]) == {"backpack", "cat"}
        assert all(row["num_images"] == 2 for row in scores["subjects"].values())
    assert json.loads((out / "dreambench" / "run_config.json").read_text())["ip_ckpt"].endswith("checkpoint-3/model.bin")


def test_demo_refuses_training_on_evaluated_subjects(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--output_dir", str(tmp_path), "--subjects", "dog", "cat", "--train_subjects", "cat"])
    assert "overlap (['cat'])" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_demo_rejects_half_given_generator(tmp_path, tiny_models) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--output_dir", str(tmp_path), "--base_model_path", str(tiny_models.sdxl_dir)])
    assert not any(tmp_path.iterdir())


def test_a_command_from_the_report_redoes_its_stage(demo_run) -> None:
    """The report's maps command, copied and run from the same folder, remakes the same quality maps."""
    out, report, _ = demo_run
    block = re.search(r"## Commands\n.*?```bash\n(.*?)```", report.read_text(), flags=re.S).group(1).splitlines()
    stages = dict(zip(block[::2], block[1::2]))
    assert [stage[2:] for stage in stages][:3] == ["construct training pairs", "self-supervised patch features", "patch quality maps"]
    command = stages["# patch quality maps"]
    assert command.startswith("python -m patch_quality.maps --data_root ") and "--finetuned" in command
    before = QualityMaps.load(out / "data" / "patch_quality.safetensors")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(shlex.split(command.replace("python", sys.executable, 1)), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = QualityMaps.load(out / "data" / "patch_quality.safetensors")
    assert before.keys() == after.keys() and all(
        torch.equal(a, b) for key in before.keys() for a, b in zip(before.get(*key), after.get(*key))
    )


def test_the_demo_checks_every_model_it_was_given_before_the_first_stage(tmp_path, tiny_clip_path, capsys) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        demo.main(["--output_dir", str(out), "--clip_model", str(tiny_clip_path), "--dino_model", str(tmp_path / "no_dino")])
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"demo.py: error: --dino_model {tmp_path / 'no_dino'}: no such local path; {tmp_path} holds nothing"]
    assert not out.exists()


def test_the_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        demo.main(["--output_dir", str(tmp_path)])
    assert f"--output_dir {tmp_path} holds files the demo did not make (notes.txt): pass a new or empty folder" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == [".run.lock", "notes.txt"]


@pytest.mark.parametrize("generator, requested, expected", [(None, None, 1), ("sdxl", None, 2), (None, 3, 3)])
def test_the_demo_runs_tiny_models_on_one_thread(generator, requested, expected) -> None:
    """A second intra-op thread on a core another process keeps busy made the tiny-model demo 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = demo.build_parser().parse_args([] if generator is None else ["--base_model_path", generator])
        args.num_threads = requested
        demo.use_threads(args)
        assert torch.get_num_threads() == args.num_threads == expected
    finally:
        torch.set_num_threads(previous)


def _digests(out: Path) -> dict[str, object]:
    """Every file's bytes, except what records when or by which process it was made: run locks, TensorBoard
    event files, the input check's mtimes, the report's wall times. safetensors files count by tensors and
    metadata: safetensors writes metadata in hash-map order, which differs between processes, so the SSL
    backbone's bytes (and the maps file's record of them, `finetuned_sha256`) differ although nothing else does."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    digests: dict[str, object] = {}
    for path in sorted(out.rglob("*")):
        name = str(path.relative_to(out))
        if not path.is_file() or path.name in (".run.lock", ".checked_inputs.json", "report.md") or "/logs/" in f"/{name}":
            continue
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
            metadata.pop("finetuned_sha256", None)
            digests[name] = (metadata, {key: tensor.tolist() for key, tensor in load_file(str(path)).items()})
        else:
            digests[name] = path.read_bytes()
    return digests


def test_a_second_demo_run_in_the_same_folder_remakes_the_same_files(demo_run, demo_argv, capsys) -> None:
    out, _, before = demo_run
    (out / "train" / "checkpoint-3" / "stale.txt").write_text("left over")  # a rerun starts from scratch, not on top
    demo.main(demo_argv)
    assert f"{out} holds an earlier demo run: remaking every stage" in capsys.readouterr().out
    after = _digests(out)
    assert before.keys() == after.keys() and len(after) > 100
    assert [name for name in before if before[name] != after[name]] == []


def _run_small_demo(out: Path, base_model: str, size: int) -> tuple[Path, dict]:
    """Every demo stage on one family's stand-ins at the smallest sizes (one subject, 2 steps, images of `size` px).

    Returns the generator's model folder and the pair manifest, what each family's test checks its stages against.
    """
    demo.main(
        ["--base_model", base_model, "--output_dir", str(out), "--data_root", str(SHARED_DREAMBENCH), "--subjects", "backpack"]
        + ["--train_subjects", "can", "--train_steps", "2", "--ssl_steps", "0", "--prompts_per_subject", "1"]
        + ["--num_inference_steps", "2", "--size", str(size), "--resolution", str(size)]
    )
    return out / "models" / "generator", json.loads((out / "data" / "manifest.json").read_text())


def test_the_demo_runs_on_sd15_stand_ins(tmp_path) -> None:
    """`--base_model sd15`: every stage on the tiny SD 1.5 stand-ins (`python demo.py` itself stays on SDXL)."""
    out = tmp_path / "demo_sd15"
    generator, manifest = _run_small_demo(out, "sd15", size=32)
    assert manifest["complete"] and manifest["settings"]["base_model_path"] == str((generator / "sd15").resolve())
    assert QualityMaps.load(out / "data" / "patch_quality.safetensors").metadata["vae_scale_factor"] == "4"  # SD 1.5 stand-in's grid
    trained = load_ip_adapter_checkpoint(out / "train" / "checkpoint-2" / "model.bin")
    initial = load_ip_adapter_checkpoint(generator / "models" / "ip-adapter-plus_sd15.bin")
    assert trained["ip_adapter"].keys() == initial["ip_adapter"].keys()
    assert any(not trained["ip_adapter"][k].float().equal(initial["ip_adapter"][k].half().float()) for k in trained["ip_adapter"])
    for folder in ("dreambench_start", "dreambench"):
        assert json.loads((out / folder / "all_score.json").read_text())["subjects"]["backpack"]["num_images"] == 1


def test_the_demo_runs_on_flux_stand_ins(tmp_path) -> None:
    """`--base_model flux`: every stage, training included, on the tiny FLUX.1-dev + XLabs-layout stand-ins."""
    out = tmp_path / "demo_flux"
    generator, manifest = _run_small_demo(out, "flux", size=64)
    assert manifest["complete"] and manifest["settings"]["base_model_path"] == str((generator / "flux").resolve())
    assert manifest["settings"]["guidance_scale"] == 3.5  # FLUX's embedded guidance, not the UNet families' 5.0
    assert QualityMaps.load(out / "data" / "patch_quality.safetensors").metadata["vae_scale_factor"] == "8"  # FLUX's VAE grid
    trained = read_xlabs_file(out / "train" / "checkpoint-2" / "ip_adapter.safetensors")
    initial = read_xlabs_file(generator / "ip_adapter.safetensors")
    assert trained.keys() == initial.keys()
    assert any(not trained[key].equal(initial[key].to(trained[key].dtype)) for key in trained)
    for folder in ("dreambench_start", "dreambench"):
        assert json.loads((out / folder / "all_score.json").read_text())["subjects"]["backpack"]["num_images"] == 1


def test_the_stand_in_family_goes_with_no_model_path(tmp_path, tiny_sd15_models, capsys) -> None:
    with pytest.raises(SystemExit):
        demo.main(
            ["--output_dir", str(tmp_path), "--base_model", "sd15", "--base_model_path", str(tiny_sd15_models.sd15_dir)]
            + ["--image_encoder_path", str(tiny_sd15_models.image_encoder_dir), "--ip_ckpt", str(tiny_sd15_models.ip_ckpt)]
        )
    assert "--base_model picks a stand-in" in capsys.readouterr().err and not any(tmp_path.iterdir())
