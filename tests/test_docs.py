"""The documentation holds together: the README stays a short front door, every relative link in it, in
conf/README.md and in docs/ reaches a file (and a heading, for an anchor into a Markdown file), and no
section of the long README it replaced was lost in the move to docs/. Reads files only; fast."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250

# The `##` / `###` headings of the README before it was split into docs/ (git show f4b1721:README.md).
# Each must stay a heading somewhere, so a section cannot be dropped unnoticed.
OLD_README_SECTIONS = [
    "Glossary",
    "What the default run does",
    "The reward transform",
    "Scenarios",
    "RLOO, GRPO and DPO",
    "Measured on the default task",
    "Reward-model ensembles",
    "RL on several GPUs",
    "Using your own model and data",
    "Models: checkpoints, precision, LoRA",
    "Console: progress and warnings",
    "Conversational data",
    "Runs in one folder: isolation, killed runs, consistency",
    "Tracking",
    "Layout",
    "Benchmarks",
    "Reward-model training speed",
    "Cost curves",
    "GPU benchmark",
    "Reproducing and comparing runs",
]

HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) and ![alt](target); an optional "title" after the target is ignored
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def doc_files() -> list[Path]:
    return [README, ROOT / "conf" / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def prose_lines(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks (a `# comment` in a bash block is not a heading)."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def headings(path: Path) -> list[str]:
    return [m.group(2) for line in prose_lines(path) if (m := HEADING.match(line))]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped (but '-' and '_'), lower case,
    each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub gives the file's headings; a repeated slug gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(path):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose_lines(path):
        links += LINK.findall(INLINE_CODE.sub("", line))
    return [t for t in links if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto:


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{path.relative_to(ROOT)}: {target} (no heading '#{anchor}' in {dest.name})")
    return broken


def test_the_readme_is_a_short_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, len(lines)
    # the two commands and how to run everything after them come first, your own data within two screens
    assert lines[:8] == [
        "```bash",
        "bash scripts/run.sh     # set up (Python >= 3.11; no GPU, no hub access) and `kedro run` the default DAG",
        "bash scripts/test.sh    # set up the test dependencies and run the whole test suite",
        "```",
        "",
        "Both install into the active virtual environment, or else into the project's own `.venv` (made on first use,",
        "reused after; a distribution's `python3` is never installed into). Every later command on this page runs in",
        "that environment: `source .venv/bin/activate` first.",
    ]
    assert "Using your own model and data" in headings(README)
    own_data = next(i for i, line in enumerate(lines) if line.startswith("## Using your own model and data"))
    assert own_data < 100, own_data


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert path.exists(), path
    assert not broken_links(path)


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")}
    assert pages and pages <= linked, sorted(str(p.relative_to(ROOT)) for p in pages - linked)


def test_every_section_of_the_old_readme_is_still_a_heading():
    found = {h for path in [README, *sorted((ROOT / "docs").glob("**/*.md"))] for h in headings(path)}
    assert not [s for s in OLD_README_SECTIONS if s not in found]


def test_slugs_follow_githubs_rules():
    assert github_slug("Runs in one folder: isolation, killed runs, consistency") == \
        "runs-in-one-folder-isolation-killed-runs-consistency"
    assert github_slug("RLOO, GRPO and DPO") == "rloo-grpo-and-dpo"
    assert github_slug("The `reward_transform` and serve_model") == "the-reward_transform-and-serve_model"
    assert github_slug("Reward-model training speed") == "reward-model-training-speed"
