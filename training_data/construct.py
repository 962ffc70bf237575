"""Build PatchDPO training pairs: clean-background references and IP-Adapter-Plus generations.

Following the paper, the base pipeline (SDXL in the paper, or SD 1.5) draws one object per reference image on a plain white
background ("a photo of {object}, plain white background"), so object and background are never
confused; IP-Adapter-Plus, the model being improved, then generates `--num_generated` images from
each reference. Our choices (see README.md): objects from `training_data.categories` (no DreamBench
subject), sample i takes category i mod C and a scene/style template drawn by a sha256 hash, and
the K generated images of a sample share its prompt (the official layout names a folder's files
by one prompt) and differ by seed.

    DATA/sample{i}/{prompt}_entity_0.png    reference
    DATA/sample{i}/{prompt}_gen_{k}.png     generated, k = 0..K-1
    DATA/manifest.json                      every sample, prompt, seed and model used

Every image's noise comes from a CPU generator seeded with `stable_seed(seed, role, i[, k])`, so
the data does not depend on the number of processes or the batch size. Work is split by image over
the accelerate processes; rerunning the same command skips the images on disk (written
atomically) and refuses to mix settings with a folder made differently.

    accelerate launch -m training_data.construct --base_model_path SDXL_DIR \
        --image_encoder_path ENC_DIR --ip_ckpt ip-adapter-plus_sdxl_vit-h.bin --output_dir DATA \
        --num_samples 30000 --num_generated 1
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from training_data.cli import construct_config

if __name__ == "__main__":
    construct_config()  # --help and a wrong flag answer before the imports below load torch

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline
from PIL import Image

from base_models import family_of
from base_models.generation import check_generator_paths, load_generation_pipeline, with_model_defaults, wrap_pipeline
from common.batching import generate_and_save
from common.checks import require_flags_in_range, require_sampling_args, require_template_fields
from common.distributed import launch_run, owning_output_dir
from common.errors import BadInputError
from common.flags import sampling_settings
from common.hub import recorded_name
from common.images import load_photo, load_rgb_image
from common.io import atomic_save_image, atomic_write_json, remove_stale_temp_files, sha256_file
from common.launch import check_launch
from common.outputs import check_output_dir
from common.recorded_settings import read_recorded, refuse_other_settings
from common.seeds import stable_seed
from ip_adapter.batch_generation import GenerationItem, SubjectTokens, generate_batch
from ip_adapter.ip_adapter import DEFAULT_NEGATIVE_PROMPT, ImagePromptAdapter
from ip_adapter.loading import check_ip_ckpt, dtype_name, resolve_dtype
from ip_adapter.speed import apply_speed_settings
from patch_quality import layout
from training_data.categories import REFERENCE_TEMPLATE, SCENE_TEMPLATES, load_categories, with_article
from training_data.cli import CONSTRUCT_PROG
from training_data.config import ConstructConfig

MANIFEST_FORMAT = "patchdpo-training-pairs/1"


@dataclass(frozen=True)
class SamplePlan:
    """Everything one sample folder is made from; a pure function of the settings and its index."""

    index: int
    object: str
    reference_prompt: str
    prompt: str
    reference_seed: int
    generated_seeds: tuple[int, ...]

    @property
    def folder(self) -> str:
        return f"sample{self.index}"

    def reference_path(self, root: Path) -> Path:
        return layout.reference_path(layout.sample_dir(root, self.index), self.prompt)

    def generated_path(self, root: Path, k: int) -> Path:
        return layout.generated_path(layout.sample_dir(root, self.index), self.prompt, k)


def plan_samples(
    num_samples: int,
    num_generated: int,
    seed: int,
    categories: Sequence[str],
    templates: Sequence[str] = SCENE_TEMPLATES,
    reference_template: str = REFERENCE_TEMPLATE,
) -> list[SamplePlan]:
    plans = []
    for index in range(num_samples):
        name = with_article(categories[index % len(categories)])
        template = templates[stable_seed(seed, "template", index) % len(templates)]
        prompt = layout.check_prompt(template.format(object=name))
        plans.append(
            SamplePlan(
                index=index,
                object=categories[index % len(categories)],
                reference_prompt=reference_template.format(object=name),
                prompt=prompt,
                reference_seed=stable_seed(seed, "reference", index),
                generated_seeds=tuple(stable_seed(seed, "generated", index, k) for k in range(num_generated)),
            )
        )
    return plans


def build_manifest(
    settings: dict[str, Any], plans: Sequence[SamplePlan], complete: bool, photo_digests: dict[str, str] | None = None
) -> dict[str, Any]:
    """`photo_digests` (sample folder -> SHA-256 of its given photo) let a rerun rebuild exactly the samples whose photo changed."""
    return {
        "format": MANIFEST_FORMAT,
        "settings": settings,
        "complete": complete,
        "photo_sha256": photo_digests,
        "samples": [
            {
                **asdict(plan),
                "generated_seeds": list(plan.generated_seeds),
                "folder": plan.folder,
                "reference": plan.reference_path(Path()).name,
                "generated": [plan.generated_path(Path(), k).name for k in range(len(plan.generated_seeds))],
            }
            for plan in plans
        ],
    }


# What sets a recorded setting, when it is not the flag of the same name.
SETTING_SOURCES = {
    "ip_ckpt_sha256": "--ip_ckpt (the file's content)",
    "negative_prompt_reference": "--negative_prompt",
    "negative_prompt_generated": "the generated images' negative prompt (this version of the code)",
    "dtype": "--dtype (or accelerate's mixed precision)",
}


def check_manifest(output_dir: Path, manifest: dict[str, Any]) -> None:
    """Refuse to add images to a folder whose manifest records other settings, naming each flag with its recorded and new value."""
    path = output_dir / layout.MANIFEST_NAME
    recorded = read_recorded(path, "manifest")
    if recorded is None:
        return
    if recorded.get("format") != MANIFEST_FORMAT or not isinstance(recorded.get("settings"), dict):
        raise BadInputError(f"{path}: not a {MANIFEST_FORMAT} manifest; use a new --output_dir")
    settings, now = recorded["settings"], manifest["settings"]
    differences = [
        f"{SETTING_SOURCES.get(key, '--' + key)}: recorded {settings.get(key)!r}, now {value!r}"
        for key, value in now.items()
        if settings.get(key) != value
    ]
    if recorded.get("samples") != manifest["samples"]:
        categories_flag = "--categories" if now["reference_images"] is None else "--reference_images"
        differences += plan_differences(recorded.get("samples"), manifest["samples"], settings.get("seed") != now["seed"], categories_flag)
    refuse_other_settings(path, settings, now, (), other_differences=differences)


def plan_differences(recorded: Any, now: list[dict[str, Any]], seed_changed: bool, categories_flag: str) -> list[str]:
    """Which flag makes the sample plan differ from the recorded one (the plan is a function of the flags and the code).

    A new seed draws other templates and seeds, so with `seed_changed` only the flags it does not explain are named.
    """
    if not (isinstance(recorded, list) and recorded and all(isinstance(sample, dict) for sample in recorded)):
        return ["the manifest lists no samples; use a new --output_dir"]
    differences = []
    if len(recorded) != len(now):
        differences.append(f"--num_samples: recorded {len(recorded)}, now {len(now)}")
    generated = len(recorded[0].get("generated_seeds") or ()), len(now[0]["generated_seeds"])
    if generated[0] != generated[1]:
        differences.append(f"--num_generated: recorded {generated[0]}, now {generated[1]}")
    for key, source in (
        ("object", categories_flag + ": {folder}'s object"),
        ("reference_prompt", "--reference_template: {folder}'s reference prompt"),
        ("prompt", "the scene templates (this version of the code): {folder}'s prompt"),
    ):
        changed = next((pair for pair in zip(recorded, now) if pair[0].get(key) != pair[1][key]), None)
        if changed is not None and not (seed_changed and key == "prompt"):
            differences.append(f"{source.format(folder=changed[1]['folder'])} recorded {changed[0].get(key)!r}, now {changed[1][key]!r}")
            break  # another object changes both prompts
    if not differences and not seed_changed:
        differences.append("the sample plan differs (this version of the code plans samples otherwise)")
    return differences


def remove_samples_of_changed_photos(
    output_dir: Path, plans: Sequence[SamplePlan], photo_digests: dict[str, str] | None, given: list[dict[str, str]] | None
) -> None:
    """Delete the images of each sample whose given photo changed since the manifest was written, so they are made again."""
    recorded = (read_recorded(output_dir / layout.MANIFEST_NAME, "manifest") or {}).get("photo_sha256") or {}
    for plan in plans:
        if photo_digests is None or recorded.get(plan.folder) in (None, photo_digests[plan.folder]):
            continue
        print(f"the photo of {plan.folder} changed ({given[plan.index]['image']}): making its reference and generated images again")
        for path in (plan.reference_path(output_dir), *(plan.generated_path(output_dir, k) for k in range(len(plan.generated_seeds)))):
            path.unlink(missing_ok=True)


def generate_references(
    pipe: DiffusionPipeline,
    plans: Sequence[SamplePlan],
    output_dir: Path,
    batch_size: int,
    num_inference_steps: int,
    negative_prompt: str,
    position: int = 0,
    **pipeline_kwargs: Any,
) -> int:
    """Base-model references for `plans`, saved atomically batch by batch; returns the count."""

    def generate(batch: Sequence[SamplePlan]) -> list[Image.Image]:
        return pipe(
            prompt=[plan.reference_prompt for plan in batch],
            negative_prompt=[negative_prompt] * len(batch),
            generator=[torch.Generator("cpu").manual_seed(plan.reference_seed) for plan in batch],
            num_inference_steps=num_inference_steps,
            **pipeline_kwargs,
        ).images

    return generate_and_save(
        list(plans), batch_size, generate, lambda plan: plan.reference_path(output_dir), f"references [{position}]", position
    )


def generate_pairs(
    ip_model: ImagePromptAdapter,
    plans: Sequence[SamplePlan],
    items: Sequence[tuple[int, int]],
    output_dir: Path,
    batch_size: int,
    num_inference_steps: int,
    position: int = 0,
    *,
    scale: float,
    **pipeline_kwargs: Any,
) -> int:
    """IP-Adapter-Plus images at `scale` for (sample index, k) `items`, conditioned on each sample's reference."""
    by_folder = {plan.folder: plan for plan in plans}

    def load_reference(folder: str) -> list[Image.Image]:
        return [load_rgb_image(by_folder[folder].reference_path(output_dir))]

    tokens = SubjectTokens(ip_model, load_reference)

    def generate(batch: Sequence[tuple[int, int]]) -> list[Image.Image]:
        rows = [GenerationItem(plans[i].folder, plans[i].prompt, plans[i].generated_seeds[k]) for i, k in batch]
        return generate_batch(ip_model, tokens, rows, num_inference_steps, scale=scale, **pipeline_kwargs)

    return generate_and_save(
        list(items),
        batch_size,
        generate,
        lambda item: plans[item[0]].generated_path(output_dir, item[1]),
        f"generated [{position}]",
        position,
    )


def load_reference_images(path: Path) -> list[dict[str, str]]:
    """Given references (e.g. real photos, the paper's ablation, or the demo's DreamBench crops)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"--reference_images {path}: unreadable JSON ({type(exc).__name__})") from None
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("category"), str) for e in entries)
    ):
        raise BadInputError(f'--reference_images {path}: expected a non-empty JSON list of {{"image": path, "category": word}}')
    for entry in entries:
        if not Path(entry["image"]).is_file():
            raise BadInputError(f"--reference_images {path}: image not found: {entry['image']}")
        load_photo(entry["image"])  # unreadable or tiny: one line now, before any model loads
    return entries


def _with_references(config: ConstructConfig) -> tuple[ConstructConfig, list[dict[str, str]] | None]:
    """The checked settings, with --num_samples fixed by the --reference_images entries, and those entries (None when references are drawn)."""
    given = load_reference_images(config.reference_images) if config.reference_images is not None else None
    if given is not None:
        if config.num_samples not in (None, len(given)):
            raise BadInputError(f"--num_samples {config.num_samples} disagrees with the {len(given)} images of --reference_images")
        config = replace(config, num_samples=len(given))
    elif config.num_samples is None:
        raise BadInputError("--num_samples is required (or pass --reference_images)")
    require_flags_in_range(config, ("num_samples", "num_generated", "batch_size"), minimum=1)
    require_flags_in_range(config, ("scale",), minimum=0)
    config = with_model_defaults(config)
    require_sampling_args(config)
    require_template_fields("--reference_template", config.reference_template, ["object"])
    check_generator_paths(config.base_model_path, config.image_encoder_path, config.ip_ckpt)
    check_output_dir(config.output_dir)
    return config, given


def _settings(config: ConstructConfig, dtype: torch.dtype, given: list[dict[str, str]] | None) -> dict[str, Any]:
    """Everything the images depend on, as recorded in the manifest."""
    return {
        "base_model_path": recorded_name(config.base_model_path),
        "image_encoder_path": recorded_name(config.image_encoder_path),
        "ip_ckpt": recorded_name(config.ip_ckpt),
        "ip_ckpt_sha256": sha256_file(check_ip_ckpt(config.ip_ckpt)),
        "scale": config.scale,
        **sampling_settings(config),
        "seed": config.seed,
        "negative_prompt_reference": config.negative_prompt,
        "negative_prompt_generated": DEFAULT_NEGATIVE_PROMPT,
        "dtype": dtype_name(dtype),
        "reference_images": None
        if given is None
        else {"list": str(config.reference_images.resolve()), "sha256": sha256_file(config.reference_images)},
    }


def _make_references(
    config: ConstructConfig,
    accelerator: Accelerator,
    pipe: DiffusionPipeline | None,
    pending: list[SamplePlan],
    given: list[dict[str, str]] | None,
) -> None:
    """Copy the given references, or draw them with the base pipeline, sharded over the processes."""
    with accelerator.split_between_processes(pending) as shard:
        if given is not None:
            for plan in shard:
                atomic_save_image(load_photo(given[plan.index]["image"]), plan.reference_path(config.output_dir))
        elif shard:
            generate_references(
                pipe,
                shard,
                config.output_dir,
                config.batch_size,
                negative_prompt=config.negative_prompt,
                position=accelerator.process_index,
                **sampling_settings(config),
            )


def _make_generated(
    config: ConstructConfig,
    accelerator: Accelerator,
    pipe: DiffusionPipeline,
    plans: list[SamplePlan],
    pending: list[tuple[int, int]],
    ip_checkpoint: dict[str, Any],
) -> None:
    """IP-Adapter-Plus generations of the pending (sample, k), sharded over the processes."""
    # Installing the adapter changes the UNet's attention, so it happens after the references.
    family = family_of(config.base_model_path, "--base_model_path")
    ip_model = wrap_pipeline(pipe, family, config.image_encoder_path, ip_checkpoint, config.ip_ckpt, accelerator.device)
    apply_speed_settings(ip_model.denoiser, compile=config.compile, allow_tf32=config.allow_tf32, announce=accelerator.print)
    with accelerator.split_between_processes(pending) as shard:
        generate_pairs(
            ip_model,
            plans,
            shard,
            config.output_dir,
            config.batch_size,
            position=accelerator.process_index,
            scale=config.scale,
            **sampling_settings(config),
        )


def run(config: ConstructConfig, accelerator: Accelerator, held: contextlib.ExitStack) -> list[SamplePlan]:
    """Build the pairs; the output folder is claimed into `held` once the inputs are checked (released when `held` closes)."""
    check_launch(accelerator.num_processes, "-m training_data.construct")
    config, given = _with_references(config)
    family = family_of(config.base_model_path, "--base_model_path")
    ip_checkpoint = family.ip_adapter_class().read_checkpoint(check_ip_ckpt(config.ip_ckpt))  # a NaN or wiped one fails before any image
    categories = [entry["category"] for entry in given] if given is not None else load_categories(config.categories)
    output_dir = config.output_dir
    plans = plan_samples(config.num_samples, config.num_generated, config.seed, categories, reference_template=config.reference_template)
    held.enter_context(owning_output_dir(accelerator, output_dir))
    dtype = resolve_dtype(config.dtype, accelerator.mixed_precision, accelerator.device)
    settings = _settings(config, dtype, given)
    photo_digests = None if given is None else {plan.folder: sha256_file(given[plan.index]["image"]) for plan in plans}
    manifest = build_manifest(settings, plans, complete=False, photo_digests=photo_digests)
    check_manifest(output_dir, manifest)  # every process checks, so all of them stop together
    if accelerator.is_main_process:
        remove_samples_of_changed_photos(output_dir, plans, photo_digests, given)
    accelerator.wait_for_everyone()

    pending_references = [plan for plan in plans if not plan.reference_path(output_dir).is_file()]
    pending_generated = [
        (plan.index, k) for plan in plans for k in range(config.num_generated) if not plan.generated_path(output_dir, k).is_file()
    ]
    accelerator.wait_for_everyone()  # all processes list the same pending work before anything is written
    accelerator.print(
        f"{len(plans) - len(pending_references)}/{len(plans)} references and "
        f"{len(plans) * config.num_generated - len(pending_generated)}/{len(plans) * config.num_generated} generated images exist; "
        f"{accelerator.num_processes} process(es), {dtype_name(dtype)}"
    )
    needs_pipe = (pending_references and given is None) or pending_generated
    pipe = load_generation_pipeline(config.base_model_path, dtype).to(accelerator.device) if needs_pipe else None
    if accelerator.is_main_process:
        remove_stale_temp_files(output_dir, [plan.folder for plan in plans])
        atomic_write_json(output_dir / layout.MANIFEST_NAME, manifest)
    accelerator.wait_for_everyone()

    if pending_references:
        _make_references(config, accelerator, pipe, pending_references, given)
    accelerator.wait_for_everyone()  # every reference exists before any generation reads one
    if pending_generated:
        _make_generated(config, accelerator, pipe, plans, pending_generated, ip_checkpoint)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(output_dir / layout.MANIFEST_NAME, build_manifest(settings, plans, complete=True, photo_digests=photo_digests))
    return plans


def main(argv: list[str] | None = None) -> None:
    config = construct_config(argv)
    accelerator = launch_run(CONSTRUCT_PROG, config, run, config.ddp_timeout)
    accelerator.print(f"training pairs in {Path(config.output_dir).resolve()}/sample*/")


if __name__ == "__main__":
    main()
