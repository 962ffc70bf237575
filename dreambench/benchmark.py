"""DreamBench as data: the 30 subjects, their class words, the 25 prompts, the Kosmos-G images.

Scores are only comparable with published numbers if every method is asked the same 750
questions, so this module is the single source of the subject list, the class word put in each
prompt, and the prompt wording. The values follow the official PatchDPO evaluation code: DreamBooth's
prompt lists without the unique token (DreamBooth's 'a {0} {1} in the jungle' with token and class
becomes 'a backpack in the jungle'), and the one reference image per subject that Kosmos-G chose for
its single-image setting.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import BadInputError


@dataclass(frozen=True)
class Subject:
    """One DreamBench subject: its folder name, the class word used in prompts, the Kosmos-G image."""

    name: str
    class_word: str
    is_live: bool
    kosmosg_image: str

    @property
    def group(self) -> str:
        return "live" if self.is_live else "object"


OBJECT_PROMPT_TEMPLATES: tuple[str, ...] = (
    "a {0} in the jungle",
    "a {0} in the snow",
    "a {0} on the beach",
    "a {0} on a cobblestone street",
    "a {0} on top of pink fabric",
    "a {0} on top of a wooden floor",
    "a {0} with a city in the background",
    "a {0} with a mountain in the background",
    "a {0} with a blue house in the background",
    "a {0} on top of a purple rug in a forest",
    "a {0} with a wheat field in the background",
    "a {0} with a tree and autumn leaves in the background",
    "a {0} with the Eiffel Tower in the background",
    "a {0} floating on top of water",
    "a {0} floating in an ocean of milk",
    "a {0} on top of green grass with sunflowers around it",
    "a {0} on top of a mirror",
    "a {0} on top of the sidewalk in a crowded street",
    "a {0} on top of a dirt road",
    "a {0} on top of a white rug",
    "a red {0}",
    "a purple {0}",
    "a shiny {0}",
    "a wet {0}",
    "a cube shaped {0}",
)

LIVE_PROMPT_TEMPLATES: tuple[str, ...] = (
    "a {0} in the jungle",
    "a {0} in the snow",
    "a {0} on the beach",
    "a {0} on a cobblestone street",
    "a {0} on top of pink fabric",
    "a {0} on top of a wooden floor",
    "a {0} with a city in the background",
    "a {0} with a mountain in the background",
    "a {0} with a blue house in the background",
    "a {0} on top of a purple rug in a forest",
    "a {0} wearing a red hat",
    "a {0} wearing a santa hat",
    "a {0} wearing a rainbow scarf",
    "a {0} wearing a black top hat and a monocle",
    "a {0} in a chef outfit",
    "a {0} in a firefighter outfit",
    "a {0} in a police outfit",
    "a {0} wearing pink glasses",
    "a {0} wearing a yellow shirt",
    "a {0} in a purple wizard outfit",
    "a red {0}",
    "a purple {0}",
    "a shiny {0}",
    "a wet {0}",
    "a cube shaped {0}",
)

# Official order: the 21 objects, then the 9 live subjects. Generation shards and score tables
# follow this order, so it is part of the benchmark definition.
SUBJECTS: tuple[Subject, ...] = (
    Subject("backpack", "backpack", False, "02"),
    Subject("backpack_dog", "backpack", False, "02"),
    Subject("bear_plushie", "stuffed animal", False, "03"),
    Subject("berry_bowl", "bowl", False, "02"),
    Subject("can", "can", False, "01"),
    Subject("candle", "candle", False, "02"),
    Subject("clock", "clock", False, "03"),
    Subject("colorful_sneaker", "sneaker", False, "01"),
    Subject("duck_toy", "toy", False, "01"),
    Subject("fancy_boot", "boot", False, "02"),
    Subject("grey_sloth_plushie", "stuffed animal", False, "04"),
    Subject("monster_toy", "toy", False, "04"),
    Subject("pink_sunglasses", "glasses", False, "04"),
    Subject("poop_emoji", "toy", False, "00"),
    Subject("rc_car", "toy", False, "03"),
    Subject("red_cartoon", "cartoon", False, "00"),
    Subject("robot_toy", "toy", False, "00"),
    Subject("shiny_sneaker", "sneaker", False, "01"),
    Subject("teapot", "teapot", False, "04"),
    Subject("vase", "vase", False, "02"),
    Subject("wolf_plushie", "stuffed animal", False, "04"),
    Subject("cat", "cat", True, "04"),
    Subject("cat2", "cat", True, "02"),
    Subject("dog", "dog", True, "02"),
    Subject("dog2", "dog", True, "02"),
    Subject("dog3", "dog", True, "05"),
    Subject("dog5", "dog", True, "00"),
    Subject("dog6", "dog", True, "02"),
    Subject("dog7", "dog", True, "01"),
    Subject("dog8", "dog", True, "04"),
)

SUBJECT_NAMES: tuple[str, ...] = tuple(subject.name for subject in SUBJECTS)
_BY_NAME = {subject.name: subject for subject in SUBJECTS}


def get_subject(name: str) -> Subject:
    """Look a subject up by folder name; an unknown name is a one-line error listing the valid ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise BadInputError(f"unknown DreamBench subject {name!r}; expected one of: {', '.join(SUBJECT_NAMES)}") from None


def resolve_subjects(names: list[str] | tuple[str, ...] | None) -> list[Subject]:
    """The requested subjects in benchmark order (all 30 when `names` is None), duplicates dropped."""
    if names is None:
        return list(SUBJECTS)
    wanted = {get_subject(name).name for name in names}
    return [subject for subject in SUBJECTS if subject.name in wanted]


def prompts_for(subject: str | Subject) -> list[str]:
    """The 25 prompts of a subject, with its class word filled in; also the generated file names."""
    subject = subject if isinstance(subject, Subject) else get_subject(subject)
    templates = LIVE_PROMPT_TEMPLATES if subject.is_live else OBJECT_PROMPT_TEMPLATES
    return [template.format(subject.class_word) for template in templates]
