"""A self-contained Markdown report of one train -> infer -> evaluate run.

People judge a personalization run by looking at it: the loss curve, where the quality maps put
weight, the generations next to their reference, and the three DreamBench numbers. The report
gathers exactly those, copied next to `report.md` so the folder can be moved or shared as is.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.io import atomic_save_image, atomic_write
from dreambench.evaluation import format_score_table


def read_scalar(log_dir: str | os.PathLike, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one TensorBoard scalar, from every event file under `log_dir`."""
    points: dict[int, float] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            points.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return sorted(points.items())


def plot_curve(points: Sequence[tuple[int, float]], title: str, size: tuple[int, int] = (640, 360)) -> Image.Image:
    """A plain line chart (min/max labelled) drawn with PIL, to keep plotting libraries out of the requirements."""
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if not points:
        draw.text((left + 10, top + 10), "no data logged", fill="black")
        return image
    steps, values = zip(*points)
    low, high = min(values), max(values)
    span_y = (high - low) or 1.0
    span_x = (steps[-1] - steps[0]) or 1

    def xy(step: int, value: float) -> tuple[float, float]:
        x = left + (step - steps[0]) / span_x * (width - left - right)
        y = height - bottom - (value - low) / span_y * (height - top - bottom)
        return x, y

    line = [xy(step, value) for step, value in points]
    if len(line) == 1:
        draw.ellipse([line[0][0] - 3, line[0][1] - 3, line[0][0] + 3, line[0][1] + 3], fill="royalblue")
    else:
        draw.line(line, fill="royalblue", width=2)
    draw.text((4, top - 6), f"{high:.4g}", fill="black")
    draw.text((4, height - bottom - 6), f"{low:.4g}", fill="black")
    draw.text((left, height - bottom + 8), f"step {steps[0]}", fill="black")
    draw.text((width - right - 70, height - bottom + 8), f"step {steps[-1]}", fill="black")
    return image


@dataclass
class RunReport:
    """What one run produced; `write` lays it out under `report_dir`."""

    title: str
    notes: list[str] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)
    loss_points: list[tuple[int, float]] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    contact_sheets: list[Path] = field(default_factory=list)
    #: Evaluation results (`evaluate_generations` output) by model label, e.g. before / after training.
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)

    def write(self, report_dir: str | os.PathLike) -> Path:
        report_dir = Path(report_dir)
        figures = report_dir / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        lines = [f"# {self.title}", ""]
        lines += [f"> {note}" for note in self.notes] + [""]
        if self.steps:
            lines += ["## Steps", "", "| step | seconds |", "|---|---:|"]
            lines += [f"| {name} | {seconds:.1f} |" for name, seconds in self.steps] + [""]
        atomic_save_image(plot_curve(self.loss_points, "PatchDPO training loss"), figures / "loss_curve.png")
        lines += ["## Training loss", "", "![training loss](figures/loss_curve.png)", ""]
        lines += self._images(
            "Patch-quality maps (reference, its map, generated image, its map; green = well reproduced)", self.overlays, figures
        )
        lines += self._images("Contact sheets (reference crop, then one generation per prompt)", self.contact_sheets, figures)
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

    @staticmethod
    def _images(heading: str, paths: Sequence[Path], figures: Path) -> list[str]:
        lines = [f"## {heading}", ""]
        for path in paths:
            target = figures / f"{path.parent.name}_{path.name}"
            shutil.copyfile(path, target)
            lines += [f"![{path.stem}](figures/{target.name})", ""]
        if not paths:
            lines += ["(none produced)", ""]
        return lines
