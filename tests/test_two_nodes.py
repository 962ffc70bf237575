"""Two nodes on one host: `torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0|1` on 127.0.0.1.

Every process is its node's local main process (LOCAL_RANK 0), the case multi-node launches add to
one machine's. Launch A runs the paper's flow on shared storage (construct -> maps -> train with a
feature cache -> inference) and ends with a training run whose node-1 process is SIGKILLed after
step 3; launch B first resumes while node 1 does not see the checkpoints (every process must stop
with one line, not hang), then resumes for real. Launch C starts each node in its own working
directory with relative output folders: node-local disks, refused at once on every process.
Each result is compared with a 1-process run of the same command.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference_dreambooth
import train_patchdpo
from patch_quality import maps
from patch_quality.maps import PARTS_DIR_NAME
from patch_quality.store import QualityMaps
from stand_ins.pairs import save_pair_data
from tests.kit.torchrun_train import replaced
from tests.test_inference_dreambooth import TOLERANCE, generated_images, max_difference, script_args
from tests.test_train_distributed import (
    CHECKPOINT_EVERY,
    NUM_PAIRS,
    P99_TOLERANCE,
    STEPS,
    adapter_state,
    deviation_figures,
    train_argv,
)
from training_data import construct

ROOT = Path(__file__).resolve().parents[1]
DDP_TIMEOUT = 60  # seconds: a process whose peer died must be gone well within it
LAUNCH_TIMEOUT = 600


def construct_argv(models, out: Path) -> list[str]:
    return [
        *("--base_model_path", str(models.sdxl_dir), "--image_encoder_path", str(models.image_encoder_dir)),
        *("--ip_ckpt", str(models.ip_ckpt), "--output_dir", str(out), "--num_samples", "3", "--num_generated", "2"),
        *("--num_inference_steps", "2", "--height", "32", "--width", "32", "--batch_size", "1"),
    ]


def maps_argv(data: Path, backbone: Path, *extra: str) -> list[str]:
    return [
        "--data_root",
        str(data),
        "--backbone",
        str(backbone),
        "--cpu",
        "--batch_size",
        "1",
        "--resolution",
        "32",
        "--vae_scale_factor",
        "8",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_nodes(spec: dict, spec_path: Path, cwds: tuple[Path, Path] = (ROOT, ROOT)) -> list[dict]:
    """Start both nodes at once; per node its exit code, stderr and end time (time.time())."""
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = free_port()
    nodes = []
    for rank, cwd in enumerate(cwds):
        log = open(spec_path.with_suffix(f".node{rank}.log"), "w+")
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank)]
        command += ["--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "tests.kit.torchrun_train", str(spec_path)]
        nodes.append((subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    ended = [None, None]
    deadline = time.time() + LAUNCH_TIMEOUT
    while None in ended and time.time() < deadline:
        for rank, (process, _) in enumerate(nodes):
            if ended[rank] is None and process.poll() is not None:
                ended[rank] = time.time()
        time.sleep(0.2)
    results = []
    for rank, (process, log) in enumerate(nodes):
        if ended[rank] is None:
            process.kill()
            process.wait()
        log.seek(0)
        results.append({"code": process.returncode, "output": log.read(), "ended": ended[rank]})
        log.close()
    assert None not in ended, "a node hung: " + " | ".join(result["output"][-3000:] for result in results)
    return results


def exits(record: Path, name: str) -> list[str | None]:
    files = [record / name / f"rank{rank}.exit" for rank in (0, 1)]
    return [file.read_text() if file.exists() else None for file in files]


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    return save_pair_data(tmp_path_factory.mktemp("pairs"), num_samples=NUM_PAIRS, image_size=32, latent_size=16)


@pytest.fixture(scope="module")
def two_nodes(tiny_models, tiny_dinov2_dir, pair_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("two_nodes")
    out, record = root / "out", root / "record"

    def train(name: str, *extra: str, **options) -> dict:
        argv = train_argv(tiny_models, pair_data, out / name, "patch_dpo", "--ddp_timeout", str(DDP_TIMEOUT), *extra, batch=2)
        return {"name": name, "argv": argv, **options}

    launch_a = [
        {"name": "construct", "script": "training_data.construct", "argv": construct_argv(tiny_models, out / "DATA")},
        {"name": "maps", "script": "patch_quality.maps", "argv": maps_argv(out / "DATA", tiny_dinov2_dir)},
        train("trained", "--cache_dir", str(root / "cache")),
        {"name": "inference", "script": "inference_dreambooth", "argv": script_args(tiny_models, out / "inference", "--batch_size", "2")},
        train("killed", kill=[1, 3]),
    ]
    nodes_a = launch_two_nodes({"record_dir": str(record), "runs": launch_a}, root / "a.json")
    assert all((record / run["name"] / "done").is_file() for run in launch_a[:-1]), nodes_a[0]["output"][-4000:]
    launch_b = [
        {**train("killed", "--resume_from_checkpoint", "latest", hide_resume_on_rank=1), "name": "hidden"},
        {**train("killed", "--resume_from_checkpoint", "latest"), "name": "resumed"},
    ]
    nodes_b = launch_two_nodes({"record_dir": str(record), "runs": launch_b}, root / "b.json")
    cwds = (root / "node0", root / "node1")  # node-local disks: the same relative path is another folder on each node
    for cwd in cwds:
        cwd.mkdir()
    launch_c = [
        {"name": "local_output", "argv": train_argv(tiny_models, pair_data, Path("out"), "patch_dpo", batch=2)},
        {
            "name": "local_cache",
            "argv": train_argv(tiny_models, pair_data, out / "local_cache", "patch_dpo", "--cache_dir", "cache", batch=2),
        },
        {"name": "local_inference", "script": "inference_dreambooth", "argv": script_args(tiny_models, Path("images"))},
    ]
    nodes_c = launch_two_nodes({"record_dir": str(record), "runs": launch_c}, root / "c.json", cwds)
    return {"root": root, "out": out, "record": record, "a": nodes_a, "b": nodes_b, "c": nodes_c, "cwds": cwds}


# ----------------------------------------------------------------------------------------------
# The flow on two nodes equals one process


def test_training_on_two_nodes_equals_one_process(two_nodes, tiny_models, pair_data, tmp_path):
    one = tmp_path / "one"
    train_patchdpo.main(train_argv(tiny_models, pair_data, one, "patch_dpo", batch=4))
    maximum, p99 = deviation_figures(adapter_state(one), adapter_state(two_nodes["out"] / "trained"))
    print(f"2 nodes x 2 vs 1 process x 4: max |dw| {maximum:.2e}, 99th percentile {p99:.2e}")
    assert p99 <= P99_TOLERANCE


def test_construct_and_maps_on_two_nodes_equal_one_process(two_nodes, tiny_models, tiny_dinov2_dir, tmp_path):
    data = two_nodes["out"] / "DATA"
    one = tmp_path / "DATA"
    construct.main(construct_argv(tiny_models, one))
    images = sorted(path.relative_to(data) for path in data.rglob("*.png"))
    assert images == sorted(path.relative_to(one) for path in one.rglob("*.png")) and len(images) == 3 * 3
    for name in images:
        difference = np.abs(np.asarray(Image.open(data / name), np.int16) - np.asarray(Image.open(one / name), np.int16))
        assert difference.max() <= TOLERANCE, name
    assert json.loads((data / "manifest.json").read_text()) == json.loads((one / "manifest.json").read_text())

    single = tmp_path / "single.safetensors"
    maps.main(maps_argv(data, tiny_dinov2_dir, "--output", str(single)))  # the same images, on one process
    two, one_map = QualityMaps.load(data / "patch_quality.safetensors"), QualityMaps.load(single)
    assert two.keys() == one_map.keys() and len(two.keys()) == 3 * 2
    for key in two.keys():
        assert all(torch.equal(a, b) for a, b in zip(two.get(*key), one_map.get(*key))), key
    assert (data / "patch_quality.safetensors").read_bytes() == single.read_bytes()  # and the same file, byte for byte


def test_inference_on_two_nodes_equals_one_process(two_nodes, tiny_models, tmp_path):
    one = tmp_path / "inference"
    inference_dreambooth.main(script_args(tiny_models, one, "--batch_size", "2"))
    two = two_nodes["out"] / "inference"
    assert json.loads((two / "run_config.json").read_text())["num_processes"] == 2
    assert max_difference(generated_images(one), generated_images(two)) <= TOLERANCE


def test_a_killed_node_stops_the_other_and_the_relaunch_resumes_exactly(two_nodes):
    record, out = two_nodes["record"], two_nodes["out"]
    node0, node1 = two_nodes["a"]
    assert node0["code"] != 0 and node1["code"] != 0
    killed_at = float((record / "killed" / "rank1.killed").read_text())
    print(f"node 0 exited {node0['ended'] - killed_at:.1f} s after node 1's process was killed")
    assert node0["ended"] - killed_at < DDP_TIMEOUT
    assert sorted(path.name for path in (record / "killed" / "rank1").iterdir()) == [f"step{n}.safetensors" for n in (1, 2, 3)]
    resumed, uninterrupted = adapter_state(out / "killed"), adapter_state(out / "trained")
    maximum, p99 = deviation_figures(resumed, uninterrupted)  # "trained" used the feature cache: equal up to rounding
    assert p99 <= P99_TOLERANCE, (maximum, p99)
    steps = sorted(path.name for path in (record / "resumed" / "rank0").iterdir())
    assert steps == [f"step{n}.safetensors" for n in range(1, STEPS - CHECKPOINT_EVERY + 1)]


def test_a_node_that_does_not_see_the_checkpoint_stops_every_process(two_nodes):
    record = two_nodes["record"]
    assert exits(record, "hidden") == ["2", "2"]
    assert not list((record / "hidden" / "rank0").iterdir())  # no step trained
    output = two_nodes["b"][0]["output"]
    assert "the processes found different training states to resume from (process 0: step 2, process 1: no state)" in output, output[-3000:]
    assert "shares" in output  # names the fix


# ----------------------------------------------------------------------------------------------
# One writer per file


def test_each_file_is_written_by_the_main_process_or_its_shards_owner_only(two_nodes):
    record, root = two_nodes["record"], two_nodes["root"]
    owners: dict[str, set[int]] = {}
    for name in ("construct", "maps", "trained", "inference", "resumed"):
        for rank, paths in replaced(record, name).items():
            for path in paths:
                owners.setdefault(path, set()).add(rank)
    assert all(len(ranks) == 1 for ranks in owners.values()), [path for path, ranks in owners.items() if len(ranks) > 1]
    by_node1 = sorted(Path(path).relative_to(root).as_posix() for path, ranks in owners.items() if ranks == {1})
    shards = ("out/DATA/sample", "out/inference/backpack/", "out/inference/cat/", "cache/", f"out/DATA/{PARTS_DIR_NAME}/")
    assert by_node1 and all(path.startswith(shards) for path in by_node1), by_node1
    for shared in ("out/DATA/manifest.json", "out/DATA/patch_quality.safetensors", "out/inference/run_config.json"):
        assert owners[str(root / shared)] == {0}, shared
    print("written by node 1:", by_node1)
    event_writers = {path.name.split(".")[-2] for path in (two_nodes["out"] / "trained" / "logs").rglob("events.out.tfevents.*")}
    assert len(event_writers) == 1  # one process (pid) wrote TensorBoard's files


# ----------------------------------------------------------------------------------------------
# Node-local storage is refused at once, on every process


@pytest.mark.parametrize(
    "name, message",
    [
        ("local_output", "--output_dir out is not the same folder on every node (process(es) [1] do not see .run.lock"),
        ("local_cache", "--cache_dir cache: some processes do not see the cache files the others wrote"),
        ("local_inference", "--output_dir images is not the same folder on every node (process(es) [1] do not see .run.lock"),
    ],
)
def test_node_local_folders_are_refused_on_every_process(two_nodes, name, message):
    record = two_nodes["record"]
    assert exits(record, name) == ["2", "2"]
    assert not list((record / name / "rank0").iterdir())  # nothing trained
    output = two_nodes["c"][0]["output"] + two_nodes["c"][1]["output"]
    assert output.count(message) == 2, output[-3000:]
