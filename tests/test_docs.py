"""The README and docs/ stay true: links resolve, `moeviz` commands parse, the README's Python
runs on the demo, and the set-up commands are the ones CI runs."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---- reading markdown ----------------------------------------------------------------------
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


def code_blocks(text: str) -> list[tuple[str, int, str]]:
    """Fenced blocks as (info string, first line number, body), indented fences included."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).lower()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            j += 1
        blocks.append((info, i + 2, "\n".join(body)))
        i = j + 1
    return blocks


def prose(text: str) -> str:
    """The text without fenced blocks (their lines kept empty, so line numbers hold)."""
    out, inside, fence = [], False, ""
    for line in text.split("\n"):
        m = FENCE.match(line)
        if m and not inside:
            inside, fence = True, m.group(2)
            out.append("")
        elif inside and line.strip().startswith(fence):
            inside = False
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


def inline_code_removed(line: str) -> str:
    return re.sub(r"`[^`]*`", "", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores
    kept), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text()).split("\n"):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(path: Path) -> list[tuple[int, str]]:
    """Relative links and images outside code: (line number, target)."""
    found = []
    for number, line in enumerate(prose(path.read_text()).split("\n"), 1):
        for target in LINK.findall(inline_code_removed(line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                found.append((number, target))
    return found


# ---- the shown commands --------------------------------------------------------------------
SHELL_BLOCKS = {"bash", "sh", "shell", "console", "shell-session"}
COMMAND_START = re.compile(r"(?:^|\$\(|&&|\|\||;|\|)\s*((?:\S*/)?moeviz\s)|(?<=\s)(-m\s+moeviz\.cli\s)")


def shell_lines(body: str) -> list[str]:
    """Logical lines of a shell block: backslash continuations joined, `$ ` prompts removed."""
    lines, pending = [], ""
    for raw in body.split("\n"):
        line = raw.rstrip()
        if pending:
            line = pending + " " + line.lstrip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = ""
        lines.append(re.sub(r"^\s*\$\s+", "", line))
    if pending:
        lines.append(pending)
    return lines


def moeviz_args(line: str) -> list[list[str]]:
    """The argument lists of every `moeviz …` (or `… -m moeviz.cli …`) command on a shell line,
    each up to the end of its command (a pipe, `;`, `&&`, `)` or a comment)."""
    found = []
    for m in COMMAND_START.finditer(line):
        rest = line[m.end():]
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = []
        for word in lexer:
            if word and set(word) <= set("();&|<>"):
                break
            words.append(word)
        found.append(words)
    return found


def shown_commands(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, the shell line, its arguments) for every moeviz command in the shell blocks."""
    found = []
    for info, first, body in code_blocks(path.read_text()):
        if info not in SHELL_BLOCKS:
            continue
        for offset, line in enumerate(shell_lines(body)):
            for args in moeviz_args(line):
                found.append((first + offset, line.strip(), args))
    return found


def parse_error(args: list[str]) -> str | None:
    """argparse's complaint about `moeviz ARGS`, or None when the current parser takes them."""
    from moeviz.cli import build_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(args)
    except SystemExit as exit_:
        if exit_.code not in (0, None):  # --help exits 0
            return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {exit_.code}"
    return None


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from moeviz.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


INLINE_COMMAND = re.compile(r"`((?:\S*/)?moeviz\s+[a-z][^`]*)`")


# ---- the tests ----------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
    broken = []
    for number, target in links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{_name(page)}:{number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{_name(page)}:{number}: {target} (no heading #{anchor} in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_shown_moeviz_commands_parse(page):
    bad = []
    for number, line, args in shown_commands(page):
        error = parse_error(args)
        if error:
            bad.append(f"{_name(page)}:{number}: {line}\n    {error}")
    assert not bad, "commands the current parser refuses:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_inline_moeviz_commands_name_real_options(page):
    """Commands quoted in the prose (`moeviz plan --scope global`) are often fragments: their
    command must exist and each option they name must be one of that command's."""
    commands, bad = subcommands(), []
    for number, line in enumerate(prose(page.read_text()).split("\n"), 1):
        for quoted in INLINE_COMMAND.findall(line):
            words = quoted.split()
            name = words[1]
            if name not in commands:
                bad.append(f"{_name(page)}:{number}: `{quoted}`: no command {name!r}")
                continue
            known = commands[name]._option_string_actions
            for word in words[2:]:
                option = word.split("=", 1)[0]
                if option.startswith("-") and option not in known:
                    bad.append(f"{_name(page)}:{number}: `{quoted}`: {name} has no option {option}")
    assert not bad, "\n".join(bad)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for _, target in links(README)}
    missing = [_name(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link to: {missing}"


def test_the_readme_is_a_front_door():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the depth belongs in docs/"


def test_the_set_up_commands_are_the_ones_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().split("\n")
    marker = next(i for i, line in enumerate(ci) if "The README's test command" in line)
    test_command = ci[marker + 1].strip()
    assert test_command.endswith("-m pytest"), test_command
    setup = README.read_text().split("## Set up on a fresh machine")[1].split("\n## ")[0]
    shown = [body.strip() for info, _, body in code_blocks(setup) if info == "bash"]
    assert test_command in shown, f"the README's set-up does not show .ci/run's test command:\n{test_command}"
    prefix = test_command.split(" -e ")[0]  # the virtual environment and the torch pin
    app = [c for c in shown if c.endswith(".venv/bin/streamlit run app.py")]
    assert len(app) == 1 and app[0].startswith(prefix + " -e "), \
        f"the README's set-up should show one command that runs the app, starting {prefix!r}: {shown}"


def readme_python_blocks() -> list[tuple[str, int, str]]:
    """(the heading above it, line, body) for every ```python block of the README."""
    text, found = README.read_text(), []
    headings = [(i + 1, line) for i, line in enumerate(prose(text).split("\n")) if line.startswith("#")]
    for info, first, body in code_blocks(text):
        if info == "python":
            heading = [h for n, h in headings if n < first][-1].lstrip("#").strip()
            found.append((heading, first, body))
    return found


def test_the_readme_python_runs_on_the_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # calibration caches go to ./cache
    blocks = readme_python_blocks()
    assert [h for h, _, _ in blocks].count("The library") == 1
    for heading, first, body in blocks:
        scope: dict = {}
        exec(compile("\n" * (first - 1) + body, str(README), "exec"), scope)  # tracebacks name README lines
        if heading == "The library":
            assert scope["routing"].top_k_index.shape == (5, 2)
            assert not (scope["pruned_logits"] == scope["original_logits"]).all()  # the plan changes the outputs
            assert (tmp_path / "cache").is_dir()


def test_the_demo_page_says_what_the_app_says_each_demo_teaches():
    from moeviz.demo import DEMO_MODELS

    page = " ".join((ROOT / "docs" / "demo.md").read_text().split())
    for name, demo in DEMO_MODELS.items():
        assert f"**{name}** — {demo.teaches}" in page, f"docs/demo.md's line for {name} differs from the sidebar's"
