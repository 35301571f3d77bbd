"""The README's and docs/'s promises: how to get torch first, what [test] brings, how big the
environment is, how long the suite takes, what the P/R agreement was measured against, the
digits demo's table; and that the pages hold together: the README's length, its map of docs/,
every relative link and every cited record."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SETUP = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
PAGES = {"README.md": README} | {
    str(path.relative_to(ROOT)): path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))
}
EVALUATION = PAGES["docs/evaluation.md"]
TRAINING = PAGES["docs/training.md"]


def test_setup_is_two_commands_then_the_cpu_wheel_as_an_option():
    """A fresh machine: one line installs and runs the main job, one installs the test extra
    and passes the tests; below them, the CPU-only torch wheel, installed before the package."""
    blocks = re.findall(r"```bash\n(.*?)```", SETUP, re.S)
    assert len(blocks) >= 2, blocks
    first = [line.split("  #")[0].strip() for line in blocks[0].strip().splitlines()]
    assert len(first) == 2, first
    assert first[0].startswith("pip install -e . && selfflow sample "), first
    assert first[1] == 'pip install -e ".[test]" && python -m pytest -q', first
    option = SETUP.index("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert SETUP.index(blocks[0]) < option
    assert re.search(r"CPU-only build \*\*first\*\*", SETUP) and "CUDA" in SETUP


def test_the_test_extra_says_it_brings_tensorflow_for_the_parity_tests_only():
    assert re.search(r"\[test\].*tensorflow-cpu \(about 1\.3 GB\)", SETUP)
    setup = " ".join(SETUP.split())
    assert "only there for the parity tests" in setup and "never imports it" in setup


@pytest.mark.skipif(
    not (ROOT / ".git").exists() or shutil.which("git") is None, reason="not a git checkout"
)
def test_what_the_readme_creates_in_the_checkout_is_ignored_by_git():
    venvs = re.findall(r"python -m venv (\S+)", SETUP)  # the set-up's environment (.venv)
    demo = {  # every page's demo command
        folder
        for text in PAGES.values()
        for folder in re.findall(r"python -m selfflow\.train\.demo --out (\S+)", text)
    }
    assert venvs and demo
    for folder in [*venvs, *demo]:
        ignored = subprocess.run(  # the checkout's own rules, not this machine's global ones
            ["git", "-c", "core.excludesFile=/dev/null", "check-ignore", "-q", f"{folder}/x"],
            cwd=ROOT,
        )
        assert ignored.returncode == 0, f"{folder}/ is not in .gitignore"


def test_the_environment_size_is_stated():
    assert re.search(r"\*\*\d+\.\d+ GB\*\*.*\[test\]`?,\s*\*\*\d+\.\d+ GB\*\*", SETUP, re.S)


def test_the_suite_duration_is_measured_not_guessed():
    for page in ("README.md", "docs/layout.md"):
        assert "about a minute" not in PAGES[page]
        duration = r"python -m pytest -q +# [^\n]*\d+ min \d+ s on 2 \w+ CPU cores"
        assert re.search(duration, PAGES[page]), page


def test_precision_recall_agreement_says_what_it_was_measured_against(capsys):
    # The figures are the recorded run's, in docs/evaluation.md and in evaluate --help.
    record = (ROOT / "benchmarks/results/2026-11-29-cpu/pr_tensorflow.md").read_text()
    worst = dict(
        re.findall(r"# (\w+): selfflow and TF's float16 kernels differ by at most ([\d.]+)", record)
    )
    pool3, offset = float(worst["pool3"]), float(worst["offset"])
    from selfflow.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    page = " ".join(EVALUATION.split())
    for where in (page, text):
        assert re.search(r"TensorFlow's (own )?float16", where) and "pr_tensorflow.py" in where
        assert "ADM's own evaluator" not in where  # it cannot be fetched here, nor run
        figures = {float(x) for x in re.findall(r"(?:at most|up to) (0\.\d+)", where)}
        assert {pool3, offset} <= figures, (pool3, offset, figures)
    # the page's ranges against exact float64 (both float16 columns) and the run's size
    rows = re.findall(r"^\| (pool3|offset) \| \d+ \|(.*)\|$", record, re.M)
    assert len(rows) == 10 and "# x86_64" in record and "4000 + 4000 features" in record
    for case, digits in (("pool3", 4), ("offset", 4)):  # as the table prints them
        gaps = [float(x) for c, rest in rows if c == case for x in rest.split("|")[-2:]]
        low, high = round(min(gaps), digits), round(max(gaps), digits)
        assert f"{low:.{digits}f} to {high:.{digits}f} from exact" in page, (case, low, high)
    assert "4000 + 4000 random features of width 2048, 5 seeds" in page


def test_the_digits_demo_table_is_the_recorded_runs():
    section = TRAINING.split("## It learns real data on a CPU", 1)[1].split("\n## ", 1)[0]
    cited = re.findall(r"`(benchmarks/results/[^`]+/digits_demo\.log)`", section)
    assert len(cited) == 1, cited
    record = (ROOT / cited[0]).read_text()
    final = dict(
        ((method, int(step)), float(value))
        for method, step, value in re.findall(
            r"^\| (selfflow|flow) \| (\d+) \| ([\d.]+)%", record, re.M
        )
    )
    runs = [json.loads(line) for line in record.splitlines() if line.startswith("{")]
    seconds = {(run["method"], run["step"]): run["train_seconds"] for run in runs}
    rows = re.findall(
        r"^\| (\d+)[^|]* \| ([\d.]+) % \| ([^|]+) \| ([\d.]+) % \| ([^|]+) \|$", section, re.M
    )
    assert len(rows) >= 4 and {int(r[0]) for r in rows} == {s for _, s in final}, rows
    for step, ours, our_time, sit, sit_time in rows:
        step = int(step)
        assert float(ours) == final[("selfflow", step)] and float(sit) == final[("flow", step)]
        for method, shown in (("selfflow", our_time), ("flow", sit_time)):
            if step:
                figure = float(shown.strip().removesuffix(" s"))  # whole seconds, rounded
                assert abs(figure - seconds[(method, step)]) <= 0.5, (method, step, shown)


# -- the pages hold together ------------------------------------------------------------------


def _outside_code(text: str) -> str:
    """The text without its fenced blocks (a ``[x](y)`` in code is not a link)."""
    return re.sub(r"(?ms)^```.*?^```", "", text)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    return {_anchor(h) for h in re.findall(r"(?m)^#{1,6} (.*)$", _outside_code(text))}


def test_anchor_matches_github_for_the_headings_the_pages_use():
    assert _anchor("Training data: `selfflow prepare`") == "training-data-selfflow-prepare"
    assert _anchor("Files and trust") == "files-and-trust"
    assert _anchor("Downloads, caches, and nodes without a network") == (
        "downloads-caches-and-nodes-without-a-network"
    )


def test_every_relative_link_resolves():
    """Each ``[text](target)`` of the README and docs/ that is not a web address names a file
    or folder of the checkout, and its ``#anchor`` a heading of that page."""
    checked = 0
    for name, text in PAGES.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", _outside_code(text)):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (ROOT / name).parent / path if path else ROOT / name
            assert resolved.exists(), f"{name}: the link {target!r} names nothing"
            if anchor:
                assert resolved.suffix == ".md", f"{name}: {target!r}"
                assert anchor in _anchors(resolved.read_text()), f"{name}: no heading {target!r}"
            checked += 1
    assert checked >= 20, checked


def test_every_cited_record_exists():
    """Each ``benchmarks/results/...`` path the pages cite is a file or folder in the
    checkout, so a figure's record can be opened."""
    cited = 0
    for name, text in PAGES.items():
        for path in re.findall(r"(benchmarks/results/[\w./-]*[\w/])", text):
            assert (ROOT / path).exists(), f"{name} cites {path}, which is not there"
            cited += 1
    assert cited >= 15, cited


def test_the_readme_is_at_most_250_lines():
    assert len(README.splitlines()) <= 250, len(README.splitlines())


def test_the_readme_maps_every_page_of_docs():
    """The README's map of docs/ links every page there, and every docs page it links exists
    (the link test checks the latter for every link)."""
    documentation = README.split("## Documentation", 1)[1].split("\n## ", 1)[0]
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", documentation))
    pages = {name for name in PAGES if name.startswith("docs/")}
    assert linked == pages, (pages - linked, linked - pages)


def test_the_headline_figures_are_those_of_their_pages():
    """Each row of the README's headline table links its record under benchmarks/results/ and
    the docs page that states the figure with its measurement; every number of the row's
    figure appears on that page (whose own tests hold it to the record)."""
    headline = README.split("## Headline figures", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in headline.splitlines() if line.startswith("| ") and "](" in line]
    assert len(rows) >= 6, rows
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        figure, record, page = cells[1], cells[3], cells[4]
        assert re.search(r"\]\(benchmarks/results/[^)]+\)", record), row
        (target,) = re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]+)?\)", page)
        text = " ".join(PAGES[target].split())
        for number in re.findall(r"\d+(?:\.\d+)?", figure):
            assert re.search(rf"(?<![\d.]){re.escape(number)}(?![\d]|\.\d)", text), (
                f"{target} does not state {number} ({figure})"
            )
