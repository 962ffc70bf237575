"""The benchmark definition against DreamBench's own prompt file and the official evaluation lists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dreambench.benchmark import (
    LIVE_PROMPT_TEMPLATES,
    OBJECT_PROMPT_TEMPLATES,
    SUBJECT_NAMES,
    SUBJECTS,
    get_subject,
    prompts_for,
    resolve_subjects,
)

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "dreambench"

# Transcribed from the official evaluation code (objects, then live subjects) and Kosmos-G's list.
OFFICIAL_ORDER = (
    "backpack backpack_dog bear_plushie berry_bowl can candle clock colorful_sneaker duck_toy fancy_boot "
    "grey_sloth_plushie monster_toy pink_sunglasses poop_emoji rc_car red_cartoon robot_toy shiny_sneaker "
    "teapot vase wolf_plushie cat cat2 dog dog2 dog3 dog5 dog6 dog7 dog8"
).split()
KOSMOSG_IMAGES = dict(
    pair.split()
    for pair in (
        "backpack 02, backpack_dog 02, bear_plushie 03, berry_bowl 02, can 01, candle 02, cat 04, cat2 02, "
        "clock 03, colorful_sneaker 01, dog 02, dog2 02, dog3 05, dog5 00, dog6 02, dog7 01, dog8 04, "
        "duck_toy 01, fancy_boot 02, grey_sloth_plushie 04, monster_toy 04, pink_sunglasses 04, poop_emoji 00, "
        "rc_car 03, red_cartoon 00, robot_toy 00, shiny_sneaker 01, teapot 04, vase 02, wolf_plushie 04"
    ).split(", ")
)


def _parse_prompt_file() -> tuple[dict[str, str], list[str], list[str]]:
    """Classes and both prompt lists of DreamBooth's prompts_and_classes.txt, unique token dropped."""
    text = (DREAMBENCH / "dataset" / "prompts_and_classes.txt").read_text()
    classes_part, prompts_part = text.split("Prompts", 1)
    classes = dict(line.split(",", 1) for line in classes_part.splitlines() if "," in line and line != "subject_name,class")
    object_part, live_part = prompts_part.split("Live Subject Prompts")

    def templates(part: str) -> list[str]:
        return [t.replace("{0} {1}", "{0}") for t in re.findall(r"'(.*?)'\.format\(unique_token, class_token\)", part)]

    return classes, templates(object_part), templates(live_part)


def test_subjects_match_dreambench_folders_and_official_order():
    folders = sorted(p.name for p in (DREAMBENCH / "dataset").iterdir() if p.is_dir())
    assert sorted(SUBJECT_NAMES) == folders
    assert list(SUBJECT_NAMES) == OFFICIAL_ORDER
    assert [s.is_live for s in SUBJECTS] == [False] * 21 + [True] * 9
    assert {s.group for s in SUBJECTS[21:]} == {"live"}


def test_class_words_and_prompt_templates_match_prompt_file():
    classes, object_templates, live_templates = _parse_prompt_file()
    assert {s.name: s.class_word for s in SUBJECTS} == classes
    assert list(OBJECT_PROMPT_TEMPLATES) == object_templates and len(object_templates) == 25
    assert list(LIVE_PROMPT_TEMPLATES) == live_templates and len(live_templates) == 25


def test_kosmosg_images_match_published_list_and_exist():
    assert {s.name: s.kosmosg_image for s in SUBJECTS} == KOSMOSG_IMAGES
    for subject in SUBJECTS:
        assert (DREAMBENCH / "dataset" / subject.name / f"{subject.kosmosg_image}.jpg").is_file()


def test_prompts_fill_the_class_word_without_unique_token():
    assert prompts_for("backpack")[0] == "a backpack in the jungle"
    assert prompts_for("bear_plushie")[-1] == "a cube shaped stuffed animal"
    assert prompts_for(get_subject("dog8"))[10] == "a dog wearing a red hat"
    assert prompts_for("teapot")[10] == "a teapot with a wheat field in the background"
    for subject in SUBJECTS:
        prompts = prompts_for(subject)
        assert len(set(prompts)) == 25
        assert all(subject.class_word in p and "{" not in p and "sks" not in p for p in prompts)
        assert all("/" not in p for p in prompts)  # prompts are file names


def test_unknown_subject_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown DreamBench subject 'dog4'") as info:
        get_subject("dog4")
    assert "\n" not in str(info.value)


def test_resolve_subjects_keeps_benchmark_order():
    assert [s.name for s in resolve_subjects(["dog", "backpack", "dog"])] == ["backpack", "dog"]
    assert resolve_subjects(None) == list(SUBJECTS)
