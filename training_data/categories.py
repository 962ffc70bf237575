"""Object categories and prompt templates for training-pair construction.

The categories are everyday objects and animals chosen to stay clear of DreamBench: none is a
DreamBench subject or class word (backpack, stuffed animal, bowl, can, candle, clock, sneaker, toy,
boot, glasses, cartoon, teapot, vase, cat, dog, ...), so the finetuned model never trains on the
benchmark's subjects. `tests/test_training_data_construct.py` checks this against the DreamBench
folder. Every prompt built from them is a valid file-name prompt (no `_` or `/`).
"""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import BadInputError

REFERENCE_TEMPLATE = "a photo of {object}, plain white background"

# Scene and style templates for the generated images; `{object}` includes its article.
SCENE_TEMPLATES: tuple[str, ...] = (
    "{object} on a wooden table in a cozy kitchen",
    "{object} on a sandy beach at sunset",
    "{object} in a snowy forest",
    "{object} on a city street at night",
    "{object} on a grassy meadow with wildflowers",
    "{object} on a bookshelf in an old library",
    "{object} on top of a mountain",
    "{object} in a bright modern living room",
    "{object} on a marble countertop",
    "{object} on a desk next to a laptop",
    "{object} on a picnic blanket in a park",
    "{object} on a rock by a river",
    "{object} in a shop window",
    "{object} on a balcony with a view of the sea",
    "{object} in a greenhouse full of plants",
    "{object} on a red brick wall background",
    "a cinematic photo of {object} in the rain",
    "a close-up photo of {object} in soft morning light",
    "a watercolor painting of {object}",
    "an oil painting of {object}",
    "a pencil sketch of {object}",
    "{object} in the style of a comic book",
    "a vintage film photo of {object}",
    "{object} in a futuristic neon-lit room",
)

OBJECT_CATEGORIES: tuple[str, ...] = (
    # kitchen and tableware
    "coffee mug",
    "ceramic plate",
    "wine glass",
    "water bottle",
    "thermos",
    "frying pan",
    "saucepan",
    "cutting board",
    "wooden spoon",
    "whisk",
    "toaster",
    "blender",
    "coffee grinder",
    "salt shaker",
    "pepper mill",
    "cake stand",
    "lunch box",
    "glass jar",
    "espresso machine",
    "rolling pin",
    # food
    "apple",
    "pear",
    "pineapple",
    "watermelon",
    "lemon",
    "avocado",
    "croissant",
    "loaf of bread",
    "cupcake",
    "donut",
    "pumpkin",
    "bunch of grapes",
    "strawberry tart",
    "pretzel",
    "cheese wheel",
    # furniture and home
    "armchair",
    "wooden stool",
    "table lamp",
    "floor lamp",
    "cushion",
    "ceramic planter",
    "potted cactus",
    "bonsai tree",
    "picture frame",
    "mirror",
    "laundry basket",
    "wicker basket",
    "umbrella",
    "sand timer",
    "globe",
    "birdhouse",
    "rocking chair",
    "side table",
    "bookend",
    # tools and devices
    "hammer",
    "screwdriver",
    "wrench",
    "tape measure",
    "flashlight",
    "padlock",
    "watering bucket",
    "garden trowel",
    "camera",
    "film camera",
    "headphones",
    "smartphone",
    "laptop",
    "computer mouse",
    "keyboard",
    "game controller",
    "radio",
    "record player",
    "typewriter",
    "microphone",
    "desk fan",
    "calculator",
    "electric kettle",
    # stationery and leisure
    "notebook",
    "fountain pen",
    "pencil case",
    "stapler",
    "paint palette",
    "easel",
    "guitar",
    "violin",
    "banjo",
    "trumpet",
    "drum",
    "harmonica",
    "chess piece",
    "rubik cube",
    "kite",
    "skateboard",
    "tennis racket",
    "basketball",
    "football",
    "baseball glove",
    "bicycle helmet",
    "roller skate",
    "surfboard",
    "fishing rod",
    "tent",
    "compass",
    "binoculars",
    # clothing and accessories (no footwear, bags or eyewear)
    "straw hat",
    "baseball cap",
    "wool scarf",
    "leather wallet",
    "wristwatch",
    "necklace",
    "bracelet",
    "ring",
    "bow tie",
    "necktie",
    "leather belt",
    "winter glove",
    "hand fan",
    # vehicles and models
    "bicycle",
    "scooter",
    "motorcycle",
    "sailboat",
    "hot air balloon",
    "tractor",
    "vintage bus",
    # animals (no cats, dogs or other DreamBench live subjects)
    "rabbit",
    "hamster",
    "parrot",
    "owl",
    "tortoise",
    "goldfish",
    "hedgehog",
    "horse",
    "goat",
    "sheep",
    "cow",
    "pig",
    "chicken",
    "penguin",
    "flamingo",
    "squirrel",
    "fox",
    "deer",
    "koala",
    "panda",
    "lion",
    "elephant",
    "giraffe",
    "zebra",
    "butterfly",
    "snail",
    "ladybug",
    "frog",
)


def with_article(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def load_categories(path: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The shipped list, or one category per non-empty, non-`#` line of a text file."""
    if path is None:
        return OBJECT_CATEGORIES
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"category list not found: {path}")
    lines = [line.strip() for line in path.read_text().splitlines()]
    categories = tuple(line for line in lines if line and not line.startswith("#"))
    if not categories:
        raise BadInputError(f"{path} lists no categories (one per line, '#' starts a comment)")
    return categories
