"""The documentation cannot rot: docs/guide.md runs, docs/cli.md is current.

**The guide.**  Every fenced ``sh`` block of docs/guide.md that follows a
``<!-- run -->`` comment is run, in order, in one bash process (so variables
and the working directory carry from block to block, as in the reader's
shell), with ``HOME`` pointing into a temporary directory: the guide's own
first block derives ``$WORK``, ``$REPO`` and ``$MNT`` from it.  Blocks marked
``<!-- run: s3 -->`` get a real S3 server (SeaweedFS) through ``$S3_URL``,
``$S3_ENDPOINT`` and the AWS variables, and are skipped (the rest still runs)
when there is none.  The ``<!-- expect: TEXT -->`` comments after a block
must each appear in that block's output (stdout and stderr together);
``<!-- expect-re: REGEX -->`` must match a line of it.  Whatever is still
mounted under the temporary directory at the end is unmounted.

**The command reference.**  docs/cli.md must equal what
``scripts/gen_cli_docs.py`` renders from the click commands.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import have_fuse, is_mounted

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guide.md"
VENV_BIN = Path(sys.executable).parent

RUN_RE = re.compile(r"<!--\s*run(?::\s*(?P<tag>[\w-]+))?\s*-->")
EXPECT_RE = re.compile(r"<!--\s*expect(?P<re>-re)?:\s*(?P<text>.*?)\s*-->")


@dataclass
class Block:
    line: int  # 1-based line of the fence, for messages
    code: str
    tag: str | None = None
    expects: list[tuple[bool, str]] = field(default_factory=list)  # (is_regex, text)


def parse_guide(text: str) -> list[Block]:
    """The runnable blocks of a markdown text, with their expectations."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = RUN_RE.fullmatch(lines[i].strip())
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or lines[j].strip() not in ("```sh", "```bash"):
            raise AssertionError(f"guide line {i + 1}: <!-- run --> must precede a ```sh block")
        end = j + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end >= len(lines):
            raise AssertionError(f"guide line {j + 1}: unterminated code block")
        block = Block(j + 1, "\n".join(lines[j + 1:end]), m.group("tag"))
        k = end + 1
        while k < len(lines):
            e = EXPECT_RE.fullmatch(lines[k].strip())
            if not e:
                break
            block.expects.append((bool(e.group("re")), e.group("text")))
            k += 1
        blocks.append(block)
        i = k
    return blocks


def build_script(blocks: list[Block], skip_tags: set[str]) -> tuple[str, list[int]]:
    """One bash script running the blocks, each announced by a marker line on stdout."""
    parts = ["exec 2>&1", "set -eo pipefail"]
    ran = []
    for n, b in enumerate(blocks):
        if b.tag in skip_tags:
            continue
        ran.append(n)
        parts.append(f"echo '@@jz-guide-block {n}@@'")
        parts.append(b.code)
    parts.append("echo '@@jz-guide-end@@'")
    return "\n".join(parts) + "\n", ran


def split_output(out: str) -> tuple[dict[int, str], bool]:
    """Block number -> its output; and whether the script reached its end."""
    chunks: dict[int, str] = {}
    current: int | None = None
    done = False
    for line in out.splitlines(keepends=True):
        m = re.fullmatch(r"@@jz-guide-block (\d+)@@\n?", line)
        if m:
            current = int(m.group(1))
            chunks[current] = ""
            continue
        if line.startswith("@@jz-guide-end@@"):
            done = True
            current = None
            continue
        if current is not None:
            chunks[current] += line
    return chunks, done


# ---------------------------------------------------------------- unit checks


def test_parser_reads_blocks_and_expectations() -> None:
    text = """intro
<!-- run -->
```sh
echo one
```
<!-- expect: one -->
<!-- expect-re: ^o.e$ -->

```sh
not run
```

<!-- run: s3 -->

```sh
echo two
echo three
```
"""
    blocks = parse_guide(text)
    assert [(b.code, b.tag, b.expects) for b in blocks] == [
        ("echo one", None, [(False, "one"), (True, "^o.e$")]),
        ("echo two\necho three", "s3", []),
    ]
    script, ran = build_script(blocks, {"s3"})
    assert ran == [0] and "echo two" not in script
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    chunks, done = split_output(res.stdout)
    assert done and chunks == {0: "one\n"}


def test_the_guide_has_runnable_blocks() -> None:
    blocks = parse_guide(GUIDE.read_text())
    assert len(blocks) >= 10
    assert sum(len(b.expects) for b in blocks) >= 20
    # The guide's variables come from its first block, so a reader can follow it as is.
    assert "export WORK=" in blocks[0].code and "REPO=" in blocks[0].code


# ---------------------------------------------------------------- the real run


def _s3_env(stack: contextlib.ExitStack) -> dict[str, str] | None:
    """Start a SeaweedFS server for the s3 blocks, or None when there is none."""
    if shutil.which("weed") is None and not (VENV_BIN / "weed").exists():
        return None
    sys.path.insert(0, str(ROOT / "tests"))
    from s3server import SeaweedS3

    server = stack.enter_context(SeaweedS3())
    bucket = server.make_bucket(f"jz-guide-{os.getpid() % 100000}")
    return {**server.env(), "S3_URL": f"s3://{bucket}/datasets/cifar",
            "S3_ENDPOINT": server.endpoint}


def _unmount_all_under(root: Path) -> None:
    with open("/proc/self/mounts") as f:
        mnts = [line.split()[1] for line in f if len(line.split()) > 1]
    for m in sorted((p for p in mnts if p.startswith(str(root))), key=len, reverse=True):
        with contextlib.suppress(Exception):
            subprocess.run([str(VENV_BIN / "jiaozifuse"), "umount", m], capture_output=True,
                           timeout=60)
        if is_mounted(Path(m)):
            subprocess.run(["fusermount3", "-uz", m], capture_output=True)


@pytest.mark.mount
@pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")
def test_guide_runs(tmp_path: Path) -> None:
    blocks = parse_guide(GUIDE.read_text())
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JIAOZI", "AWS_", "S3_"))}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}:{env.get('PATH', '')}", LC_ALL="C.UTF-8")
    with contextlib.ExitStack() as stack:
        stack.callback(_unmount_all_under, tmp_path)
        skip: set[str] = set()
        s3 = _s3_env(stack) if any(b.tag == "s3" for b in blocks) else None
        if s3 is None:
            skip.add("s3")
        else:
            env.update(s3)
        unknown = {b.tag for b in blocks if b.tag} - {"s3"}
        assert not unknown, f"unknown run tags in the guide: {unknown}"
        script, ran = build_script(blocks, skip)
        res = subprocess.run(["bash", "-c", script], env=env, cwd=home, capture_output=True,
                             text=True, timeout=600)
    chunks, done = split_output(res.stdout)
    if not done or res.returncode != 0:
        last = max(chunks) if chunks else ran[0]
        b = blocks[last]
        raise AssertionError(
            f"the guide stopped in the block at docs/guide.md:{b.line} (exit "
            f"{res.returncode}):\n{b.code}\n--- output ---\n{chunks.get(last, res.stdout)}"
            f"{res.stderr}")
    failures = []
    for n in ran:
        b = blocks[n]
        out = chunks.get(n, "")
        for is_re, text in b.expects:
            ok = (re.search(text, out, re.MULTILINE) is not None) if is_re else text in out
            if not ok:
                failures.append(f"docs/guide.md:{b.line}: expected "
                                f"{'a match for ' if is_re else ''}{text!r} in:\n{out}")
    assert not failures, "\n\n".join(failures)
    assert not any(is_mounted(p) for p in tmp_path.rglob("*mnt*") if p.is_dir())
    if s3 is None:
        pytest.skip("ran the guide without its S3 blocks (no weed binary)")


# ---------------------------------------------------------------- docs/cli.md


def test_cli_reference_is_current() -> None:
    """docs/cli.md is what scripts/gen_cli_docs.py renders (regenerate it if this fails)."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py"), "--check"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, (
        "docs/cli.md is stale: run `python scripts/gen_cli_docs.py` and commit it\n"
        + res.stdout[-4000:] + res.stderr)


def test_cli_reference_covers_every_command() -> None:
    import click

    from jiaozifuse.cli import main

    text = (ROOT / "docs" / "cli.md").read_text()
    ctx = click.Context(main, info_name="jiaozifuse")
    for name in main.list_commands(ctx):
        cmd = main.get_command(ctx, name)
        if cmd is not None and not cmd.hidden:
            assert f"\n## jiaozifuse {name}\n" in text, name
