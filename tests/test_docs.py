"""The documentation runs: every code block of README.md and docs/*.md, and every script in examples/.

Fenced blocks are sorted by their info string:

* ``python``: executed as written, each in a fresh interpreter (cwd: a temporary directory). A block
  that is deliberately incomplete carries the marker ``<!-- fragment: examples/NAME.py -->`` on the
  line before its fence and a visible link to that runnable example; the test checks the example
  exists (the examples themselves run below).
* ``bash``: commands. Each line is checked without running it (some need a GPU or start servers):
  ``gatednorm ...`` must parse with the real argument parser, ``make X`` must name a Makefile target,
  ``python path`` / ``pytest path`` must name files that exist.
* ``text``: formulas, trees and output; not code.

Any other fence (none, or another language) fails the test, so a new block has to be sorted. Links
in the docs must stay inside the repository and point at files that exist.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

#: Frameworks a block or example may need: without them it is skipped (with the reason), never failed.
OPTIONAL = ("fla", "transformers", "sglang", "vllm", "mamba_ssm", "triton")

#: Examples that take more than a few seconds (spawned processes, model files imported).
SLOW_EXAMPLES = {"tensor_parallel.py", "patch_transformers_model.py"}

FENCE = re.compile(r"^```(\S*)\s*$")
FRAGMENT = re.compile(r"<!--\s*fragment:\s*(\S+)\s*-->")


@dataclass
class Block:
    path: pathlib.Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    fragment_of: str | None  # the example named by a fragment marker

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: pathlib.Path) -> list[Block]:
    """The fenced blocks of a Markdown file (indented code blocks are not used in these docs)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, lang = i, m.group(1)
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        marker = FRAGMENT.search(lines[start - 1]) if start > 0 else None
        blocks.append(Block(path, start + 1, lang, "\n".join(body) + "\n", marker.group(1) if marker else None))
        i += 1
    return blocks


ALL_BLOCKS = [b for path in DOCS for b in code_blocks(path)]
PYTHON = [b for b in ALL_BLOCKS if b.lang == "python"]
BASH = [b for b in ALL_BLOCKS if b.lang == "bash"]


def _imported_top_levels(code: str) -> set[str]:
    names = set(re.findall(r"^\s*import\s+([A-Za-z_]\w*)", code, re.M))
    names |= set(re.findall(r"^\s*from\s+([A-Za-z_]\w*)", code, re.M))
    names |= set(re.findall(r"""patch\(\s*["']([a-z_]+)["']""", code))  # gatednorm.patch("fla") needs fla
    return names


def _skip_without(code: str) -> None:
    for name in sorted(_imported_top_levels(code) & set(OPTIONAL)):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"needs {name}, which is not installed (make test installs it)")


def _run_python(args: list[str], tmp_path: pathlib.Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("GATEDNORM_PATCH", None)
    env.pop("GATEDNORM_BACKEND", None)
    env.pop("USE_NATIVE_LAYERNORM", None)
    env.pop("TRITON_INTERPRET", None)  # as a user runs them; the test suite sets it for its own kernels
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_every_block_is_sorted():
    """Each fence says what it holds: python (run), bash (checked) or text (not code)."""
    unsorted = [f"{b.id} ```{b.lang}" for b in ALL_BLOCKS if b.lang not in ("python", "bash", "text")]
    assert not unsorted, f"give these fences a language (python, bash or text): {unsorted}"
    assert PYTHON and BASH


def test_no_indented_code_blocks():
    """Indented code would escape the checks above: every code block is fenced."""
    offenders = []
    for path in DOCS:
        in_fence, prev, last_text = False, "", ""
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_fence = not in_fence
            elif (not in_fence and line.startswith("    ") and line.strip() and not prev.strip()
                  and not last_text.startswith(" ") and not re.match(r"([-*+]|\d+\.|:)\s", last_text)):
                offenders.append(f"{path.relative_to(ROOT)}:{n}")  # not the continuation of a list item
            prev = line
            if line.strip():
                last_text = line
    assert not offenders, f"indented code blocks (fence them instead): {offenders}"


def _python_params():
    for b in PYTHON:
        # blocks that import a framework (several seconds of imports) or run `gatednorm verify`
        slow = bool(_imported_top_levels(b.code) & set(OPTIONAL)) or '"verify"' in b.code
        yield pytest.param(b, marks=[pytest.mark.slow] if slow else [], id=b.id)


@pytest.mark.parametrize("block", list(_python_params()))
def test_python_block_runs(block: Block, tmp_path):
    if block.fragment_of is not None:
        example = ROOT / block.fragment_of
        assert example.is_file() and example.parent.name == "examples", f"{block.id}: {block.fragment_of}"
        text = block.path.read_text()
        assert f"]({os.path.relpath(example, block.path.parent)})" in text, \
            f"{block.id}: a fragment needs a visible link to {block.fragment_of}"
        return
    _skip_without(block.code)
    script = tmp_path / "block.py"
    script.write_text(block.code)
    proc = _run_python([str(script)], tmp_path)
    assert proc.returncode == 0, f"{block.id} failed:\n{block.code}\n--- stderr ---\n{proc.stderr[-4000:]}"


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def _check_command(words: list[str], where: str) -> None:
    """One command line of a bash block, checked without running it."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:1] == ["timeout"]:
        words = words[1:]
        while words and words[0].startswith("-"):
            words = words[1:]  # timeout's options
        words = words[1:]  # the duration
    if not words:
        return
    if words[0].startswith(".venv/bin/"):  # the project's venv: the same command as installed there
        words = [words[0].removeprefix(".venv/bin/"), *words[1:]]
        if words[0] == "pytest":
            words = ["python", "-m", *words]
    if words[0] == "gatednorm":
        from gatednorm.cli import build_parser

        try:
            build_parser().parse_args(words[1:])
        except SystemExit as exc:  # --help and --version exit 0 after printing
            if exc.code not in (0, None):
                raise AssertionError(f"{where}: `{shlex.join(words)}` does not parse") from None
    elif words[0] == "make":
        missing = [t for t in words[1:] if not t.startswith("-") and "=" not in t and t not in _makefile_targets()]
        assert not missing, f"{where}: no Makefile target {missing}"
    elif words[0] in ("python", "python3", "torchrun"):
        args = words[1:]
        if args[:2] == ["-m", "pytest"]:
            args = args[2:]
        elif args[:1] == ["-m"]:
            return  # a module of some framework (python -m sglang.launch_server ...)
        paths = [a for a in args if not a.startswith("-") and (a.endswith(".py") or "/" in a)]
        for p in paths:
            assert (ROOT / p).exists(), f"{where}: {p} does not exist"
    elif words[0] in ("pip", "git", "cd", "export"):
        return
    else:
        raise AssertionError(f"{where}: unknown command {words[0]!r}: teach tests/test_docs.py to check it")


@pytest.mark.parametrize("block", BASH, ids=[b.id for b in BASH])
def test_bash_block_commands_are_valid(block: Block):
    for n, raw in enumerate(block.code.splitlines()):
        line = raw.split(" #")[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line or line.endswith("..."):  # "..." marks an elided command line (arguments of a framework)
            line = line.removesuffix("...").strip()
        if line:
            _check_command(shlex.split(line), f"{block.id}+{n}")


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_links_stay_in_the_repository(path: pathlib.Path):
    """Relative links resolve to files of this repository; no absolute paths or links outside it."""
    bad = []
    for target in LINK.findall(path.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part = target.split("#")[0]
        if not file_part:
            continue  # an anchor in the same file
        resolved = (path.parent / file_part).resolve()
        if file_part.startswith("/") or ROOT not in resolved.parents or not resolved.exists():
            bad.append(target)
    assert not bad, f"{path.relative_to(ROOT)}: links that leave the repository or do not exist: {bad}"


def test_examples_are_run_here():
    assert {p.name for p in EXAMPLES} >= {"basic_usage.py", "tensor_parallel.py", "patch_transformers_model.py"}


def _example_params():
    for p in EXAMPLES:
        marks = [pytest.mark.slow] if p.name in SLOW_EXAMPLES else []
        yield pytest.param(p, marks=marks, id=p.name)


@pytest.mark.parametrize("example", list(_example_params()))
def test_example_runs(example: pathlib.Path, tmp_path):
    _skip_without(example.read_text())
    proc = _run_python([str(example)], tmp_path)
    assert proc.returncode == 0, f"{example.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip(), f"{example.name} printed nothing"
