"""evaluate_dreambooth.py / dreambench.evaluation on tiny random CLIP and DINO over real DreamBench photos.

The expected scores are recomputed here one image at a time, straight from the formulas, with the
models loaded independently of the code under test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from transformers import ViTModel

from common.errors import BadInputError
from dreambench.benchmark import get_subject, prompts_for
from dreambench.evaluation import format_score_table, score_generations, write_scores
from dreambench.metrics import load_dino, resolve_clip_checkpoint

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import clip
    import clip.clip as clip_impl

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO.parent / "shared" / "dreambench"
SUBJECTS = ["backpack", "cat"]  # one object, one live subject keep the suite fast


def _write_generations(root: Path, subject: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder = root / subject
    folder.mkdir(parents=True, exist_ok=True)
    for prompt in prompts_for(subject):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{prompt}.png")


@pytest.fixture(scope="module")
def generations(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("generations")
    for seed, subject in enumerate(SUBJECTS):
        _write_generations(root, subject, seed)
    return root


def _copy_generations(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def original_scores(generations, tiny_clip_path, tiny_dino_dir, tmp_path_factory) -> tuple[Path, dict]:
    output_dir = _copy_generations(generations, tmp_path_factory.mktemp("original") / "gen")
    return output_dir, _evaluate(output_dir, tiny_clip_path, tiny_dino_dir, False)


@pytest.fixture(scope="module")
def kosmosg_scores(generations, tiny_clip_path, tiny_dino_dir, tmp_path_factory) -> tuple[Path, dict]:
    output_dir = _copy_generations(generations, tmp_path_factory.mktemp("kosmosg") / "gen")
    return output_dir, _evaluate(output_dir, tiny_clip_path, tiny_dino_dir, True)


@torch.no_grad()
def _expected_scores(generation_dir: Path, clip_path: Path, dino_dir: Path, kosmosg: bool) -> dict[str, dict]:
    """Straightforward per-image computation of CLIP-T, CLIP-I and DINO, mean per subject."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        clip_model, clip_preprocess = clip.load(str(clip_path), device="cpu", jit=False)
    dino = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
    dino_preprocess = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )

    def clip_image(path):
        feature = clip_model.encode_image(clip_preprocess(Image.open(path)).unsqueeze(0))[0]
        return feature / feature.norm()

    def clip_text(prompt):
        feature = clip_model.encode_text(clip.tokenize([prompt], truncate=True))[0]
        return feature / feature.norm()

    def dino_image(path):
        pixel_values = dino_preprocess(Image.open(path).convert("RGB")).unsqueeze(0)
        feature = dino(pixel_values=pixel_values).last_hidden_state[0, 0]
        return feature / feature.norm()

    results = {}
    for subject in sorted(p.name for p in generation_dir.iterdir() if p.is_dir()):
        generated = sorted((generation_dir / subject).iterdir())
        photo_dir = DREAMBENCH / "dataset" / subject
        if kosmosg:
            references = [photo_dir / f"{get_subject(subject).kosmosg_image}.jpg"]
        else:
            references = sorted(photo_dir.glob("*.jpg"))
        clipt, clipi, dino_scores = [], [], []
        clip_refs = [clip_image(r) for r in references]
        dino_refs = [dino_image(r) for r in references]
        for path in generated:
            image_feature = clip_image(path)
            clipt.append(float(image_feature @ clip_text(path.stem)))
            dino_feature = dino_image(path)
            for clip_ref, dino_ref in zip(clip_refs, dino_refs):
                clipi.append(float(image_feature @ clip_ref))
                dino_scores.append(float(dino_feature @ dino_ref))
        results[subject] = {
            "clipt_score": sum(clipt) / len(clipt),
            "clipi_score": sum(clipi) / len(clipi),
            "dino_score": sum(dino_scores) / len(dino_scores),
        }
    return results


def _assert_same_scores(actual: dict, expected: dict) -> None:
    """Equal up to float noise from a different batch size."""
    for key in ("clipt_score", "clipi_score", "dino_score"):
        assert actual[key] == pytest.approx(expected[key], abs=1e-6), key


def _evaluate(output_dir, clip_path, dino_dir, kosmosg, **kwargs):
    kwargs.setdefault("subjects", SUBJECTS)
    scores = score_generations(output_dir, DREAMBENCH, kosmosg, clip_path, dino_dir, device="cpu", batch_size=7, **kwargs)
    write_scores(output_dir, scores)
    return scores


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the evaluator tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("kosmosg", [False, True])
def test_scores_equal_straightforward_computation(request, generations, tiny_clip_path, tiny_dino_dir, kosmosg):
    output_dir, scores = request.getfixturevalue("kosmosg_scores" if kosmosg else "original_scores")
    expected = _expected_scores(generations, tiny_clip_path, tiny_dino_dir, kosmosg)

    assert list(scores["subjects"]) == SUBJECTS
    for subject in SUBJECTS:
        for key, value in expected[subject].items():
            assert scores["subjects"][subject][key] == pytest.approx(value, abs=2e-6), (subject, key)
    for key in ("clipt_score", "clipi_score", "dino_score"):
        assert scores[key] == pytest.approx(np.mean([expected[s][key] for s in SUBJECTS]), abs=2e-6)
        assert scores["groups"]["object"][key] == pytest.approx(expected["backpack"][key], abs=2e-6)
        assert scores["groups"]["live"][key] == pytest.approx(expected["cat"][key], abs=2e-6)
    num_photos = {"backpack": 6, "cat": 5}
    for subject in SUBJECTS:
        assert scores["subjects"][subject]["num_images"] == 25
        assert scores["subjects"][subject]["num_references"] == (1 if kosmosg else num_photos[subject])
    assert scores["setting"] == ("kosmosg" if kosmosg else "original")
    assert scores["num_images"] == 50 and scores["complete"] is False
    assert json.loads((output_dir / "all_score.json").read_text()) == scores


def test_settings_differ_only_in_image_similarity(original_scores, kosmosg_scores):
    (_, original), (_, kosmosg) = original_scores, kosmosg_scores
    assert kosmosg["clipt_score"] == original["clipt_score"]
    assert abs(kosmosg["clipi_score"] - original["clipi_score"]) > 1e-4
    assert abs(kosmosg["dino_score"] - original["dino_score"]) > 1e-4


def test_copies_of_kosmosg_image_score_one(tiny_clip_path, tiny_dino_dir, tmp_path):
    output_dir = tmp_path / "gen"
    (output_dir / "dog").mkdir(parents=True)
    photo = DREAMBENCH / "dataset" / "dog" / f"{get_subject('dog').kosmosg_image}.jpg"
    for prompt in prompts_for("dog")[:3]:
        shutil.copyfile(photo, output_dir / "dog" / f"{prompt}.jpg")
    kwargs = {"subjects": ["dog"], "allow_partial": True}
    kosmosg = _evaluate(output_dir, tiny_clip_path, tiny_dino_dir, True, **kwargs)
    assert kosmosg["num_images"] == 3
    assert kosmosg["clipi_score"] == pytest.approx(1.0, abs=1e-5)
    assert kosmosg["dino_score"] == pytest.approx(1.0, abs=1e-5)
    (output_dir / "all_score.json").unlink()  # the kosmosg scores; the original ones never replace them
    original = _evaluate(output_dir, tiny_clip_path, tiny_dino_dir, False, **kwargs)
    assert original["clipi_score"] < 1.0 - 1e-4 and original["dino_score"] < 1.0 - 1e-4


def test_allow_partial_scores_what_exists(generations, original_scores, tiny_clip_path, tiny_dino_dir, tmp_path):
    output_dir = _copy_generations(generations, tmp_path / "gen")
    full = original_scores[1]
    cat_missing = prompts_for("cat")[:3]
    for prompt in cat_missing:
        (output_dir / "cat" / f"{prompt}.png").unlink()
    Image.new("RGB", (64, 64)).save(output_dir / "backpack" / "a backpack on the moon.png")

    with pytest.raises(ValueError, match="a backpack on the moon.png"):
        _evaluate(output_dir, tiny_clip_path, tiny_dino_dir, False, subjects=SUBJECTS + ["dog"])

    partial = _evaluate(output_dir, tiny_clip_path, tiny_dino_dir, False, subjects=SUBJECTS + ["dog"], allow_partial=True)
    assert partial["missing_subjects"] == ["dog"]
    assert partial["missing_images"] == {"cat": cat_missing}
    assert partial["unexpected_images"] == {"backpack": ["a backpack on the moon.png"]}
    assert partial["subjects"]["backpack"] == full["subjects"]["backpack"]
    assert partial["subjects"]["cat"]["num_images"] == 22
    assert partial["subjects"]["cat"]["dino_score"] != full["subjects"]["cat"]["dino_score"]
    table = format_score_table(partial)
    assert "missing subjects: dog" in table and "cat: 3 prompt image(s) missing" in table


def _load_script():
    spec = importlib.util.spec_from_file_location("evaluate_dreambooth_script", REPO / "evaluate_dreambooth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(output_dir, clip_path, dino_dir, *extra):
    return [
        "--output_dir", str(output_dir), "--data_root", str(DREAMBENCH), "--is_kosmosg", "false",
        "--clip_model", str(clip_path), "--dino_model", str(dino_dir), "--device", "cpu", "--batch_size", "5",
        *extra,
    ]  # fmt: skip


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        _load_script().main(argv)
    assert info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in message
    return message


def test_cli_main_partial_run_and_table(generations, original_scores, tiny_clip_path, tiny_dino_dir, tmp_path, capsys, no_network):
    output_dir = _copy_generations(generations, tmp_path / "gen")
    shutil.rmtree(output_dir / "backpack")
    scores = _load_script().main(_argv(output_dir, tiny_clip_path, tiny_dino_dir, "--allow_partial"))
    printed = capsys.readouterr().out
    assert scores["num_subjects"] == 1 and len(scores["missing_subjects"]) == 29
    _assert_same_scores(scores["subjects"]["cat"], original_scores[1]["subjects"]["cat"])
    assert "cat " in printed and "overall (1)" in printed and "live animals (1)" in printed
    assert f"dino_score: {scores['dino_score']:.4f}" in printed
    assert json.loads((output_dir / "all_score.json").read_text())["clipi_score"] == scores["clipi_score"]


def test_cli_takes_subjects_and_setting_from_run_config(generations, kosmosg_scores, tiny_clip_path, tiny_dino_dir, tmp_path, capsys):
    """After `inference_dreambooth.py --subjects ... --is_kosmosg True`, the plain evaluate command scores that run."""
    output_dir = _copy_generations(generations, tmp_path / "gen")
    (output_dir / "run_config.json").write_text(json.dumps({"subjects": list(reversed(SUBJECTS)), "is_kosmosg": True}))
    argv = _argv(output_dir, tiny_clip_path, tiny_dino_dir)
    del argv[argv.index("--is_kosmosg") : argv.index("--is_kosmosg") + 2]
    scores = _load_script().main(argv)
    printed = capsys.readouterr().out
    assert scores["setting"] == "kosmosg" and scores["num_subjects"] == len(SUBJECTS)
    _assert_same_scores(scores, kosmosg_scores[1])
    assert "run_config.json: subjects, is_kosmosg" in printed
    assert f"scores written to {(output_dir / 'all_score.json').resolve()}" in printed
    # an explicit --subjects wins over the record; an explicit --is_kosmosg must agree with it
    scores = _load_script().main(argv + ["--is_kosmosg", "true", "--subjects", "cat"])
    assert scores["setting"] == "kosmosg" and scores["num_subjects"] == 1


def test_cli_refuses_a_setting_other_than_the_images_were_made_with(generations, tiny_clip_path, tiny_dino_dir, tmp_path, capsys):
    output_dir = _copy_generations(generations, tmp_path / "gen")
    (output_dir / "run_config.json").write_text(json.dumps({"subjects": SUBJECTS, "is_kosmosg": False}))
    message = _cli_error(capsys, _argv(output_dir, tiny_clip_path, tiny_dino_dir, "--is_kosmosg", "true"))
    assert "--is_kosmosg True" in message and "run_config.json" in message and "leave --is_kosmosg out" in message
    assert not (output_dir / "all_score.json").exists()


def test_cli_never_replaces_the_scores_of_the_other_setting(original_scores, tiny_clip_path, tiny_dino_dir, tmp_path, capsys):
    """Images without a run_config.json (made by the official code): the setting is the user's word, the scores file is kept."""
    output_dir = _copy_generations(original_scores[0], tmp_path / "gen")
    before = (output_dir / "all_score.json").read_bytes()
    argv = _argv(output_dir, tiny_clip_path, tiny_dino_dir, "--is_kosmosg", "true", "--subjects", *SUBJECTS)
    message = _cli_error(capsys, argv)
    assert "original setting" in message and "--is_kosmosg False" in message and "move that file away" in message
    assert (output_dir / "all_score.json").read_bytes() == before


def test_cli_bad_subject_is_one_short_line(generations, tiny_clip_path, tiny_dino_dir, capsys):
    for extra in (("--subjects", "dog", "no_such_subject"), ("--is_kosmosg", "maybe")):
        with pytest.raises(SystemExit) as info:
            _load_script().main(_argv(generations, tiny_clip_path, tiny_dino_dir, *extra))
        lines = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(lines) == 1 and extra[-1] in lines[0] and ": error: " in lines[0]


@pytest.mark.parametrize("problem", ["missing_subject", "missing_image", "extra_image", "unreadable_image"])
def test_cli_bad_generations_are_one_line_errors(generations, tiny_clip_path, tiny_dino_dir, tmp_path, capsys, problem):
    output_dir = _copy_generations(generations, tmp_path / "gen")
    previous = '{"clipt_score": "kept"}\n'
    (output_dir / "all_score.json").write_text(previous)
    if problem == "missing_subject":
        shutil.rmtree(output_dir / "cat")
        culprit = output_dir / "cat"
    elif problem == "missing_image":
        culprit = output_dir / "cat" / "a cat wearing a santa hat.png"
        culprit.unlink()
    elif problem == "extra_image":
        culprit = output_dir / "cat" / "a dog in the jungle.png"
        Image.new("RGB", (8, 8)).save(culprit)
    else:
        culprit = output_dir / "backpack" / "a wet backpack.png"
        culprit.write_bytes(b"\x89PNG broken")
    message = _cli_error(capsys, _argv(output_dir, tiny_clip_path, tiny_dino_dir, "--subjects", *SUBJECTS))
    assert str(culprit) in message
    assert (output_dir / "all_score.json").read_text() == previous


def test_cli_bad_models_and_data_root(generations, tiny_clip_path, tiny_dino_dir, tmp_path, capsys, no_network):
    args = ("--subjects", *SUBJECTS)
    message = _cli_error(capsys, _argv(generations, tiny_clip_path, tmp_path / "no_dino", *args))
    assert "--dino_model" in message and "no_dino" in message and "no such local path" in message

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    message = _cli_error(capsys, _argv(generations, garbage, tiny_dino_dir, *args))
    assert str(garbage) in message and "not an OpenAI CLIP checkpoint" in message

    argv = _argv(generations, tiny_clip_path, tiny_dino_dir, *args)
    argv[argv.index("--data_root") + 1] = str(tmp_path / "no_dreambench")
    assert "no_dreambench" in _cli_error(capsys, argv)

    with pytest.raises(SystemExit):
        _load_script().main(_argv(generations, tiny_clip_path, tiny_dino_dir, "--is_kosmosg", "maybe"))


def test_clip_model_name_offline_uses_only_the_verified_cache(tmp_path, no_network):
    with pytest.raises(BadInputError, match="HF_HUB_OFFLINE=1 forbids the download") as info:
        resolve_clip_checkpoint("ViT-B/32", download_root=tmp_path)
    assert "ViT-B-32.pt" in str(info.value) and "not in the cache" in str(info.value) and "\n" not in str(info.value)

    (tmp_path / "ViT-B-32.pt").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="SHA-256"):
        resolve_clip_checkpoint("ViT-B/32", download_root=tmp_path)

    with pytest.raises(BadInputError, match="not a file and not an openai-clip model name"):
        resolve_clip_checkpoint("ViT-Q/99", download_root=tmp_path)


def test_clip_model_name_downloads_and_verifies_like_clip_load(tiny_clip_path, tmp_path, monkeypatch):
    """Online, a missing or tampered file is fetched from the published URL and checked against its SHA-256."""
    from huggingface_hub import constants

    data = tiny_clip_path.read_bytes()
    url = f"https://openaipublic.example/clip/models/{hashlib.sha256(data).hexdigest()}/Tiny-1.pt"
    monkeypatch.setitem(clip_impl._MODELS, "Tiny/1", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    requested = []

    class Response(io.BytesIO):
        def info(self):
            return {"Content-Length": str(len(self.getvalue()))}

    def fake_urlopen(address, *args, **kwargs):
        requested.append(address)
        return Response(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    payload = data
    (tmp_path / "Tiny-1.pt").write_bytes(b"tampered")
    assert resolve_clip_checkpoint("Tiny/1", download_root=tmp_path).read_bytes() == data
    assert requested == [url]
    assert resolve_clip_checkpoint("Tiny/1", download_root=tmp_path) == tmp_path / "Tiny-1.pt" and requested == [url]  # cached now

    payload = b"corrupted download"
    (tmp_path / "Tiny-1.pt").unlink()
    with pytest.raises(BadInputError, match="downloading .* failed .*RuntimeError") as info:
        resolve_clip_checkpoint("Tiny/1", download_root=tmp_path)
    assert "Tiny/1" in str(info.value) and "\n" not in str(info.value)


def test_dino_checkpoint_must_fit(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    with pytest.raises(ValueError) as info:
        load_dino(tmp_path, "cpu")
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_script_runs_offline_in_a_subprocess(generations, kosmosg_scores, tiny_clip_path, tiny_dino_dir, tmp_path):
    output_dir = _copy_generations(generations, tmp_path / "gen")
    guard = (
        "import socket, sys, runpy\n"
        "def refuse(*a, **k):\n"
        "    raise SystemExit('network access attempted')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "sys.argv = ['evaluate_dreambooth.py'] + sys.argv[1:]\n"
        "runpy.run_path('evaluate_dreambooth.py', run_name='__main__')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = _argv(output_dir, tiny_clip_path, tiny_dino_dir, "--is_kosmosg", "True", "--subjects", *SUBJECTS)
    result = subprocess.run([sys.executable, "-c", guard, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads((output_dir / "all_score.json").read_text())
    expected = kosmosg_scores[1]
    assert scores["setting"] == "kosmosg" and scores["num_images"] == 50
    _assert_same_scores(scores, expected)
    for subject in SUBJECTS:
        _assert_same_scores(scores["subjects"][subject], expected["subjects"][subject])
    assert f"clipt_score: {scores['clipt_score']:.4f}" in result.stdout
