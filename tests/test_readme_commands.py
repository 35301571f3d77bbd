"""Every command of the README's data and training sections runs (issue #23, item 17).

The commands are read from the README's ```bash blocks at test time, so an edited README is
what gets run. They run in one work folder, block after block as a reader would, through
``selfflow.cli.main`` in this process, with local stand-ins for what would be downloaded or
would take days. The stand-ins, and nothing else, change a command (``_stand_in``):

- ``torchrun [its options] train.py | sample.py | -m selfflow.cli CMD`` runs as one process
  (``selfflow train | sample | CMD``); several processes are tested in their own tests.
- ``pip install ...`` installs nothing: the package and its test extra are here.
- ``/data/...`` is ``WORK/data/...``; ``/data/imagenet/train`` and a relative ``images`` are
  generated ImageFolder trees (JPEG/PNG of several modes); a relative ``my-vae`` is a tiny
  diffusers AutoencoderKL (``save_pretrained``), and ``prepare`` without ``--vae`` gets it
  too (the default is the SD-VAE's hub id); ``~/.cache/selfflow/`` is this test's
  ``SELFFLOW_CACHE``, holding a reference batch of random images and a small Inception-shaped
  GraphDef (``selfflow.eval.synthetic``) as ADM's files; ``selfflow_imagenet256.pt`` is the
  export that the ImageNet recipe block wrote (a tiny model of the same data).
- Sizes: ``--image-size`` 16; ``--model`` tiny; ``--steps`` 2 (``--checkpoint-every``,
  ``--keep-every`` 2, ``--eval-every`` past the end, ``--eval-samples`` 8) at global batch 4
  on the CPU, no progress bar; ``sample`` and ``generate`` take 2 ODE steps and ``sample`` 8
  images (``samples_N.npz`` is ``samples_8.npz``); the digits demo trains 2 steps and scores
  3 samples per class with 10 sampler steps.

A command that cannot run as written fails the test with the command named.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow import cli
from tests.data.trees import write_tree

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SECTIONS = ("## Training data: `selfflow prepare`", "## Training: `selfflow train`")
OWN_CLASSES = ("boat", "car", "tree")
IMAGENET_LIKE = tuple(f"class{k:02d}" for k in range(12))  # --classes 10 needs ten or more
STEPS = 2
SAMPLES = 8


def readme_blocks() -> list[tuple[str, list[str]]]:
    """(heading, commands) of each bash block in the data and training sections, in order."""
    blocks = []
    for title in SECTIONS:
        assert title in README, f"the README lost its section {title!r}"
        section = README.split(title, 1)[1].split("\n## ", 1)[0]
        heading = title
        for part in re.split(r"(?m)^(### .*)$", section):
            if part.startswith("### "):
                heading = part
                continue
            for block in re.findall(r"```bash\n(.*?)```", part, re.S):
                joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
                commands = [line for line in joined.splitlines() if shlex.split(line, True)]
                blocks.append((heading.strip("# "), commands))
    return blocks


def _value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _set(args: list[str], flag: str, value: str) -> list[str]:
    """``flag value`` in place of the given one, or added."""
    if flag in args:
        args = list(args)
        args[args.index(flag) + 1] = value
        return args
    return [*args, flag, value]


def _paths(arg: str, work: Path, cache: Path) -> str:
    if arg.startswith("/data/"):
        return str(work / "data" / arg[len("/data/") :])
    if arg.startswith("~/.cache/selfflow/"):
        return str(cache / arg[len("~/.cache/selfflow/") :])
    return re.sub(r"samples_\d+\.npz$", f"samples_{SAMPLES}.npz", arg)


def _stand_in(line: str, work: Path, cache: Path, tiny_vae: str) -> list[str] | None:
    """The README's command as ``selfflow.cli.main`` arguments with the stand-ins of the module
    docstring, or None for a command that installs something."""
    words = shlex.split(line, comments=True)
    if words[:2] == ["pip", "install"]:
        return None
    if words[0] == "torchrun":
        rest = words[1:]
        while rest and rest[0].startswith("--"):  # torchrun's own options
            rest = rest[1:] if "=" in rest[0] else rest[2:]
        if rest[:2] == ["-m", "selfflow.cli"]:
            words = ["selfflow", *rest[2:]]
        elif rest and rest[0] in ("train.py", "sample.py"):
            words = ["selfflow", rest[0].removesuffix(".py"), *rest[1:]]
        else:
            raise AssertionError(f"no stand-in for this torchrun command: {line}")
    if words[:3] == ["python", "-m", "selfflow.train.demo"]:
        args = [_paths(a, work, cache) for a in words[3:]]
        if "--steps" in args:
            start = args.index("--steps") + 1
            end = start
            while end < len(args) and not args[end].startswith("--"):
                end += 1
            args[start:end] = [str(STEPS)]
        return ["demo", *args]
    if words[0] != "selfflow":
        raise AssertionError(f"no stand-in for this README command: {line}")
    command, args = words[1], [_paths(a, work, cache) for a in words[2:]]
    if command == "prepare":
        args = _set(args, "--image-size", "16")
        if "--vae" not in args:
            args = _set(args, "--vae", tiny_vae)
        args = [*args, "--num-workers", "0"]
    elif command == "train":
        args = _set(args, "--model", "tiny")
        args = _set(args, "--steps", str(STEPS))
        for flag in ("--checkpoint-every", "--keep-every"):
            if flag in args:
                args = _set(args, flag, str(STEPS))
        if "--eval-every" in args:
            args = _set(args, "--eval-every", str(1000 * STEPS))  # checked, never reached
        if "--eval-samples" in args:
            args = _set(args, "--eval-samples", str(SAMPLES))
        args = [*args, "--global-batch-size", "4", "--device", "cpu", "--no-progress"]
    elif command == "sample":
        args = _set(args, "--num-fid-samples", str(SAMPLES))
        args = [*args, "--num-steps", "2", "--mode", "ODE", "--batch-size", "4"]
        args = [*args, "--device", "cpu"]
    elif command == "generate":
        args = [*args, "--num-steps", "2", "--mode", "ODE", "--device", "cpu"]
    elif command == "evaluate":
        args = [*args, "--device", "cpu"]
    elif command not in ("export", "classes"):
        raise AssertionError(f"no stand-in for `selfflow {command}`: {line}")
    return [command, *args]


def _prepare_inputs(commands: list[str], work: Path, tiny_vae: str) -> None:
    """The inputs a block names that a reader would have: image trees, a VAE, a checkpoint."""
    text = "\n".join(commands)
    if "/data/imagenet/train" in text and not (work / "data/imagenet/train").exists():
        write_tree(work / "data/imagenet/train", per_class=2, classes=IMAGENET_LIKE)
    if re.search(r"prepare images ", text) and not (work / "images").exists():
        write_tree(work / "images", per_class=3, classes=OWN_CLASSES)
    if "my-vae" in text and not (work / "my-vae").exists():
        shutil.copytree(tiny_vae, work / "my-vae")
    if "selfflow_imagenet256.pt" in text and not (work / "selfflow_imagenet256.pt").exists():
        shutil.copy(work / "xl2_ema.pt", work / "selfflow_imagenet256.pt")


def _adm_stand_ins(cache: Path) -> None:
    from selfflow.eval.synthetic import inception_like_graph

    cache.mkdir(parents=True, exist_ok=True)
    graph = inception_like_graph(width=0.03, seed=1, classes=40, image_size=75, logit_scale=20.0)
    (cache / "classify_image_graph_def.pb").write_bytes(graph)
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    np.savez(cache / "VIRTUAL_imagenet256_labeled.npz", arr_0=images)


def test_the_readme_reads_as_the_test_expects():
    blocks = readme_blocks()
    headings = [heading for heading, _ in blocks]
    assert any("Your own images" in h for h in headings) and len(blocks) >= 4, headings
    every = [line for _, commands in blocks for line in commands]
    assert any(line.startswith("selfflow prepare") for line in every)
    assert any("train.py" in line or line.startswith("selfflow train") for line in every)


@pytest.mark.slow  # a dozen prepares, trainings, samplings and an evaluation: about a minute
def test_every_command_of_the_data_and_training_sections_runs(
    tmp_path, tiny_vae_dir, monkeypatch, capsys
):
    from selfflow.train import demo

    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("SELFFLOW_CACHE", str(cache))
    monkeypatch.setattr(demo, "SAMPLES_PER_CLASS", 3)
    monkeypatch.setattr(demo, "SAMPLER_STEPS", 10)
    _adm_stand_ins(cache)
    threads = torch.get_num_threads()
    ran = []
    try:
        for heading, commands in readme_blocks():
            _prepare_inputs(commands, work, tiny_vae_dir)
            for line in commands:
                args = _stand_in(line, work, cache, tiny_vae_dir)
                if args is None:
                    continue
                status = demo.main(args[1:]) if args[0] == "demo" else cli.main(args)
                printed = capsys.readouterr()
                assert status == 0, (
                    f"README ({heading}): `{line}` ran as {args} and ended with {status}:\n"
                    f"{printed.err[-3000:]}"
                )
                ran.append(args[0])
    finally:
        torch.set_num_threads(threads)  # the demo sets its own
    assert {"prepare", "train", "export", "sample", "evaluate", "classes", "generate"} <= set(ran)
    assert (work / "boats.png").is_file() and (work / f"samples/samples_{SAMPLES}.npz").is_file()
