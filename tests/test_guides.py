"""The documentation stays true: its code runs, its commands parse, its links resolve.

Pages: ``README.md``, ``docs/**/*.md`` and ``bench/README.md``.

* **Code.** Every ```` ```python ```` block compiles. The README's quick start and the decoder guide's example run as
  they are (in a temporary directory); the serving and interop guides' examples are run by ``tests/test_serving.py``
  and ``tests/test_peft_interop.py``.
* **Commands.** Every command the pages show, in a ```` ```bash ```` block or as an inline code span, that runs
  ``python bench/<script>.py``, ``python -m lsrfx...`` or ``lsrfx <subcommand>`` (after any ``VAR=value`` prefix,
  with ``.venv/bin/`` or ``python3`` spellings, each part of an ``&&`` chain) is parsed by the program's own
  ``argparse`` parser, in one subprocess (:data:`DRIVER`): the script is run as ``__main__`` with
  ``ArgumentParser.parse_args`` patched to stop right after parsing, so an unknown flag, a wrong value type, a
  ``choices`` violation, a missing positional or a renamed script fails here without the benchmark running. On top,
  per program: ``lsrfx finetune`` / ``inspect`` build each chosen method's config from the flags (an option of the
  wrong method fails); ``bench/frontier.py``'s ``--only`` points exist in its catalogue (or in the patch a
  ``git apply`` in the same block applies) and the flags after ``--`` parse as ``lsrfx finetune`` flags;
  ``bench/finetune_sweep.py``'s specs build valid configs. ``LSRFX_*=value`` prefixes must be values lsrfx accepts;
  ``git apply`` patches must exist. Commands of other programs (``pip``, ``python -m venv``, ``python -m pytest``,
  ``torchrun``) are not checked; the set-up commands must equal ``.ci/run``'s, which CI runs.
* **Environment variables.** Every ``LSRFX_*`` variable lsrfx reads is in the README's table, and every value the
  table lists is one lsrfx accepts.
* **Links.** Every relative link and image resolves to a file, and every ``#anchor`` to a heading of that page.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

import lsrfx

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^([ \t]*)```([\w-]*)[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
SHELL = {"bash", "sh", "shell", "console"}


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(page: Path, languages: set[str]) -> list[str]:
    """The fenced code blocks of ``page`` in ``languages``, with the fence's indentation removed."""
    found = []
    for indent, language, body in FENCE.findall(page.read_text()):
        if language in languages:
            found.append("".join(line[len(indent):] if line.startswith(indent) else line
                                 for line in body.splitlines(keepends=True)))
    return found


def python_blocks(page: Path) -> list[str]:
    """As ``tests/test_peft_interop.py`` reads a guide's example: the ```` ```python ```` blocks."""
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def run_block(page: Path, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"{page.stem}_example"}
    exec(compile(code, str(page), "exec"), namespace)
    return namespace


# --- code ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_python_block_compiles(page: Path) -> None:
    for i, code in enumerate(python_blocks(page)):
        compile(code, f"{rel(page)} python block {i + 1}", "exec")


def test_the_readme_quick_start_runs_before_line_60(tmp_path, monkeypatch) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    assert text[: text.index("```python")].count("\n") + 1 < 60, "the README's runnable code must start before line 60"
    assert len(text.splitlines()) <= 210, "the README is for users: keep it near 200 lines (results go to docs/)"
    quick_start = python_blocks(readme)[0]
    run_block(readme, quick_start, tmp_path, monkeypatch)
    assert (tmp_path / "run" / "adapters" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "model.onnx").is_file()


def test_the_decoder_guide_example_runs(tmp_path, monkeypatch) -> None:
    page = ROOT / "docs" / "guides" / "decoder.md"
    code = python_blocks(page)
    assert len(code) == 1
    ns = run_block(page, code[0], tmp_path, monkeypatch)  # the block asserts onnxruntime's tokens equal generate's
    report = ns["report"]
    assert report.with_past and report.max_diff is not None
    assert ns["onnx_tokens"].shape == (2, 8)
    assert sorted(p.name for p in tmp_path.glob("model.*")) == ["model.json", "model.onnx"]


def test_the_set_up_commands_are_the_ones_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(ci) == 1 and ci[0].endswith("&& .venv/bin/python -m pytest -q")
    assert ci[0] in readme, "the README's test set-up command must stay exactly what .ci/run runs"
    assert ('python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[demo]" && .venv/bin/lsrfx finetune'
            in readme)


# --- commands --------------------------------------------------------------------------------------------------


@dataclass
class Command:
    where: str  # page and how it was found
    argv: list[str]  # the program and its arguments
    env: dict[str, str]  # VAR=value prefixes
    patches: list[str]  # patches a `git apply` in the same block applies


PROGRAM = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:\S*/)?(?:python3?|lsrfx)\s+\S")
INLINE = re.compile(r"`([^`]+)`")


def split_words(text: str) -> list[list[str]]:
    """The simple commands of a shell line: words, split at ``&&``, ``||`` and ``;``."""
    words = shlex.split(text, comments=True)
    parts, current = [], []
    for word in words:
        if word in ("&&", "||", ";"):
            parts.append(current)
            current = []
        else:
            current.append(word)
    return [p for p in [*parts, current] if p]


def shell_lines(block: str) -> list[str]:
    """The block's lines with ``\\`` continuations joined."""
    lines, current = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            lines.append(current + line)
            current = ""
    return [line for line in [*lines, current] if line.strip()]


def to_command(words: list[str], where: str, patches: list[str]) -> Command | None:
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        name, _, value = words[0].partition("=")
        env[name] = value
        words = words[1:]
    if not words:
        return None
    program = Path(words[0]).name
    if program == "lsrfx":
        return Command(where, ["lsrfx", *words[1:]], env, patches)
    if re.fullmatch(r"python3?(\.\d+)?", program) and len(words) > 1:
        if words[1] == "-m":
            return Command(where, ["python", *words[1:]], env, patches) if words[2].startswith("lsrfx") else None
        if words[1].startswith("bench/"):
            return Command(where, ["python", *words[1:]], env, patches)
    return None


def documented_commands() -> tuple[list[Command], list[str]]:
    """Every checked command of the pages, and the ``git apply`` patches they name."""
    commands, patches_named = [], []
    for page in PAGES:
        text = page.read_text()
        for b, block in enumerate(blocks(page, SHELL), start=1):
            lines = shell_lines(block)
            patches = [w[2] for line in lines for w in split_words(line) if w[:2] == ["git", "apply"] and len(w) > 2]
            patches_named += patches
            for line in lines:
                for words in split_words(line):
                    command = to_command(words, f"{rel(page)}, shell block {b}: {line.strip()}", patches)
                    if command:
                        commands.append(command)
        prose = FENCE.sub("", text)
        for span in INLINE.findall(prose):
            span = " ".join(span.split())
            if PROGRAM.match(span) and "..." not in span:
                for words in split_words(span):
                    command = to_command(words, f"{rel(page)}, inline: {span}", [])
                    if command:
                        commands.append(command)
    return commands, patches_named


# Runs in a fresh interpreter (the scripts' imports and global settings stay out of the test process). Reads the
# commands as JSON on stdin, prints one JSON object per command: {"where", "ok", "message"}.
DRIVER = r'''
import argparse, contextlib, io, json, os, runpy, sys, traceback
from pathlib import Path

from lsrfx.settings import VARIABLES

class Parsed(BaseException):
    def __init__(self, namespace, extra=()):
        self.namespace, self.extra = namespace, list(extra)

real_parse_args = argparse.ArgumentParser.parse_args
real_parse_known = argparse.ArgumentParser.parse_known_args
depth = [0]

def parse_args(self, args=None, namespace=None):
    depth[0] += 1
    try:
        namespace = real_parse_args(self, args, namespace)
    finally:
        depth[0] -= 1
    raise Parsed(namespace)

def parse_known_args(self, args=None, namespace=None):
    if depth[0]:
        return real_parse_known(self, args, namespace)
    namespace, extra = real_parse_known(self, args, namespace)
    raise Parsed(namespace, extra)

argparse.ArgumentParser.parse_args = parse_args
argparse.ArgumentParser.parse_known_args = parse_known_args

def parse(run, argv):
    """Run ``run()`` with ``sys.argv = argv`` until it has parsed its arguments: the namespace, or None after a
    --help exit; raises with the parser's message otherwise."""
    out = io.StringIO()
    sys.argv = list(argv)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            run()
    except Parsed as p:
        if p.extra:
            raise AssertionError(f"arguments the parser does not know: {p.extra}")
        return p.namespace
    except SystemExit as e:
        if e.code in (0, None) and ("--help" in argv or "-h" in argv):
            return None
        raise AssertionError(f"the parser refused the arguments (exit {e.code}): {' '.join(out.getvalue().split())[-600:]}")
    raise AssertionError("the program ran to its end without parsing its arguments with argparse")

def lsrfx_cli(args):
    from lsrfx import cli
    ns = parse(lambda: cli.build_parser().parse_args(args), ["lsrfx", *args])
    if ns is not None and ns.command in ("finetune", "inspect"):
        methods = (getattr(ns, "compare", None) or [ns.method])
        cli.method_options(ns, methods)  # every adapter flag applies to a chosen method and builds its config

def frontier(module, ns, patches):
    known = set(module["points"](ns.genlora_basis))
    for patch in patches:
        known |= set(__import__("re").findall(r'out\["([\w.-]+)"\]', Path(patch).read_text()))
    unknown = sorted(set(ns.only or []) - known)
    if unknown:
        raise AssertionError(f"--only names points bench/frontier.py does not define: {unknown}")
    extra = [a for a in ns.extra if a != "--"]
    if extra:
        lsrfx_cli(["finetune", *extra])

def finetune_sweep(module, ns, patches):
    from lsrfx.adapters import make_config
    for spec in ns.specs:
        method, _, _, options = module["parse_spec"](spec)
        make_config(method, options)

SCRIPT_CHECKS = {"bench/frontier.py": frontier, "bench/finetune_sweep.py": finetune_sweep}

def check(command):
    argv = command["argv"]
    for name, value in command["env"].items():
        if name in VARIABLES:
            assert value in VARIABLES[name], f"{name}={value} is not one of {VARIABLES[name]}"
    if argv[0] == "lsrfx":
        return lsrfx_cli(argv[1:])
    if argv[1] == "-m":
        module = argv[2]
        return parse(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True), [module, *argv[3:]])
    script = argv[1]
    path = Path(script)
    assert path.is_file(), f"{script} does not exist"
    assert "argparse" in path.read_text(), f"{script} has no argparse parser this check can stop after"
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        ns = parse(lambda: runpy.run_path(script, run_name="__main__"), [script, *argv[2:]])
        if ns is not None and script in SCRIPT_CHECKS:
            SCRIPT_CHECKS[script](runpy.run_path(script, run_name="checked"), ns, command["patches"])
    finally:
        sys.path.remove(str(path.parent.resolve()))

results = []
for command in json.load(sys.stdin):
    try:
        check(command)
        results.append({"where": command["where"], "ok": True, "message": ""})
    except BaseException as exc:
        plain = isinstance(exc, AssertionError) or type(exc).__name__ == "LsrfxError"
        message = str(exc) if plain else traceback.format_exc(limit=3)
        results.append({"where": command["where"], "ok": False, "message": message})
print("\n" + json.dumps(results))
'''


def test_every_documented_command_parses() -> None:
    commands, patches = documented_commands()
    programs = {" ".join(c.argv[:2]) for c in commands}
    # The collector must see the commands the pages are known to hold (else it checks nothing).
    for expected in ("lsrfx finetune", "lsrfx inspect", "python bench/frontier.py", "python bench/train_step.py",
                     "python -m"):
        assert expected in programs, f"no documented command runs {expected!r}: the collector is broken"
    for patch in patches:
        assert (ROOT / patch).is_file(), f"the docs `git apply` {patch}, which does not exist"
    done = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps([asdict(c) for c in commands]),
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == len(commands)
    failed = [f"{r['where']}\n    {r['message']}" for r in results if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(results)} documented commands do not parse:\n" + "\n".join(failed)


# --- environment variables -------------------------------------------------------------------------------------


def test_the_readme_lists_every_environment_variable_with_accepted_values(monkeypatch) -> None:
    from lsrfx import settings

    # Only lsrfx/settings.py reads the environment for an LSRFX_ variable; every name it mentions is in VARIABLES.
    for path in (ROOT / "lsrfx").rglob("*.py"):
        text = path.read_text()
        if path.name != "settings.py":
            assert not re.search(r"environ.*LSRFX_|getenv.*LSRFX_", text), f"{path} reads an LSRFX_ variable itself"
    named = set(re.findall(r'"(LSRFX_[A-Z_]+)"', (ROOT / "lsrfx" / "settings.py").read_text()))
    assert named == set(settings.VARIABLES) >= {"LSRFX_FUSE", "LSRFX_KERNEL", "LSRFX_LOG"}
    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(LSRFX_[A-Z_]+)` \|([^|]*)\|", readme, re.M)}
    assert set(rows) == set(settings.VARIABLES), "the README's environment table must list exactly those variables"
    readers = {"LSRFX_FUSE": settings.fuse_policy, "LSRFX_KERNEL": settings.kernel_mode,
               "LSRFX_LOG": settings.log_level}
    for name, cell in rows.items():
        values = re.findall(r"`([^`]+)`", cell)
        assert values, name
        for value in values:  # each documented value is accepted and read as itself
            monkeypatch.setenv(name, value)
            want = settings.LOG_LEVELS[value] if name == "LSRFX_LOG" else value
            assert readers[name]() == want, (name, value)
        monkeypatch.setenv(name, "bogus")
        with pytest.raises(lsrfx.LsrfxError, match=f"{name}='bogus'"):
            readers[name]()


# --- links -----------------------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces -> ``-``."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_resolve(page: Path) -> None:
    prose = FENCE.sub("", page.read_text())
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)
