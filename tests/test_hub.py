"""Model arguments as Hugging Face ids: resolved from an offline hub cache, no socket opened (common.hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import BadInputError
from common.hub import recorded_name, resolve_file, resolve_folder, split_repo_path
from tests.kit.hub import REVISION, add_to_hub_cache

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter so huggingface_hub reads HF_HOME / HF_HUB_OFFLINE from the environment,
# exactly as a user's run would; every socket connection is refused.
LOAD_BY_ID = r"""
import json, socket, sys
def refuse(*args, **kwargs):
    raise SystemExit("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
import torch
from common.errors import BadInputError
from dreambench.metrics import load_dino
from ip_adapter.checkpoint import load_ip_adapter_checkpoint
from ip_adapter.image_encoder import load_image_encoder
from ip_adapter.loading import check_ip_ckpt, load_sdxl_pipeline
from patch_quality.features import load_backbone
from patchdpo.models import load_training_models

pipe = load_sdxl_pipeline("tiny-org/sdxl", torch.float32)
encoder = load_image_encoder("tiny-org/ip-adapter/models/image_encoder")
checkpoint = load_ip_adapter_checkpoint(check_ip_ckpt("tiny-org/ip-adapter/sdxl_models/ip-adapter-plus.bin"))
backbone = load_backbone("tiny-org/dinov2")
dino = load_dino("tiny-org/dino-vits16", "cpu")
training = load_training_models(
    "tiny-org/sdxl", "tiny-org/ip-adapter/models/image_encoder", "tiny-org/ip-adapter/sdxl_models/ip-adapter-plus.bin", "cpu", torch.float32
)
errors = []
for load in (lambda: load_sdxl_pipeline("tiny-org/no-such-model", torch.float32), lambda: check_ip_ckpt("tiny-org/ip-adapter/missing.bin")):
    try:
        load()
    except BadInputError as error:
        errors.append(str(error))
sums = {
    "unet": sum(p.double().sum().item() for p in pipe.unet.parameters()),
    "training_unet": sum(p.double().sum().item() for n, p in training.model.unet.named_parameters() if "to_k_ip" not in n and "to_v_ip" not in n),
    "encoder": sum(p.double().sum().item() for p in encoder.parameters()),
    "image_proj": sum(t.double().sum().item() for t in checkpoint["image_proj"].values()),
    "backbone": sum(p.double().sum().item() for p in backbone.parameters()),
    "dino": sum(p.double().sum().item() for p in dino.parameters()),
}
eps = sorted({m.eps for m in dino.modules() if isinstance(m, torch.nn.LayerNorm)})
print(json.dumps({"sums": sums, "dino_eps": eps, "errors": errors}))
"""


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_models, tiny_dinov2_dir, tiny_dino_dir) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    add_to_hub_cache(home, "tiny-org/sdxl", {"": tiny_models.sdxl_dir})
    add_to_hub_cache(
        home,
        "tiny-org/ip-adapter",
        {"models/image_encoder": tiny_models.image_encoder_dir, "sdxl_models/ip-adapter-plus.bin": tiny_models.ip_ckpt},
    )
    add_to_hub_cache(home, "tiny-org/dinov2", {"": tiny_dinov2_dir})
    # the real facebook/dino-vits16 config says 1e-12; loading must still give torch.hub's 1e-6
    dino = add_to_hub_cache(home, "tiny-org/dino-vits16", {"": tiny_dino_dir})
    config = json.loads((dino / "config.json").read_text())
    (dino / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-12}))
    return home


def _local_sums(tiny_models, tiny_dinov2_dir, tiny_dino_dir) -> dict[str, float]:
    from transformers import ViTModel

    from ip_adapter.checkpoint import load_ip_adapter_checkpoint
    from ip_adapter.image_encoder import load_image_encoder
    from patch_quality.features import load_backbone
    from stand_ins.sdxl import load_pipeline

    unet = sum(p.double().sum().item() for p in load_pipeline(tiny_models.sdxl_dir).unet.parameters())
    return {
        "unet": unet,
        "training_unet": unet,
        "encoder": sum(p.double().sum().item() for p in load_image_encoder(tiny_models.image_encoder_dir).parameters()),
        "image_proj": sum(t.double().sum().item() for t in load_ip_adapter_checkpoint(tiny_models.ip_ckpt)["image_proj"].values()),
        "backbone": sum(p.double().sum().item() for p in load_backbone(tiny_dinov2_dir).parameters()),
        "dino": sum(p.double().sum().item() for p in ViTModel.from_pretrained(tiny_dino_dir, add_pooling_layer=False).parameters()),
    }


def test_every_model_loads_by_id_from_an_offline_cache(hf_home, tiny_models, tiny_dinov2_dir, tiny_dino_dir):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", LOAD_BY_ID], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected = _local_sums(tiny_models, tiny_dinov2_dir, tiny_dino_dir)
    for name in expected:
        assert report["sums"][name] == pytest.approx(expected[name], rel=1e-9, abs=1e-9), name
    assert report["dino_eps"] == [1e-6]
    missing_model, missing_file = report["errors"]
    for message, name in ((missing_model, "tiny-org/no-such-model"), (missing_file, "tiny-org/ip-adapter/missing.bin")):
        assert name in message and str(hf_home / "hub") in message and "offline" in message and "\n" not in message


def test_local_paths_win_and_are_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_folder("org/name", "--flag") == Path("org/name")
    assert recorded_name("org/name") == str(tmp_path / "org" / "name")
    assert recorded_name("facebook/dino-vits16") == "facebook/dino-vits16"


def test_split_repo_path_and_bad_ids():
    assert split_repo_path("h94/IP-Adapter/sdxl_models/x.bin", "--ip_ckpt") == ("h94/IP-Adapter", "sdxl_models/x.bin")
    with pytest.raises(BadInputError) as info:
        resolve_folder("not a/valid id!", "--dino_model")
    assert "--dino_model not a/valid id!" in str(info.value) and "no such local path" in str(info.value)
    with pytest.raises(BadInputError, match="REPO_ID/path/in/repo"):
        resolve_file("h94/IP-Adapter", "--ip_ckpt")


def test_cache_layout_helper_writes_the_ref(tmp_path):
    snapshot = add_to_hub_cache(tmp_path, "a/b", {})
    assert snapshot.name == REVISION and (tmp_path / "hub" / "models--a--b" / "refs" / "main").read_text() == REVISION


def test_run_config_records_local_paths_absolute_and_ids_as_given(tmp_path, monkeypatch):
    from dreambench.run_config import GENERATION_KEYS, make_run_config

    (tmp_path / "sdxl").mkdir()
    (tmp_path / "dino").mkdir()
    monkeypatch.chdir(tmp_path)
    arguments = dict.fromkeys(GENERATION_KEYS, 0)
    arguments.update(
        base_model_path=Path("sdxl"),
        image_encoder_path=Path("h94/IP-Adapter/models/image_encoder"),
        clip_model="ViT-B/32",
        dino_model="dino",
    )
    config = make_run_config(arguments)
    assert config["base_model_path"] == str(tmp_path / "sdxl") and config["dino_model"] == str(tmp_path / "dino")
    assert config["image_encoder_path"] == "h94/IP-Adapter/models/image_encoder" and config["clip_model"] == "ViT-B/32"


@pytest.fixture
def no_hub(monkeypatch):
    """Any attempt to reach the hub (even its offline cache) fails the test."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried as a Hugging Face id: {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


@pytest.mark.parametrize(
    "value, resolve, nearest",
    [
        ("my_run/checkpoint-30/model.bin", resolve_file, "my_run holds checkpoint-3/, logs/"),  # first part exists: a typo
        ("my_run/checkpoint-30", resolve_folder, "my_run holds checkpoint-3/, logs/"),
        ("./my_rnu/model.bin", resolve_file, "the current folder holds my_run/"),
        ("../no_such_folder/x", resolve_folder, "holds"),
        ("~/no_such_folder_for_patchdpo/sdxl", resolve_folder, "holds"),
        ("model.bin", resolve_file, "the current folder holds my_run/"),  # a weights file in a folder that exists
    ],
)
def test_a_value_that_looks_local_is_never_tried_as_a_hub_id(tmp_path, monkeypatch, no_hub, value, resolve, nearest):
    (tmp_path / "my_run" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "my_run" / "logs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInputError) as info:
        resolve(value, "--ip_ckpt")
    message = str(info.value)
    assert message.startswith(f"--ip_ckpt {value}: no such local path; ") and nearest in message and "\n" not in message


def test_the_no_such_file_line_shortens_a_long_listing(tmp_path, monkeypatch, no_hub):
    for index in range(12):
        (tmp_path / "run" / f"checkpoint-{index:02d}").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInputError, match=r"run holds checkpoint-00/, .*, checkpoint-07/ and 4 more$"):
        resolve_file("run/checkpoint-99/model.bin", "--ip_ckpt")
