"""Every command that the README and docs/ show runs (issue #23, item 17; issue #24).

The commands are read from the pages' ```bash blocks at test time, so an edited page is what
gets run. Each group of pages (``GROUPS``) runs in its own work folder, block after block as a
reader would, through ``selfflow.cli.main`` in this process, with local stand-ins for what
would be downloaded or would take days. The stand-ins, and nothing else, change a command
(``_stand_in``):

- ``a && b`` runs ``a`` then ``b``; ``export NAME=VALUE`` sets the variable for the rest.
- ``torchrun [its options] train.py | sample.py | -m selfflow.cli CMD`` runs as one process
  (``selfflow train | sample | CMD``); several processes are tested in their own tests.
- ``pip install ...``, ``python -m venv``, activating it, ``ruff`` and ``python -m pytest``
  run nothing: the environment is this one, and the suite is what runs this test.
- The benchmarks (``python benchmarks/...``, ``bash benchmarks/...``,
  ``python -m selfflow.batch.bench``) time GPUs: their command lines are checked against
  their own parsers (``test_every_benchmark_command_parses``), and the scripts run on the
  CPU in tests/test_scripts.py.
- ``/data/...`` is ``WORK/data/...``; ``/data/imagenet/train`` and a relative ``images`` are
  generated ImageFolder trees (JPEG/PNG of several modes); a relative ``my-vae`` is a tiny
  diffusers AutoencoderKL (``save_pretrained``), and ``prepare`` without ``--vae`` gets it
  too (the default is the SD-VAE's hub id); a relative ``flux-vae`` is a tiny 16-channel one
  with FLUX's scaling and shift factors; ``~/.cache/selfflow/`` (``$SELFFLOW_CACHE``) is
  this test's cache, holding reference batches (256 and 512) of random images and a small
  Inception-shaped GraphDef (``selfflow.eval.synthetic``) as ADM's files, so ``selfflow
  download inception | reference [--resolution 512]`` finds them there;
  ``selfflow_imagenet256.pt`` is the export that the ImageNet recipe block wrote (a tiny model
  of the same data).
- The released checkpoint and the SD-VAE (what ``sample``, ``generate`` and ``download
  checkpoint | vae | all`` fetch from the hub) are a tiny random model of ImageNet's 1000
  classes and the tiny VAE: ``sample`` and ``generate`` without ``--ckpt`` get both. Outside
  the data and training pages, a ``--ckpt`` that no earlier command wrote (a model of your
  own, named as an example) is the released stand-in too, as is each such ``--ckpt`` of a
  ``sweep``.
- Sizes: ``--image-size`` 16; ``--val-per-class`` 1 (the generated trees hold 2 or 3
  images per class); ``--model`` tiny; ``--steps`` 2 (``--checkpoint-every``,
  ``--keep-every``, ``--snapshot-every`` and ``export --ema-length``'s ``--step`` 2,
  ``--eval-every`` past the end, ``--eval-samples`` 8) at global batch 4 on the CPU, no
  progress bar; ``sample`` and ``generate`` take 2 ODE steps and ``sample`` 8
  images (``samples_N.npz`` is ``samples_8.npz``); ``sweep`` 8 images of 2 steps per cell; the
  digits demo trains 2 steps and scores
  3 samples per class with 10 sampler steps; ``python -m selfflow.research.digits`` does the
  same for one seed, probing block 1 only; ``selfflow probe`` probes block 1 on the CPU.

A command that cannot run as written fails the test with its page and command named.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow import cli
from tests.data.trees import write_tree

ROOT = Path(__file__).resolve().parents[1]
# (group, pages): each group runs in its own work folder, its pages in this order. A page may
# be narrowed to some of its "## " sections with "PAGE#section title".
GROUPS = {
    "data and training": (
        "docs/data.md",
        "docs/training.md",
        "docs/latents.md",
        "docs/research.md## Post-hoc EMA lengths",
        "docs/research.md## Representation probe",
    ),
    "readme": ("README.md",),
    "sampling, evaluation, files and API": (
        "docs/sampling.md",
        "docs/evaluation.md",
        "docs/files.md",
        "docs/api.md",
        "docs/performance.md",
        "docs/layout.md",
        "docs/research.md## `selfflow sweep`",
    ),
}
CHECKED_ELSEWHERE = {"docs/cluster.md": "tests/test_slurm_scripts.py"}
OWN_MODELS = "data and training"  # the group whose --ckpt files must be written by its commands
BENCHMARK = re.compile(r"^(python|bash) (benchmarks/\S+|-m selfflow\.batch\.bench)( |$)")
OWN_CLASSES = ("boat", "car", "tree")
IMAGENET_LIKE = tuple(f"class{k:02d}" for k in range(12))  # --classes 10 needs ten or more
STEPS = 2
SAMPLES = 8


def page_blocks(page: str) -> list[tuple[str, list[str]]]:
    """(where, commands) of each bash block of ``page`` ("PATH" or "PATH## section"), in
    order; ``where`` names the page and its heading, for the failure messages."""
    path, _, title = page.partition("#")
    text = (ROOT / path).read_text()
    if title:
        title = "#" + title
        assert title in text, f"{path} lost its section {title!r}"
        text = title + text.split(title, 1)[1].split("\n## ", 1)[0]
    blocks, heading, block, fenced = [], path, [], False
    for line in text.splitlines():
        if line.startswith("```"):
            if fenced == "bash":
                joined = re.sub(r"\\\n\s*", " ", "\n".join(block))  # continuation lines
                commands = [cmd for cmd in joined.splitlines() if shlex.split(cmd, True)]
                blocks.append((heading, commands))
            fenced = False if fenced else (line[3:].strip() or "text")
            block = []
        elif fenced:
            block.append(line)
        elif re.match(r"#{1,3} ", line):
            heading = f"{path}: {line.lstrip('# ')}"
    return blocks


def group_blocks(group: str) -> list[tuple[str, list[str]]]:
    return [block for page in GROUPS[group] for block in page_blocks(page)]


def readme_blocks() -> list[tuple[str, list[str]]]:
    """The data and training pages' blocks: what the first group runs."""
    return group_blocks("data and training")


def _value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _set(args: list[str], flag: str, value: str) -> list[str]:
    """``flag value`` in place of the given one, or added."""
    if flag in args:
        args = list(args)
        args[args.index(flag) + 1] = value
        return args
    return [*args, flag, value]


def _set_all(args: list[str], flag: str, value: str) -> list[str]:
    """``flag value`` in place of the flag and all its values (an option of several values)."""
    if flag not in args:
        return [*args, flag, value]
    start = args.index(flag) + 1
    end = start
    while end < len(args) and not args[end].startswith("--"):
        end += 1
    return [*args[:start], value, *args[end:]]


def _paths(arg: str, work: Path, cache: Path) -> str:
    if arg.startswith("/data/"):
        return str(work / "data" / arg[len("/data/") :])
    if arg.startswith("~/.cache/selfflow/"):
        return str(cache / arg[len("~/.cache/selfflow/") :])
    return re.sub(r"samples_\d+\.npz$", f"samples_{SAMPLES}.npz", arg)


@dataclass(frozen=True)
class StandIns:
    """Where the stand-ins of the module docstring are, for one group's run."""

    work: Path
    cache: Path
    tiny_vae: str
    released: str  # the released checkpoint's stand-in
    own_models: bool  # a --ckpt must have been written by an earlier command of the group


NOTHING_TO_RUN = (
    ("pip",),
    ("python", "-m", "venv"),
    (".",),
    ("source",),
    ("ruff",),
    ("python", "-m", "pytest"),
)


def _needs_nothing(words: list[str]) -> bool:
    """Installing, activating, linting, the suite itself, and the GPU benchmarks (parsed in
    their own test): nothing to run here."""
    return bool(BENCHMARK.match(" ".join(words))) or any(
        tuple(words[: len(prefix)]) == prefix for prefix in NOTHING_TO_RUN
    )


def _released_stand_in(args: list[str], at: StandIns, vae: bool = True) -> list[str]:
    """``--ckpt`` and ``--vae`` for a command that names the released model (no ``--ckpt``)
    or, outside the own-models group, a model file no earlier command wrote."""
    ckpt = _value(args, "--ckpt")
    if ckpt is None:
        args = _set(args, "--ckpt", at.released)
    elif not (at.work / ckpt).exists() and not at.own_models:
        shutil.copy(at.released, at.work / ckpt)
    else:
        return args
    return args if "--vae" in args or not vae else _set(args, "--vae", at.tiny_vae)


def _sweep_stand_in(args: list[str], at: StandIns) -> list[str]:
    """Every ``--ckpt`` of a sweep that no earlier command wrote is the released stand-in (its
    folders made); the sizes are ``sample``'s."""
    start = end = args.index("--ckpt") + 1
    while end < len(args) and not args[end].startswith("--"):
        end += 1
    for name in args[start:end]:
        if not (at.work / name).exists():
            (at.work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(at.released, at.work / name)
    args = _set(_set(args, "--num-fid-samples", str(SAMPLES)), "--num-steps", "2")
    return [*args, "--batch-size", "4", "--vae", at.tiny_vae, "--device", "cpu"]


def _stand_in(line: str, at: StandIns) -> list[str] | None:
    """The page's command as ``selfflow.cli.main`` arguments with the stand-ins of the module
    docstring, or None for a command with nothing to run (``_needs_nothing``)."""
    work, cache = at.work, at.cache
    words = shlex.split(line, comments=True)
    if _needs_nothing(words):
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
    if words[:3] == ["python", "-m", "selfflow.research.digits"]:
        args = [_paths(a, work, cache) for a in words[3:]]
        for flag, value in (("--seeds", "0"), ("--steps", str(STEPS)), ("--layers", "1")):
            args = _set_all(args, flag, value)
        return ["digits", *args]
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
        raise AssertionError(f"no stand-in for this command: {line}")
    command, args = words[1], [_paths(a, work, cache) for a in words[2:]]
    if command == "prepare":
        args = _set(args, "--image-size", "16")
        if "--val-per-class" in args:
            args = _set(args, "--val-per-class", "1")
        if "--vae" not in args:
            args = _set(args, "--vae", at.tiny_vae)
        args = [*args, "--num-workers", "0"]
    elif command == "train":
        args = _set(args, "--model", "tiny")
        args = _set(args, "--steps", str(STEPS))
        for flag in ("--checkpoint-every", "--keep-every", "--snapshot-every"):
            if flag in args:
                args = _set(args, flag, str(STEPS))
        if "--eval-every" in args:
            args = _set(args, "--eval-every", str(1000 * STEPS))  # checked, never reached
        if "--eval-samples" in args:
            args = _set(args, "--eval-samples", str(SAMPLES))
        args = [*args, "--global-batch-size", "4", "--device", "cpu", "--no-progress"]
    elif command == "sample":
        args = _released_stand_in(args, at)
        args = _set(args, "--num-fid-samples", str(SAMPLES))
        args = [*args, "--num-steps", "2", "--mode", "ODE", "--batch-size", "4"]
        args = [*args, "--device", "cpu"]
    elif command == "sweep":
        args = _sweep_stand_in(args, at)
    elif command == "generate":
        args = _released_stand_in(args, at)
        args = [*args, "--num-steps", "2", "--mode", "ODE", "--device", "cpu"]
    elif command == "evaluate":
        args = [*args, "--device", "cpu"]
    elif command == "export" and "--ema-length" in args and "--step" in args:
        args = _set(args, "--step", str(STEPS))  # a snapshot step of the short run
    elif command == "classes" and "--ckpt" in args:
        args = _released_stand_in(args, at, vae=False)
    elif command == "probe":
        args = [*_set_all(args, "--layer", "1"), "--device", "cpu"]  # the tiny model's block 1
    elif command not in ("export", "classes", "download"):
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
    if "flux-vae" in text and not (work / "flux-vae").exists():  # 16 channels, FLUX's shift
        from tests.conftest import make_tiny_vae

        flux = make_tiny_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
        flux.save_pretrained(work / "flux-vae")
    if "selfflow_imagenet256.pt" in text and not (work / "selfflow_imagenet256.pt").exists():
        shutil.copy(work / "xl2_ema.pt", work / "selfflow_imagenet256.pt")


def _adm_stand_ins(cache: Path) -> None:
    from selfflow.eval.synthetic import inception_like_graph

    cache.mkdir(parents=True, exist_ok=True)
    graph = inception_like_graph(width=0.03, seed=1, classes=40, image_size=75, logit_scale=20.0)
    (cache / "classify_image_graph_def.pb").write_bytes(graph)
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    np.savez(cache / "VIRTUAL_imagenet256_labeled.npz", arr_0=images)
    np.savez(cache / "VIRTUAL_imagenet512.npz", arr_0=images[::-1])


def test_the_readme_reads_as_the_test_expects():
    blocks = readme_blocks()
    headings = [heading for heading, _ in blocks]
    assert any("Your own images" in h for h in headings) and len(blocks) >= 4, headings
    every = [line for _, commands in blocks for line in commands]
    assert any(line.startswith("selfflow prepare") for line in every)
    assert any("train.py" in line or line.startswith("selfflow train") for line in every)


def test_every_page_is_run_or_checked():
    """The README and every page of docs/ that shows commands belong to a group here (or name
    the test that checks them), whole: a new page or section cannot be left out."""
    pages = {page.partition("#")[0] for group in GROUPS.values() for page in group}
    shown = {
        str(path.relative_to(ROOT))
        for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
        if "```bash" in path.read_text()
    }
    assert shown <= pages | set(CHECKED_ELSEWHERE), shown - pages - set(CHECKED_ELSEWHERE)
    for page, test in CHECKED_ELSEWHERE.items():
        assert page in (ROOT / test).read_text(), (page, test)
    split: dict[str, set[str]] = {}  # a page run in sections, split between groups
    for pages_of_group in GROUPS.values():
        for page in pages_of_group:
            path, _, title = page.partition("#")
            if title:
                split.setdefault(path, set()).add("#" + title)
    for path, titles in split.items():  # then every section that shows commands is run
        sections = ("\n" + (ROOT / path).read_text()).split("\n## ")[1:]
        with_commands = {"## " + s.splitlines()[0] for s in sections if "```bash" in s}
        assert with_commands <= titles, (path, with_commands - titles)
        assert not any(g for g in GROUPS.values() if path in g), (path, "whole and in parts")


class _Parsed(Exception):
    """Raised in place of running a benchmark once its parser accepted the command line."""


def benchmark_commands() -> list[tuple[str, str]]:
    """(where, command) of every benchmark command the pages show."""
    found = []
    for group in GROUPS:
        for where, commands in group_blocks(group):
            for line in commands:
                for part in re.split(r"\s*&&\s*", line):
                    words = shlex.split(part, comments=True)
                    if words and BENCHMARK.match(" ".join(words)):
                        found.append((where, " ".join(words)))
    return found


def test_every_benchmark_command_parses(monkeypatch):
    """A benchmark the pages show exists, and its own parser accepts the command line shown
    (they time GPUs, so they are not run here; tests/test_scripts.py runs the shell scripts and
    the benchmarks' CPU modes)."""
    import argparse
    import runpy
    import sys

    commands = benchmark_commands()
    assert len(commands) >= 8, commands
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        original(self, args, namespace)  # exits with status 2 on an unknown or bad option
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    scripts_test = (ROOT / "tests/test_scripts.py").read_text()
    for where, command in commands:
        words = shlex.split(command)
        if words[0] == "bash":
            assert (ROOT / words[1]).is_file(), (where, command)
            assert Path(words[1]).name in scripts_test, f"{where}: no test runs {words[1]}"
            continue
        if words[1] == "-m":
            monkeypatch.setattr(sys, "argv", [words[2], *words[3:]])
            run, target = runpy.run_module, words[2]
        else:
            assert (ROOT / words[1]).is_file(), (where, command)
            monkeypatch.setattr(sys, "argv", [str(ROOT / words[1]), *words[2:]])
            run, target = runpy.run_path, str(ROOT / words[1])
        with pytest.raises(_Parsed):
            try:
                run(target, run_name="__main__")
            except SystemExit as exit:
                raise AssertionError(f"{where}: `{command}` was refused ({exit.code})") from exit


def _download_stand_ins(monkeypatch, at: StandIns) -> None:
    """``selfflow download checkpoint | vae`` (and ``all``) find the stand-ins; inception and
    reference are in the stand-in cache already, where the real command looks first."""
    from selfflow import download_cli

    monkeypatch.setitem(download_cli._FETCHERS, "checkpoint", lambda: Path(at.released))
    monkeypatch.setitem(download_cli._FETCHERS, "vae", lambda: Path(at.tiny_vae))


EXPECTED = {  # what each group must have run, so that a page cannot lose its commands quietly
    "data and training": {"prepare", "train", "export", "sample", "evaluate", "classes", "generate",
                          "demo", "probe", "digits"},
    "readme": {"prepare", "train", "export", "sample", "evaluate", "demo", "sweep"},
    "sampling, evaluation, files and API": {"sample", "evaluate", "download", "generate",
                                            "classes", "sweep"},
}  # fmt: skip


@pytest.mark.slow  # prepares, trainings, samplings and evaluations: about a minute a group
@pytest.mark.parametrize("group", list(GROUPS))
def test_every_command_of_the_readme_and_docs_runs(
    group, tmp_path, tiny_vae_dir, tiny_checkpoint, monkeypatch, capsys
):
    from selfflow.research import digits
    from selfflow.train import demo

    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    at = StandIns(work, cache, tiny_vae_dir, tiny_checkpoint, own_models=group == OWN_MODELS)
    monkeypatch.chdir(work)
    monkeypatch.setenv("SELFFLOW_CACHE", str(cache))
    monkeypatch.setattr(demo, "SAMPLES_PER_CLASS", 3)
    monkeypatch.setattr(demo, "SAMPLER_STEPS", 10)
    _adm_stand_ins(cache)
    _download_stand_ins(monkeypatch, at)
    threads = torch.get_num_threads()
    ran = []
    try:
        for where, commands in group_blocks(group):
            _prepare_inputs(commands, work, tiny_vae_dir)
            for line in commands:
                for part in re.split(r"\s*&&\s*", line):
                    words = shlex.split(part, comments=True)
                    if words[0] == "export":
                        for assignment in words[1:]:
                            monkeypatch.setenv(*assignment.split("=", 1))
                        continue
                    args = _stand_in(part, at)
                    if args is None:
                        continue
                    status = (
                        demo.main(args[1:])
                        if args[0] == "demo"
                        else digits.main(args[1:])
                        if args[0] == "digits"
                        else cli.main(args)
                    )
                    printed = capsys.readouterr()
                    assert status == 0, (
                        f"{where}: `{line}` ran as {args} and ended with {status}:\n"
                        f"{printed.err[-3000:]}"
                    )
                    ran.append(args[0])
    finally:
        torch.set_num_threads(threads)  # the demo sets its own
    assert EXPECTED[group] <= set(ran), (group, EXPECTED[group] - set(ran))
    if group == OWN_MODELS:
        assert (work / "boats.png").is_file()
        assert (work / f"samples/samples_{SAMPLES}.npz").is_file()
