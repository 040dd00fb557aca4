"""The SDK's docs: the quick start runs as written against real servers, and the API reference is
the one its docstrings generate."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from tests.conftest import Backend
from tests.suite import JWT_SECRET, running_suite

ROOT = Path(__file__).resolve().parents[2]


def test_the_guide_holds_the_quick_start_as_it_is() -> None:
    program = (ROOT / "examples" / "quickstart.py").read_text()
    assert f"```python\n{program}```" in (ROOT / "docs" / "sdk.md").read_text()


async def test_the_quick_start_runs_as_written(backend: Backend, tmp_path: Path) -> None:
    async with running_suite(backend, tmp_path) as suite:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / "quickstart.py"),
            f"--messaging={suite.address('messaging')}",
            f"--awareness={suite.address('awareness')}",
            f"--sync={suite.address('sync')}",
            env={"BIMIP_JWT_SECRET": JWT_SECRET, "BIMIP_VAR_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0] == "alice: sent, offset 1"
    assert lines[1] == "bob: alice@example.com says 'Hello, Bob!'"
    assert lines[-1] == "alice: READ"


def test_the_api_reference_is_generated_from_the_docstrings() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_sdk_reference.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert check.returncode == 0, check.stderr
    reference = (ROOT / "docs" / "sdk-reference.md").read_text()
    for name in ("Client", "send(", "events(", "set_intent(", "resume_from_snapshot(", "BimipClientError"):
        assert name in reference
