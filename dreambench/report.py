"""A self-contained Markdown report of one train -> infer -> evaluate run.

People judge a personalization run by looking at it: the loss curve, where the quality maps put
weight, the generations of the starting and the trained model next to each other, and the three
DreamBench numbers, under a header that says how the run was made (configuration, library
versions, device, wall time). Figures are drawn with matplotlib and copied next to `report.md`, so
the folder can be moved or shared as is.
"""

from __future__ import annotations

import os
import platform
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.images import load_rgb_image
from common.io import atomic_path, atomic_write
from dreambench.evaluation import format_score_table
from dreambench.generation import image_path
from dreambench.run_config import library_versions

SMOOTHING = 0.9  # exponential moving average of the loss, as TensorBoard's smoothing slider


def read_scalar(log_dir: str | os.PathLike, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one TensorBoard scalar, from every event file under `log_dir`."""
    points: dict[int, float] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            points.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return sorted(points.items())


def smoothed(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing), so the first points are not pulled to 0."""
    result, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        result.append(average / (1 - weight**count))
    return result


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_loss(points: Sequence[tuple[int, float]], path: Path, ylabel: str) -> Path:
    """Raw per-step loss and its moving average against the optimizer step."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.5))
    if points:
        steps, values = zip(*points)
        axis.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=1, label="per step (raw)")
        axis.plot(steps, smoothed(values), color="tab:blue", linewidth=2, label=f"moving average ({SMOOTHING})")
        axis.legend()
    else:
        axis.text(0.5, 0.5, "no loss logged", ha="center", transform=axis.transAxes)
    axis.set(xlabel="optimizer step", ylabel=ylabel, title="PatchDPO training loss")
    axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_overlay(panel_path: Path, path: Path, colors: Callable[[torch.Tensor], np.ndarray]) -> Path:
    """A quality-map panel with the colour scale of its maps."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    plt = _pyplot()
    panel = load_rgb_image(panel_path)
    figure, axis = plt.subplots(figsize=(panel.width / 100, panel.height / 100 + 0.6))
    axis.imshow(panel)
    axis.axis("off")
    colormap = ListedColormap(colors(torch.linspace(0, 1, 256)[None])[0] / 255.0)
    bar = figure.colorbar(ScalarMappable(Normalize(0, 1), colormap), ax=axis, orientation="horizontal", fraction=0.06, pad=0.02)
    bar.set_label("map value: 0 = patch not reproduced ... 1 = reproduced (reference background: 1 = masked out)")
    return _save(figure, path)


def plot_start_vs_trained(
    subject: str, prompts: Sequence[str], references: Sequence[Image.Image], start_dir: Path, trained_dir: Path, path: Path
) -> Path:
    """References on top; then per prompt the starting model's image (left) next to the trained one's (right)."""
    plt = _pyplot()
    columns = max(5, len(references))  # every reference on the first row
    rows = 1 + -(-len(prompts) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.6, rows * 1.75), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, reference in zip(axes[0], references):
        axis.imshow(reference)
        axis.set_title("reference", fontsize=7)
    for index, prompt in enumerate(prompts):
        start, trained = (load_rgb_image(image_path(folder, subject, prompt)) for folder in (start_dir, trained_dir))
        pair = np.concatenate(
            [np.asarray(start.resize((128, 128))), np.full((128, 4, 3), 255, np.uint8), np.asarray(trained.resize((128, 128)))], 1
        )
        axis = axes[1 + index // columns][index % columns]
        axis.imshow(pair)
        axis.set_title("\n".join(textwrap.wrap(prompt, 34)[:2]), fontsize=6)
    figure.suptitle(f"{subject}: starting model (left) | PatchDPO-trained (right), same seed per prompt", fontsize=9)
    return _save(figure, path)


def environment() -> dict[str, str]:
    """Library versions and the device the run used."""
    import accelerate
    import matplotlib

    versions = {**library_versions(), "accelerate": accelerate.__version__, "matplotlib": matplotlib.__version__}
    versions["python"] = sys.version.split()[0]
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    return {**versions, "device": device}


@dataclass
class RunReport:
    """What one run produced; `write` lays it out under `report_dir`."""

    title: str
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    steps: list[tuple[str, float]] = field(default_factory=list)
    loss_points: list[tuple[int, float]] = field(default_factory=list)
    loss_label: str = "loss"
    overlays: list[Path] = field(default_factory=list)
    #: red -> green colouring of map values (patch_quality.visualize.quality_colors), for the colour bar
    quality_colors: Callable[[torch.Tensor], np.ndarray] | None = None
    #: (subject, prompts, references, start folder, trained folder) per evaluated subject
    comparisons: list[tuple[str, list[str], list[Image.Image], Path, Path]] = field(default_factory=list)
    #: Evaluation results (`score_generations` output) by model label, e.g. before / after training.
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: (stage, the shell command that redoes it from the working folder)
    commands: list[tuple[str, str]] = field(default_factory=list)

    def write(self, report_dir: str | os.PathLike, wall_seconds: float | None = None) -> Path:
        report_dir = Path(report_dir)
        figures = report_dir / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        lines = [f"# {self.title}", ""]
        lines += [f"> {note}\n" for note in self.notes]
        lines += self._header(wall_seconds)
        if self.steps:
            lines += ["## Steps", "", "| step | seconds |", "|---|---:|"]
            lines += [f"| {name} | {seconds:.1f} |" for name, seconds in self.steps] + [""]
        if self.commands:
            lines += ["## Commands", "", "Each stage by hand, from the folder the run was started in:", "", "```bash"]
            lines += [line for stage, command in self.commands for line in (f"# {stage}", command)] + ["```", ""]
        plot_loss(self.loss_points, figures / "loss_curve.png", self.loss_label)
        lines += ["## Training loss", "", "![training loss](figures/loss_curve.png)", ""]
        lines += [
            "## Patch-quality maps",
            "",
            "Each panel: reference | reference map | generated image | generated map. Reference map: how well the generated "
            "image reproduces each reference patch (training up-weights the red ones); its background is set to 1 (green) "
            "to mask it out of training, which does not mean it was reproduced. Generated map: how faithful each generated "
            "patch is to the reference (training learns from green patches).",
            "",
        ]
        for panel in self.overlays:
            target = figures / f"overlay_{panel.stem}.png"
            plot_overlay(panel, target, self.quality_colors) if self.quality_colors else _copy(panel, target)
            lines += [f"![{panel.stem}](figures/{target.name})", ""]
        if self.comparisons:
            lines += ["## Starting model vs trained model", ""]
        for subject, prompts, references, start_dir, trained_dir in self.comparisons:
            target = plot_start_vs_trained(subject, prompts, references, start_dir, trained_dir, figures / f"compare_{subject}.png")
            lines += [f"![{subject}](figures/{target.name})", ""]
        if self.scores:
            lines += ["## DreamBench metrics", "", "| model | subject | DINO | CLIP-I | CLIP-T |", "|---|---|---:|---:|---:|"]
            for label, result in self.scores.items():
                for name, row in result["subjects"].items():
                    lines.append(f"| {label} | {name} | {row['dino_score']:.4f} | {row['clipi_score']:.4f} | {row['clipt_score']:.4f} |")
                lines.append(
                    f"| **{label}** | **mean** | **{result['dino_score']:.4f}** | **{result['clipi_score']:.4f}** "
                    f"| **{result['clipt_score']:.4f}** |"
                )
            lines.append("")
            for label, result in self.scores.items():
                lines += [f"{label}:", "```", format_score_table(result), "```", ""]
        path = report_dir / "report.md"
        atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))
        return path

    def _header(self, wall_seconds: float | None) -> list[str]:
        lines = ["## Run", ""]
        if wall_seconds is not None:
            lines += [f"Total wall time: **{wall_seconds:.0f} s**", ""]
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| `{key}` | `{value}` |" for key, value in self.config.items()]
        lines += ["", "| environment | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in environment().items()]
        return [*lines, ""]


def _copy(source: Path, target: Path) -> Path:
    atomic_write(target, lambda tmp: tmp.write_bytes(source.read_bytes()))
    return target
