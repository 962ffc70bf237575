"""One command that measures every GPU speed target in one short run and writes the numbers down.

    python benchmarks/gpu_check.py --out gpu_check_out                 # on a CUDA GPU: full SDXL configs, <= 8 min
    python benchmarks/gpu_check.py --out gpu_check_out --write-results # ... and fill RESULTS.md's GPU section
    python benchmarks/gpu_check.py --size tiny --device cpu --out OUT  # the same code on the tiny models, seconds

No downloads: random weights in the published configs (SDXL UNet 2.57 B parameters, both text
encoders, VAE, CLIP ViT-H/14 vision, IP-Adapter-Plus; `stand_ins.sdxl.FULL`), built once into
`--work_dir` and reused by later runs. Stages, most important first, each with its own time budget
(cut by what is left of `--budget_s`):

- train_<precision>: one training step of 4 pairs at 512 px, ours (`patchdpo.method` as
  `train_patchdpo.py --cache_dir` runs it) against the reference loop of `train_benchmark.py`:
  steady-state pairs/s, peak `torch.cuda.max_memory_allocated` of the timed steps, and model-FLOP
  utilisation (the FLOPs of one step counted by `torch.utils.flop_counter`, over the card's dense
  fp16/bf16 peak from `PEAK_TFLOPS`);
- inference: DreamBench generation at 1024 px with classifier-free guidance, ours
  (`generate_batch` at inference_dreambooth.py's default batch) against `inference_benchmark.py`'s
  reference loop: steady-state images/s from per-step timings (30-step rate derived), peak memory,
  and the largest pixel difference where the two use the same noise;
- batch_invariance: ours at batch 1 vs batch 4 for the same seeds (max / mean pixel difference);
- *_compile: the same for ours with `--compile` (compile time reported separately, plus the
  number of recompiles during the timed steps, which must be 0).

Every stage writes `--out/results.json` as soon as it (or one of its variants) finishes, so a run cut
short keeps what finished; a stage that fails records its error and the run goes on.
On CPU (`--device cpu`) the compile stages use the `eager` dynamo backend by default: they check
the graph capture and the recompile counts in seconds, while `tests/test_speed.py` checks inductor.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchmark_cli import gpu_check_parser  # noqa: E402

if __name__ == "__main__":
    gpu_check_parser(__doc__.split("\n\n")[0]).parse_args()  # --help answers before the imports below load torch

import inference_benchmark  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import train_benchmark  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from PIL import Image  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from common.io import atomic_write, atomic_write_json  # noqa: E402
from dreambench.benchmark import prompts_for  # noqa: E402
from ip_adapter import IPAdapterPlusXL  # noqa: E402
from ip_adapter.batch_generation import GenerationItem  # noqa: E402
from ip_adapter.loading import load_sdxl_pipeline, vae_scale_factor  # noqa: E402
from ip_adapter.speed import speed_up_unet  # noqa: E402
from stand_ins.pairs import save_pair_data  # noqa: E402
from stand_ins.sdxl import SHAPES, ModelPaths, save_sdxl_models  # noqa: E402

#: Dense (no sparsity) fp16/bf16 tensor-core peak in TFLOP/s, matched in order against the device name.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("RTX 4090", 165.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
GENERATOR_STAGES = {"inference", "batch_invariance", "inference_compile"}
TEMPLATE_BEGIN, TEMPLATE_END = "<!-- gpu-check:template", "gpu-check:template -->"

IP_SCALE = 0.78  # DreamBench's original setting, as inference_dreambooth.py's default


@dataclass(frozen=True)
class Size:
    """What one run measures at a model size."""

    shape: str
    train_resolution: int
    train_pairs: int
    train_steps: int
    image_size: int
    inference_steps: int  # timed per step; the 30-step rate is derived
    images: int  # per inference variant; ours generates them in one batch
    invariance_steps: int
    budgets_s: dict[str, float] = field(default_factory=dict)


SIZES = {
    "full": Size(
        "full",
        train_resolution=512,
        train_pairs=4,
        train_steps=5,
        image_size=1024,
        inference_steps=5,
        images=8,
        invariance_steps=4,
        budgets_s=dict(models=150, train=75, inference=75, batch_invariance=45, inference_compile=120, train_compile=150),
    ),
    "mid": Size(  # the CPU proxy of train_benchmark.py / inference_benchmark.py (use --compile_backend inductor)
        "mid",
        train_resolution=128,
        train_pairs=2,
        train_steps=5,
        image_size=128,
        inference_steps=5,
        images=4,
        invariance_steps=2,
        budgets_s=dict(models=300, train=300, inference=300, batch_invariance=300, inference_compile=900, train_compile=1200),
    ),
    "tiny": Size(
        "tiny",
        train_resolution=32,
        train_pairs=4,
        train_steps=2,
        image_size=32,
        inference_steps=3,
        images=4,
        invariance_steps=2,
        budgets_s=dict(models=120, train=120, inference=120, batch_invariance=120, inference_compile=120, train_compile=120),
    ),
}


class StageTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[dict[str, bool]]:
    """Raise `StageTimeout` in the main thread after `seconds` (SIGALRM; CUDA work returns first).

    Yields a flag dict: code that catches and wraps exceptions (dynamo does) may turn the timeout
    into another error, so `expired` says what really happened.
    """
    state = {"expired": False}

    def expire(signum, frame):
        state["expired"] = True
        raise StageTimeout(f"stage budget of {seconds:.0f} s exceeded")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Run:
    """The results of one run; every `record` rewrites `<out>/results.json` at once."""

    def __init__(self, args: argparse.Namespace, size: Size, device: torch.device) -> None:
        self.args, self.size, self.device = args, size, device
        self.path = args.out / "results.json"
        self.models: ModelPaths | None = None
        self.generation: tuple[IPAdapterPlusXL, list[GenerationItem], dict[str, list[Image.Image]]] | None = None
        self.started = time.perf_counter()
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
        self.results: dict[str, Any] = {
            "device_name": name,
            "peak_tflops": peak_tflops(name),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__,
            "size": size.shape,
            "compile_backend": args.compile_backend,
            "budget_s": args.budget_s,
            "train_resolution": size.train_resolution,
            "train_pairs": size.train_pairs,
            "image_size": size.image_size,
            "stages": {},
        }
        self.flush()

    def stage(self, name: str) -> dict[str, Any]:
        return self.results["stages"].setdefault(name, {})

    def record(self, stage: str, key: str, value: Any) -> None:
        self.stage(stage)[key] = value
        self.flush()

    def flush(self) -> None:
        self.results["elapsed_s"] = time.perf_counter() - self.started
        atomic_write_json(self.path, self.results)

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)


# ----------------------------------------------------------------------------------------------
# Stages


def stage_models(run: Run, name: str) -> None:
    """Random-weight models in the real configs, saved once under --work_dir (later runs reuse them)."""
    root = run.args.work_dir / f"models-{run.size.shape}"
    paths = ModelPaths(root / "sdxl", root / "image_encoder", root / "ip-adapter-plus.bin")
    run.record(name, "reused", paths.ip_ckpt.is_file())
    if not paths.ip_ckpt.is_file():
        save_sdxl_models(root, SHAPES[run.size.shape])
    run.models = paths


def _train_variant(run: Run, variant: str, precision: str, compile: bool, data: Path) -> dict[str, Any]:
    args = train_benchmark.parse_args(
        [
            "--device",
            run.device.type,
            "--shape",
            run.size.shape,
            "--resolution",
            str(run.size.train_resolution),
            "--batch_size",
            str(run.size.train_pairs),
            "--mixed_precision",
            precision,
            "--steps",
            str(run.size.train_steps),
            "--warmup",
            "2",
            "--threads",
            str(torch.get_num_threads()),
            "--compile_backend",
            run.args.compile_backend,
            "--work_dir",
            str(run.args.work_dir),
            "--variant",
            variant,
            "--models",
            str(run.models.sdxl_dir.parent),
            "--data",
            str(data),
            *(["--compile"] if compile else []),
            *(["--count_flops"] if variant == "ours" and not compile else []),
        ]
    )
    AcceleratorState._reset_state(reset_partial_state=True)  # each variant gets its own Accelerator and precision
    graphs = counters["stats"]["unique_graphs"]
    result = train_benchmark.run_variant(args)
    result["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs
    free_memory(run.device)
    return result


def _pair_data(run: Run) -> Path:
    data = run.args.work_dir / f"pairs-{run.size.shape}-{run.size.train_resolution}"
    if not (data / "patch_quality.safetensors").is_file():
        from diffusers import AutoencoderKL

        factor = vae_scale_factor(AutoencoderKL.load_config(run.models.sdxl_dir, subfolder="vae"))
        samples = (2 + run.size.train_steps + 1) * run.size.train_pairs
        save_pair_data(data, samples, run.size.train_resolution, run.size.train_resolution // factor)
    return data


def _utilisation(run: Run, result: dict[str, Any], flops_per_step: float | None) -> None:
    if flops_per_step is None:
        return
    steps_per_s = result["pairs_per_s"] / run.size.train_pairs
    result["model_tflops_per_s"] = flops_per_step * steps_per_s / 1e12
    if run.results["peak_tflops"] is not None:
        result["mfu"] = result["model_tflops_per_s"] / run.results["peak_tflops"]


def _planned_peak_gib(run: Run, precision: str) -> float:
    """`patchdpo.memory_plan`'s peak for the timed configuration (cached features, as the benchmark's step), to set beside the measured one."""
    from patchdpo.memory_plan import GIB, PlanSettings, plan_training_memory

    settings = PlanSettings(
        resolution=run.size.train_resolution, train_batch_size=run.size.train_pairs, mixed_precision=precision, cache_dir=True
    )
    return plan_training_memory(str(run.models.sdxl_dir), str(run.models.image_encoder_dir), settings)["peak_bytes"] / GIB


def stage_train(precision: str, compile: bool) -> Callable[[Run, str], None]:
    def stage(run: Run, name: str) -> None:
        data = _pair_data(run)
        variants = ("ours",) if compile else ("reference", "ours")
        run.record(name, "setup", {"resolution": run.size.train_resolution, "pairs_per_step": run.size.train_pairs, "precision": precision})
        for variant in variants:
            result = _train_variant(run, variant, precision, compile, data)
            flops = result.get("flops_per_step") or run.results["stages"].get(f"train_{precision}", {}).get("ours", {}).get(
                "flops_per_step"
            )
            _utilisation(run, result, flops)
            if variant == "ours" and not compile:
                result["planned_peak_gib"] = _planned_peak_gib(run, precision)
                if result.get("peak_gpu_gib") is not None:
                    result["measured_over_planned"] = result["peak_gpu_gib"] / result["planned_peak_gib"]
            if compile:
                eager = run.results["stages"].get(f"train_{precision}", {}).get("ours", {})
                if "pairs_per_s" in eager:
                    result["compile_s"] = result["first_step_s"] - run.size.train_pairs / result["pairs_per_s"]
                    result["speedup_vs_eager"] = result["pairs_per_s"] / eager["pairs_per_s"]
            run.record(name, variant, result)
        stage_results = run.stage(name)
        if "reference" in stage_results:
            ours, reference = stage_results["ours"], stage_results["reference"]
            run.record(name, "speedup", ours["pairs_per_s"] / reference["pairs_per_s"])
            if ours.get("peak_gpu_gib") is not None:
                run.record(name, "memory_ratio", ours["peak_gpu_gib"] / reference["peak_gpu_gib"])

    return stage


class StepClock:
    """Per-denoising-step times through the pipeline's `callback_on_step_end`."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.ends = device, []

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        synchronize(self.device)
        self.ends.append(time.perf_counter())
        return callback_kwargs

    def start(self) -> None:
        synchronize(self.device)
        self.ends = [time.perf_counter()]

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def _generation(run: Run) -> tuple[IPAdapterPlusXL, list[GenerationItem], dict[str, list[Image.Image]]]:
    """The generation model and items, loaded once and shared by the inference stages (in place:
    channels-last once ours runs, compiled by the last of them)."""
    if run.generation is None:
        dtype = torch.float16 if run.device.type == "cuda" else torch.float32
        pipe = load_sdxl_pipeline(run.models.sdxl_dir, dtype)
        ip_model = IPAdapterPlusXL(pipe, run.models.image_encoder_dir, run.models.ip_ckpt, run.device)
        rng = np.random.default_rng(0)
        subjects = ("backpack", "dog")
        references = {s: [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(3)] for s in subjects}
        per_subject = run.size.images // len(subjects)
        seed = inference_benchmark.REFERENCE_SEED
        items = [GenerationItem(s, prompt, seed) for s in subjects for prompt in prompts_for(s)[:per_subject]]
        run.generation = (ip_model, items, references)
    return run.generation


def _timed_generation(run: Run, generate: Callable[..., list[Image.Image]], batch_size: int) -> tuple[list[Image.Image], dict[str, Any]]:
    """Images and per-step speed of one variant (one warm-up call at 1 step first)."""
    clock = StepClock(run.device)
    common = dict(height=run.size.image_size, width=run.size.image_size, scale=IP_SCALE, callback_on_step_end=clock)
    started = time.perf_counter()
    generate(num_inference_steps=1, **common)
    synchronize(run.device)
    first_call_s = time.perf_counter() - started
    reset_peak(run.device)
    steps: list[float] = []

    def timed(**kwargs):
        clock.start()
        images = generate(**kwargs)
        steps.extend(clock.step_seconds()[1:])  # the first interval holds the prompt encoding
        return images

    graphs = counters["stats"]["unique_graphs"]
    images, seconds, peak = inference_benchmark.timed(run.device, lambda: timed(num_inference_steps=run.size.inference_steps, **common))
    step_s = statistics.median(steps)
    return images, {
        "batch_size": batch_size,
        "first_call_s": first_call_s,
        "step_s": step_s,
        "images_per_s_30_steps": batch_size / (30 * step_s),
        "wall_s": seconds,
        "peak_gpu_gib": peak,
        "graphs_compiled_while_timed": counters["stats"]["unique_graphs"] - graphs,
    }


def stage_inference(compile: bool) -> Callable[[Run, str], None]:
    def stage(run: Run, name: str) -> None:
        ip_model, items, references = _generation(run)
        if not compile:

            def reference(**kwargs):
                return inference_benchmark.reference_loop(ip_model, items[: inference_benchmark.REFERENCE_BATCH], references, **kwargs)

            reference_images, result = _timed_generation(run, reference, inference_benchmark.REFERENCE_BATCH)
            run.record(name, "reference", result)
        speed_up_unet(ip_model.pipe.unet, announce=lambda message: None)  # channels-last, as inference_dreambooth.py

        def ours(**kwargs):
            return inference_benchmark.our_path(ip_model, items, references, len(items), **kwargs)

        our_images, result = _timed_generation(run, ours, len(items))
        if compile:
            speed_up_unet(ip_model.pipe.unet, compile=True, backend=run.args.compile_backend, announce=lambda message: None)
            compiled_images, compiled = _timed_generation(run, ours, len(items))
            compiled["compile_s"] = compiled["first_call_s"] - result["first_call_s"]
            compiled["speedup_vs_eager"] = result["step_s"] / compiled["step_s"]
            compiled["max_pixel_difference_vs_eager"] = max(map(inference_benchmark.pixel_difference, compiled_images, our_images))
            run.record(name, "ours", compiled)
            return
        run.record(name, "ours", result)
        run.record(name, "speedup", result["images_per_s_30_steps"] / run.stage(name)["reference"]["images_per_s_30_steps"])
        # Same seed: the first image of the reference batch has the noise of ours' first image.
        run.record(name, "max_pixel_difference_where_seeds_agree", inference_benchmark.pixel_difference(reference_images[0], our_images[0]))

    return stage


def stage_batch_invariance(run: Run, name: str) -> None:
    ip_model, items, references = _generation(run)
    speed_up_unet(ip_model.pipe.unet)
    items = [GenerationItem(item.subject, item.prompt, index) for index, item in enumerate(items[:4])]
    common = dict(num_inference_steps=run.size.invariance_steps, height=run.size.image_size, width=run.size.image_size, scale=IP_SCALE)
    one = inference_benchmark.our_path(ip_model, items, references, 1, **common)
    four = inference_benchmark.our_path(ip_model, items, references, 4, **common)
    differences = [np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)) for a, b in zip(one, four)]
    run.record(name, "max_pixel_difference", int(max(d.max() for d in differences)))
    run.record(name, "mean_pixel_difference", float(np.mean([d.mean() for d in differences])))


def build_stages(args: argparse.Namespace) -> dict[str, tuple[str, Callable[[Run, str], None]]]:
    """Stage name -> (budget key, function), in the order they run."""
    stages = {"models": ("models", stage_models)}
    first, *rest = args.precisions
    stages[f"train_{first}"] = ("train", stage_train(first, compile=False))
    stages["inference"] = ("inference", stage_inference(compile=False))
    stages["batch_invariance"] = ("batch_invariance", stage_batch_invariance)
    stages["inference_compile"] = ("inference_compile", stage_inference(compile=True))
    for precision in rest:
        stages[f"train_{precision}"] = ("train", stage_train(precision, compile=False))
    for precision in args.precisions:
        stages[f"train_{precision}_compile"] = ("train_compile", stage_train(precision, compile=True))
    return stages


def run_stages(run: Run, stages: dict[str, tuple[str, Callable[[Run, str], None]]]) -> None:
    names = list(stages)
    for name, (budget_key, function) in stages.items():
        budget = min(run.size.budgets_s[budget_key], run.left_s())
        if name != "models" and run.models is None:
            run.record(name, "error", "skipped: the models stage did not finish")
            continue
        if budget < 5:
            run.record(name, "error", f"skipped: {run.left_s():.0f} s of --budget_s left")
            continue
        started = time.perf_counter()
        print(f"[gpu_check] {name} (budget {budget:.0f} s) ...", flush=True)
        limit = {"expired": False}
        try:
            with time_limit(budget) as limit:
                function(run, name)
        except Exception as error:  # a failed stage is reported, the run goes on
            timeout = f"StageTimeout: stage budget of {budget:.0f} s exceeded ({type(error).__name__} raised)"
            run.record(name, "error", timeout if limit["expired"] else f"{type(error).__name__}: {error}")
            run.record(name, "traceback", traceback.format_exc()[-3000:])
        finally:
            if not GENERATOR_STAGES & set(names[names.index(name) + 1 :]):  # free it before training measures memory
                run.generation = None
            free_memory(run.device)
        run.record(name, "seconds", time.perf_counter() - started)
        status = run.stage(name).get("error", "ok")
        print(f"[gpu_check] {name}: {status} ({time.perf_counter() - started:.1f} s)", flush=True)


# ----------------------------------------------------------------------------------------------
# RESULTS.md


def _number(value: Any, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_section(results: dict[str, Any], template: str) -> str:
    """Fill the template of RESULTS.md's GPU section from results.json."""
    stages = results["stages"]
    train_rows, inference_rows, notes = [], [], []
    for name, stage in stages.items():
        if "error" in stage:
            notes.append(f"- `{name}` did not finish: {stage['error']}")
        if name.startswith("train_"):
            for variant in ("reference", "ours"):
                if variant in stage:
                    r = stage[variant]
                    label = f"{variant} + compile" if name.endswith("_compile") else variant
                    precision = stage.get("setup", {}).get("precision", "?")
                    train_rows.append(
                        f"| {precision} | {label} | {_number(r.get('pairs_per_s'))} | {_number(r.get('peak_gpu_gib'))} | "
                        f"{_number(r.get('mfu'), 3)} | {_number(r.get('compile_s'), 1)} |"
                    )
        if name.startswith("inference"):
            for variant in ("reference", "ours"):
                if variant in stage:
                    r = stage[variant]
                    label = f"{variant} + compile" if name.endswith("_compile") else variant
                    inference_rows.append(
                        f"| {label} | {r['batch_size']} | {_number(r['step_s'], 3)} | {_number(r['images_per_s_30_steps'], 3)} | "
                        f"{_number(r.get('peak_gpu_gib'))} | {_number(r.get('compile_s'), 1)} |"
                    )
    summary = []
    for name, stage in stages.items():
        compiled = stage.get("ours", {}) if name.endswith("_compile") else {}
        for key in ("speedup_vs_eager", "max_pixel_difference_vs_eager", "graphs_compiled_while_timed"):
            if key in compiled:
                summary.append(f"{name}.{key} = {_number(compiled[key], 3)}")
        for key in ("speedup", "memory_ratio", "max_pixel_difference_where_seeds_agree", "max_pixel_difference", "mean_pixel_difference"):
            if key in stage:
                summary.append(f"{name}.{key} = {_number(stage[key], 3)}")
    return template.format(
        device_name=results["device_name"],
        date=results["date"],
        torch=results["torch"],
        peak_tflops=_number(results["peak_tflops"], 0),
        elapsed_s=_number(results["elapsed_s"], 0),
        train_resolution=results["train_resolution"],
        train_pairs=results["train_pairs"],
        image_size=results["image_size"],
        training_rows="\n".join(train_rows) or "| – | – | – | – | – | – |",
        inference_rows="\n".join(inference_rows) or "| – | – | – | – | – | – |",
        summary="; ".join(summary) or "–",
        notes="\n".join(notes) or "- every stage finished",
    )


def write_results_md(results_json: Path, results_md: Path) -> None:
    text = results_md.read_text()
    template = text.split(TEMPLATE_BEGIN, 1)[1].split(TEMPLATE_END, 1)[0].strip("\n")
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    section = render_section(json.loads(results_json.read_text()), template)
    atomic_write(results_md, lambda path: path.write_text(f"{before}{BEGIN}\n{section}\n{END}{after}"))


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = gpu_check_parser(__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if cuda else "cpu")
    gpu = args.device == "cuda"
    if gpu and not cuda:
        parser.error("--device cuda: no CUDA device is available (use --size tiny --device cpu to check the script)")
    args.precisions = args.precisions or (["fp16", "bf16"] if gpu else ["no"])
    args.compile_backend = args.compile_backend or ("inductor" if gpu else "eager")
    args.budget_s = args.budget_s or {"full": 480.0, "mid": 3600.0, "tiny": 600.0}[args.size]
    args.work_dir = args.work_dir or Path(tempfile.gettempdir()) / "patchdpo_gpu_check"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    results = None
    if not args.no_run:
        args.out.mkdir(parents=True, exist_ok=True)
        args.work_dir.mkdir(parents=True, exist_ok=True)
        device = torch.device(args.device)
        if device.type == "cpu":
            torch.set_num_threads(1)  # tiny models: a second thread only adds contention
        run = Run(args, SIZES[args.size], device)
        stages = build_stages(args)
        if args.stages is not None:
            unknown = set(args.stages) - set(stages)
            if unknown:
                raise SystemExit(f"unknown stage(s) {sorted(unknown)}; stages: {list(stages)}")
            stages = {name: value for name, value in stages.items() if name == "models" or name in args.stages}
        print(f"[gpu_check] {run.results['device_name']}, size {args.size}, stages {list(stages)}", flush=True)
        run_stages(run, stages)
        results = run.results
        print(json.dumps(results["stages"], indent=1, default=str)[-6000:])
        print(f"[gpu_check] results in {run.path} ({results['elapsed_s']:.0f} s)")
    if args.write_results:
        write_results_md(args.out / "results.json", args.results_md)
        print(f"[gpu_check] wrote the GPU section of {args.results_md}")
    return results


if __name__ == "__main__":
    main()
