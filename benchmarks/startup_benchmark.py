"""Time to check the training inputs before the first step: pairs x processes x first start / resume.

    python benchmarks/startup_benchmark.py --pairs 200 2000 --processes 1 2 --out startup_out

Each pair's reference and generated image are 1024x1024 PNGs (links to a pool of distinct files, so
the disk holds 16 of them; each path is still opened, decoded and hashed), its maps a real
quality-map file bound to them.
Training is `train_patchdpo.py` on the tiny stand-in models (so the figures are the input check,
not the models): a first start to step 1, then a resume to step 2. The figure is the time the run
prints for its input check ("training inputs checked in X s"), per pair.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POOL = 16


def build_data(root: Path, pairs: int, pool: list[Path]) -> Path:
    from stand_ins.pairs import save_pair_data

    return save_pair_data(root / f"pairs{pairs}", num_samples=pairs, image_size=32, latent_size=16, image_pool=pool)


def run_start(models, data, out: Path, processes: int, steps: int) -> float:
    argv = [
        *("--pretrained_model_name_or_path", str(models.sdxl_dir), "--image_encoder_path", str(models.image_encoder_dir)),
        *("--pretrained_ip_adapter_path", str(models.ip_ckpt), "--data_root_path", str(data.root)),
        *("--patch_quality_file", str(data.quality_file), "--use_dpo_loss", "True", "--resolution", "32"),
        *("--train_batch_size", "1", "--stop_step", str(steps), "--checkpointing_steps", "1", "--output_dir", str(out)),
        *("--resume_from_checkpoint", "latest"),
    ]
    launcher = (
        [sys.executable]
        if processes == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*launcher, str(REPO / "train_patchdpo.py"), *argv], env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return float(re.search(r"training inputs checked in ([0-9.]+) s", done.stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json")
    args = parser.parse_args()
    from stand_ins.sdxl import save_sdxl_models
    from stand_ins.vit_models import structured_texture

    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        models = save_sdxl_models(work / "models")
        pool = []
        for seed in range(POOL):
            pool.append(work / f"pool{seed}.png")
            structured_texture(seed, size=1024).save(pool[-1])
        for pairs in args.pairs:
            data = build_data(work, pairs, pool)
            for processes in args.processes:
                out = work / f"run{pairs}x{processes}"
                first = run_start(models, data, out, processes, steps=1)
                resumed = run_start(models, data, out, processes, steps=2)
                rows.append({"pairs": pairs, "processes": processes, "first_start_s": first, "resume_s": resumed})
                print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("| pairs (1024² PNGs) | processes | first start | per pair | resume | resume / first |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        per_pair = row["first_start_s"] / row["pairs"] * 1000
        print(
            f"| {row['pairs']} | {row['processes']} | {row['first_start_s']:.1f} s | {per_pair:.1f} ms | {row['resume_s']:.2f} s "
            f"| {row['resume_s'] / row['first_start_s']:.3f} |"
        )


if __name__ == "__main__":
    main()
