"""Every script's --help lists the defaults and answers in under 2 s, without importing torch, diffusers, transformers or accelerate."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs the script's --help in a fresh interpreter and reports its text, the help formatter that wrote
# it (a help text such as "(default: a temporary folder)" would pass a look for "(default:" without it)
# and the heavy libraries it loaded.
PROBE = r"""
import argparse, contextlib, io, json, runpy, sys
formatters = []
format_help = argparse.ArgumentParser.format_help
argparse.ArgumentParser.format_help = lambda self: formatters.append(self.formatter_class.__name__) or format_help(self)
target = sys.argv[1]
sys.argv = [target, "--help"]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        if target.endswith(".py"):
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
heavy = sorted(name for name in ("torch", "diffusers", "transformers", "accelerate") if name in sys.modules)
print(json.dumps({"help": out.getvalue(), "formatters": formatters, "heavy": heavy}))
"""

FAST = [
    "train_patchdpo.py",
    "inference_dreambooth.py",
    "evaluate_dreambooth.py",
    "generate.py",
    "demo.py",
    "patch_quality.convert_pkl",
    "training_data.construct",
    "patch_quality.maps",
    "patch_quality.visualize",
    "patch_quality.ssl_train",
    "benchmarks/train_benchmark.py",
    "benchmarks/inference_benchmark.py",
    "benchmarks/gpu_check.py",
]
HELP_SECONDS = 2.0  # the whole fresh interpreter, start to exit; torch alone takes longer to import


def _probe(target: str) -> dict:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PROBE, target], cwd=REPO, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-2000:]
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "seconds": seconds}


@pytest.mark.parametrize("script", FAST)
def test_scripts_answer_help_fast_without_the_heavy_libraries(script):
    report = _probe(script)
    assert report["heavy"] == []
    assert report["formatters"] == ["DefaultsHelpFormatter"]  # common.cli.ArgumentParser: every default shown
    assert "(default:" in report["help"] or script == "patch_quality.convert_pkl"  # positional arguments only
    assert report["seconds"] < HELP_SECONDS, f"{script} --help took {report['seconds']:.2f} s"


def test_defaults_shown_also_without_help_text_but_not_for_required_or_unset():
    from common.cli import ArgumentParser

    parser = ArgumentParser(prog="x")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rate", type=float, default=0.5, help="a rate")
    parser.add_argument("--path", required=True, help="a path")
    parser.add_argument("--optional", default=None, help="unset by default")
    text = parser.format_help()
    assert "(default: 30)" in text and "a rate (default: 0.5)" in text and "(default: None)" not in text


def _configs():
    import evaluate_dreambooth
    import generate
    import inference_dreambooth
    import train_patchdpo
    from dreambench.config import EvaluateConfig, GenerateConfig, InferenceConfig
    from patch_quality import cli as patch_quality_cli
    from patch_quality.config import ConvertConfig, MapsConfig, SslTrainConfig, VisualizeConfig
    from patchdpo.cli import MemoryPlanConfig, memory_plan_parser
    from patchdpo.config import TrainingConfig
    from training_data.cli import construct_parser
    from training_data.config import ConstructConfig

    return [
        (inference_dreambooth.build_parser, InferenceConfig),
        (generate.build_parser, GenerateConfig),
        (evaluate_dreambooth.build_parser, EvaluateConfig),
        (construct_parser, ConstructConfig),
        (patch_quality_cli.maps_parser, MapsConfig),
        (patch_quality_cli.visualize_parser, VisualizeConfig),
        (patch_quality_cli.ssl_train_parser, SslTrainConfig),
        (patch_quality_cli.convert_pkl_parser, ConvertConfig),
        (train_patchdpo.build_parser, TrainingConfig),
        (memory_plan_parser, MemoryPlanConfig),
    ]


def test_each_script_config_has_one_field_per_flag_in_the_parser_order():
    """`run_config.json` records a config's fields in order, as it recorded the Namespace before."""
    import dataclasses

    for build_parser, config_type in _configs():
        dests = [action.dest for action in build_parser()._actions if action.dest != "help"]
        assert [field.name for field in dataclasses.fields(config_type)] == dests, config_type.__name__


def test_parse_config_refuses_a_config_that_is_not_the_flags_in_order():
    import dataclasses

    from common.cli import ArgumentParser, parse_config

    parser = ArgumentParser(prog="x")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rate", type=float, default=0.5)

    @dataclasses.dataclass(frozen=True)
    class InOrder:
        steps: int
        rate: float

    @dataclasses.dataclass(frozen=True)
    class Swapped:
        rate: float
        steps: int

    assert parse_config(parser, InOrder, ["--rate", "2"]) == InOrder(30, 2.0)
    with pytest.raises(TypeError, match="not the flags of x, in order"):
        parse_config(parser, Swapped, [])
