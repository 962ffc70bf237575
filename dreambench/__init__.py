"""DreamBench: the benchmark definition, a validated data loader and the CLIP-T / CLIP-I / DINO metrics.

The metric modules (`dreambench.metrics`, `dreambench.evaluation`) import CLIP and transformers, so
they are not imported here: reading the benchmark definition stays cheap.
"""

from dreambench.benchmark import SUBJECT_NAMES, SUBJECTS, Subject, get_subject, prompts_for
from dreambench.data import load_conditioning_images, load_reference_images, validate_dreambench

__all__ = [
    "SUBJECTS",
    "SUBJECT_NAMES",
    "Subject",
    "get_subject",
    "load_conditioning_images",
    "load_reference_images",
    "prompts_for",
    "validate_dreambench",
]
