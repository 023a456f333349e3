"""The README's commands run as written after the README's own install.

Every shell command in README.md (fenced or indented blocks) must name an executable that exists: a
`.venv/bin/X` is looked up in the venv running this suite (the one the README's test command made), a
bare name on PATH, and a `python -m M` must name an importable module. A README that says `exo ...`
where only `.venv/bin/exo` exists fails here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
VENV_BIN = Path(sys.prefix) / "bin"
SEPARATORS = re.compile(r"\s*(?:&&|\|\||;|\|)\s*")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def shell_blocks(markdown: str) -> list[str]:
    """The text of each fenced block (no language, sh, bash, shell, console) and each indented block."""
    blocks: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            if fence.group(1) in {"", "sh", "bash", "shell", "console"}:
                blocks.append("\n".join(lines[i + 1 : end]))
            i = end + 1
            continue
        if line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            blocks.append("\n".join(candidate[4:] for candidate in lines[i:end]))
            i = end
            continue
        i += 1
    return blocks


def commands(block: str) -> list[str]:
    """Simple commands of a block: continuations and multi-line quotes joined, comments dropped, split
    at && || ; |."""
    joined = re.sub(r"\s*\\\n\s*", " ", block)
    lines: list[str] = []
    for raw in joined.splitlines():
        if lines and lines[-1].count("'") % 2:  # a quoted argument (a JSON body) goes on over lines
            lines[-1] += " " + raw.strip()
        else:
            lines.append(raw)
    found: list[str] = []
    for raw in lines:
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            found.extend(part for part in SEPARATORS.split(line) if part)
    return found


def path_without_venv() -> str:
    """PATH less the venv's bin: a new user has not activated the venv, so the README cannot rely on it."""
    entries = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(
        entry for entry in entries if entry and Path(entry).resolve() != VENV_BIN.resolve()
    )


def problem(command: str) -> str | None:
    """Why this command would not run after the install, or None."""
    words = [word for word in shlex.split(command) if not ENV_ASSIGNMENT.match(word)]
    if words and words[0] == "sudo":
        words = words[1:]
    if not words:
        return None
    program = words[0]
    if program.startswith(".venv/bin/"):
        if not (VENV_BIN / program.removeprefix(".venv/bin/")).exists():
            return f"{program} does not exist after the install"
    elif "/" in program:
        if not (ROOT / program).exists():
            return f"{program} is not in the repository"
    elif shutil.which(program, path=path_without_venv()) is None:
        return f"{program} is not on PATH"
    is_python_m = Path(program).name.startswith("python") and len(words) > 2 and words[1] == "-m"
    module = words[2] if is_python_m else None
    if module and importlib.util.find_spec(module) is None:
        return f"module {module} does not exist"
    return None


def test_readme_commands_name_executables_that_exist() -> None:
    found = [command for block in shell_blocks(README.read_text()) for command in commands(block)]
    assert len(found) >= 6, found  # the two install commands alone are more
    problems = {command: why for command in found if (why := problem(command))}
    assert problems == {}


def test_readme_starts_with_the_two_fresh_machine_commands_and_ci_runs_the_same_install() -> None:
    blocks = shell_blocks(README.read_text())
    start, test = blocks[0].strip(), blocks[1].strip()
    assert start.endswith(".venv/bin/exo")
    assert test.endswith(".venv/bin/python -m pytest")
    assert "--locked" in start and "--locked" in test
    ci = (ROOT / ".ci" / "run").read_text()
    for step in commands(test)[:-1]:  # the install, from the lock, exactly as the README says it
        assert step.replace(" -q", "") in ci.replace(" -q", ""), step


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("exo --peers 1.2.3.4:5", "exo is not on PATH"),
        (".venv/bin/no-such-tool", ".venv/bin/no-such-tool does not exist after the install"),
        (".venv/bin/python -m no_such_module_here", "module no_such_module_here does not exist"),
        ("./scripts/nope", "./scripts/nope is not in the repository"),
        ("FOO=1 .venv/bin/python -m pytest", None),
    ],
)
def test_the_checker_catches_commands_that_cannot_run(command: str, expected: str | None) -> None:
    assert problem(command) == expected


def test_blocks_are_found_fenced_and_indented() -> None:
    text = "intro\n\n    a && b \\\n      --c\n\n```sh\nd | e\n```\n```json\n{}\n```\n"
    assert [commands(block) for block in shell_blocks(text)] == [["a", "b --c"], ["d", "e"]]
