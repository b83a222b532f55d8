"""``import kvctl`` and every command but demo/doctor stay off torch and the compiled core."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
from typer.testing import CliRunner
from kvctl.main import app
runner = CliRunner()
codes = {}
for args in ARGS:
    codes[" ".join(args)] = runner.invoke(app, args).exit_code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "psutil") or m.startswith(("kvcached._vmm", "kvcached.vmm", "kvcached.pool", "kvcached.demo")))
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def probe(commands: list[list[str]]) -> dict:
    code = _PROBE.replace("ARGS", repr(commands))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_kvctl_and_help_are_light():
    result = probe([["--help"], ["ls", "--help"], ["demo", "--help"]])
    assert result["heavy"] == []
    assert set(result["codes"].values()) == {0}


@pytest.mark.multiproc
def test_commands_other_than_demo_and_doctor_are_light(engines, shm_name):
    engines("alpha", alloc=4)
    engines("beta", alloc=4)
    commands = [
        ["ls"],
        ["ls", "--json"],
        ["top", "--once", "--interval", "0.1"],
        ["top", "--json", "--interval", "0.1"],
        ["limit", "alpha", "64MiB"],
        ["budget", "0", "1G"],
        ["set", "beta", "--weight", "2", "--min", "1MiB"],
        ["rebalance", "--dry-run"],
        ["rebalance", "--policy", "equal"],
        ["launch", "--", "true"],
        ["limit", "nobody", "1G"],
    ]
    result = probe(commands)
    assert result["heavy"] == []
    assert list(result["codes"].values()) == [0] * (len(commands) - 1) + [1]


def test_demo_engines_need_no_torch():
    """`pip install .` then `kvctl demo` on a machine without torch: the default pool is torch-free."""
    code = (
        "import sys\n"
        "from kvcached.demo.pool import ModelShape, build_pool\n"
        "import kvcached.demo.engine, kvcached.demo.runner, kvcached.demo.summary\n"
        "dp = build_pool(ModelShape(), 'host', 64 << 20, 64 << 20)\n"
        "ids = dp.alloc(10)\n"
        "dp.free(ids)\n"
        "dp.close()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


def test_command_names_match_the_app():
    from kvctl.errors import COMMAND_NAMES
    from kvctl.main import app

    assert tuple(c.name for c in app.registered_commands) == COMMAND_NAMES


@pytest.mark.multiproc
def test_console_ls_takes_the_fast_path(engines, shm_name):
    """`kvctl ls` as the console script runs without Typer (nor pydantic, rich, torch)."""
    from cli_helpers import kvctl_cmd

    engines("alpha", alloc=4)
    code = (
        "import sys\n"
        "from kvctl.main import app\n"
        "sys.argv = ['kvctl', '--segment', sys.argv[1], 'ls']\n"
        "try:\n    app()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "sys.stderr.write(repr((code, sorted({m.split('.')[0] for m in sys.modules} & {'typer', 'pydantic', 'rich', 'torch'}))))\n"
    )
    run = subprocess.run([sys.executable, "-c", code, shm_name], capture_output=True, text=True, timeout=60)
    assert run.stderr.strip() == "(0, [])"
    assert run.stdout.startswith(f"segment {shm_name}\n") and "alpha" in run.stdout
    typer_path = subprocess.run(kvctl_cmd("ls", "--help"), capture_output=True, text=True, timeout=60)
    assert "Usage: kvctl ls" in typer_path.stdout  # anything else still goes through Typer
