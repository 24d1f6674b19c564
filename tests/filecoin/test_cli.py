"""``jiaozifuse archive`` and ``jiaozifuse restore``, run for real in subprocesses.

Until cli.py registers the commands itself, the CLI is started through a two-line
wrapper that calls ``cli_archive.register(main)`` (idempotent once it does).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import MiB, Sample

WRAPPER = (
    "import sys\n"
    "from jiaozifuse.cli import main\n"
    "from jiaozifuse.cli_archive import register\n"
    "if 'archive' not in main.commands: register(main)\n"
    "sys.argv[0] = 'jiaozifuse'\n"
    "main()\n"
)


def jz(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=300)


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def test_archive_status_mark_restore(sample: Sample, tmp_path: Path) -> None:
    repo = str(sample.path)
    sample.repo.close()
    out = tmp_path / "out"
    res = _ok(jz("archive", "main", "--repo", repo, "--out", out, "--target-size", "2M",
                 "--url-prefix", "https://cars.example/x/", "--json"))
    doc = json.loads(res.stdout)
    assert len(doc["pieces"]) >= 3
    assert doc["pieces"][0]["url"] == "https://cars.example/x/" + doc["pieces"][0]["car_file"]
    # the same through the explicit subcommand, and human output
    again = _ok(jz("archive", "run", "main", "--repo", repo, "--out", out))
    assert "nothing new to archive" in again.stdout
    st = json.loads(_ok(jz("archive", "status", "--json", "--repo", repo)).stdout)
    assert st["counts"]["packed"] == len(doc["pieces"])
    human = _ok(jz("archive", "status", "--repo", repo)).stdout
    assert doc["pieces"][0]["piece_cid"] in human and "packed" in human
    cid = doc["pieces"][0]["piece_cid"]
    marked = json.loads(_ok(jz("archive", "mark", cid, "active", "--deal-id", "123",
                               "--repo", repo, "--json")).stdout)
    assert marked["state"] == "active" and marked["detail"] == {"deal_id": "123"}
    res = _ok(jz("restore", "--from-car", out, tmp_path / "new", "--json"))
    r = json.loads(res.stdout)
    assert r["refs"]["branch/main"] == sample.head.hex()
    human = _ok(jz("restore", "--from-car", out, tmp_path / "new2")).stdout
    assert "Restored" in human and str(tmp_path / "new2") in human


def test_command_onramp_cli(sample: Sample, tmp_path: Path) -> None:
    repo = str(sample.path)
    sample.repo.close()
    script = tmp_path / "ramp.py"
    script.write_text("import json, sys\np = json.loads(sys.stdin.read())\n"
                      "print(json.dumps({'state': 'submitted', 'proposal': p['piece_cid']}))\n")
    res = _ok(jz("archive", "--onramp", "command", "--command",
                 f"{sys.executable} {script}", "main", "--repo", repo, "--json",
                 "--out", tmp_path / "out"))
    doc = json.loads(res.stdout)
    assert {p["state"] for p in doc["pieces"]} == {"submitted"}


@pytest.mark.parametrize("case", ["truncated", "unknown-ref", "no-command", "bad-size"])
def test_errors_are_one_line(sample: Sample, tmp_path: Path, case: str) -> None:
    repo = str(sample.path)
    sample.repo.close()
    if case == "truncated":
        out = tmp_path / "out"
        _ok(jz("archive", "main", "--repo", repo, "--out", out, "--target-size", "4M"))
        car = sorted(out.glob("*.car"))[0]
        car.write_bytes(car.read_bytes()[: MiB // 2])
        res = jz("restore", "--from-car", out, tmp_path / "new")
        assert res.returncode == 1
        assert car.name in res.stderr and "truncated" in res.stderr
        assert not (tmp_path / "new").exists()
    elif case == "unknown-ref":
        res = jz("archive", "nosuchref", "--repo", repo, "--out", tmp_path / "o")
        assert res.returncode == 1 and "nosuchref" in res.stderr
    elif case == "no-command":
        res = jz("archive", "main", "--onramp", "command", "--repo", repo)
        assert res.returncode == 1 and "--command" in res.stderr
    else:
        res = jz("archive", "main", "--target-size", "lots", "--repo", repo)
        assert res.returncode == 2
        return
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr
