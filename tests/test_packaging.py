"""README's two commands: the first installs only what the main job needs (no torch, no test
tools) and trains; the second installs the test extras and runs the suite, exactly as
``.ci/run`` does.

The requirement sets come from setup.cfg (``install_requires`` plus the extras a command
names, self-references such as ``umup-jax[reference]`` expanded); ``-m slow`` also asks pip
itself: ``pip install --dry-run --report`` of README's first command in a fresh venv."""

import configparser
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_ONLY = {"torch", "torchvision", "pytest", "pytest-xdist", "unit-scaling", "transformers",
             "nbclient", "ipykernel"}


def quick_start() -> tuple[str, str]:
    """README's two Quick start commands."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no Quick start bash block"
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2, commands
    return commands[0], commands[1]


def install_target(command: str) -> list[str]:
    """The extras of ``pip install -e .[a,b] && …`` (quoted or not)."""
    match = re.match(r"pip install -e (\"?)\.(?:\[([\w,-]*)\])?\1 && ", command)
    assert match, f"not a 'pip install -e .[…] && …' command: {command!r}"
    return [e for e in (match.group(2) or "").split(",") if e]


def requirement_names(extras: list[str]) -> set[str]:
    """Canonical names of install_requires + ``extras`` in setup.cfg, self-references expanded."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    project = canonicalize_name(cfg["metadata"]["name"])
    lines = lambda text: [l.strip() for l in text.splitlines()  # noqa: E731
                          if l.strip() and not l.strip().startswith("#")]
    table = {name: lines(value) for name, value in cfg["options.extras_require"].items()}
    names, todo, seen = set(), lines(cfg["options"]["install_requires"]), set()
    for extra in extras:
        assert extra in table, f"README names extra {extra!r}, setup.cfg has {sorted(table)}"
        todo += table[extra]
    while todo:
        req = Requirement(todo.pop())
        name = canonicalize_name(req.name)
        if name == project:
            for extra in set(req.extras) - seen:
                seen.add(extra)
                todo += table[extra]
        else:
            names.add(name)
    return names


def test_readme_first_command_installs_no_torch_and_trains():
    first, _ = quick_start()
    names = requirement_names(install_target(first))
    assert not names & TEST_ONLY, sorted(names & TEST_ONLY)
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain", "ml-collections", "absl-py",
            "tokenizers"} <= names
    assert first.endswith("&& python -m umup_jax.main --config=configs/umup_proxy.py:cpu "
                          "--workdir=runs/umup_cpu"), first


def test_readme_second_command_installs_what_the_tests_use():
    _, second = quick_start()
    assert second.endswith("&& python -m pytest -q -n 2 --dist loadfile"), second
    names = requirement_names(install_target(second))
    assert {"pytest", "pytest-xdist", "torch", "unit-scaling", "transformers", "safetensors",
            "datasets", "ray", "nbclient", "nbformat", "ipykernel"} <= names


def test_ci_runs_the_readme_test_command():
    """.ci/run installs the CPU torch wheel, then ends with README's second command, word for
    word."""
    _, second = quick_start()
    lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()
             if l.strip() and not l.strip().startswith("#")]
    assert lines[-1] == second, lines
    assert lines.index('python -m pip install "torch==2.13.0"') < len(lines) - 1


def test_the_main_job_imports_no_torch():
    code = ("import sys, umup_jax.main, umup_jax.sweep, umup_jax.coord_check, umup_jax.analysis;"
            "print(sorted(m for m in ('torch', 'transformers', 'pytest', 'unit_scaling') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.slow
def test_pip_resolves_readme_first_command_without_torch(tmp_path):
    """pip's own resolution of README's first install, in a fresh venv (about 15 s)."""
    first, _ = quick_start()
    target = first.split(" && ")[0].removeprefix("pip install ").split()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--dry-run", "--quiet",
         "--report", str(report), *[t.strip('"') for t in target]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = {canonicalize_name(item["metadata"]["name"])
                 for item in json.loads(report.read_text())["install"]}
    assert "umup-jax" in installed and "jax" in installed, sorted(installed)
    assert not installed & TEST_ONLY, sorted(installed & TEST_ONLY)
    assert not {n for n in installed if n.startswith("nvidia-")}, sorted(installed)
