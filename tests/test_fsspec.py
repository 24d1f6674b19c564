"""The fsspec filesystem (jiaozi://REF/path): pandas, PyArrow and Hugging Face datasets
read versions of a dataset through it, without a mount."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

fsspec = pytest.importorskip("fsspec")
pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import jiaozifuse.api as jz  # noqa: E402
from jiaozifuse.fsspec_fs import JiaoziFile, JiaoziFileSystem  # noqa: E402
from jiaozifuse.repo import Repository  # noqa: E402


def _frame(n: int = 5000) -> pd.DataFrame:
    return pd.DataFrame({"id": range(n), "label": [f"item-{i % 97}" for i in range(n)],
                         "score": [i / 7 for i in range(n)]})


@pytest.fixture
def data(tmp_path: Path):
    """A repository with a CSV and a Parquet file committed, then changed on main."""
    path = tmp_path / "repo"
    Repository.init(path).close()
    df = _frame()
    with jz.open(path) as r:
        r.write("main", "data/train.csv", df.to_csv(index=False).encode())
        buf = io.BytesIO()
        df.to_parquet(buf, row_group_size=500)
        r.write("main", "data/train.parquet", buf.getvalue())
        for i, part in enumerate((df.iloc[:2000], df.iloc[2000:])):
            b = io.BytesIO()
            part.to_parquet(b)
            r.write("main", f"data/parts/part-{i}.parquet", b.getvalue())
        c = r.commit("main", "v1")
        r.create_tag("v1")
        r.write("main", "data/train.csv", b"id,label,score\n0,changed,0\n")
    fs = fsspec.filesystem("jiaozi", repo=str(path))
    return {"path": str(path), "commit": c.id, "df": df, "fs": fs,
            "opts": {"repo": str(path)}}


def test_pandas_reads_a_csv_at_a_commit(data) -> None:
    for ref in (data["commit"], data["commit"][:10], "v1"):
        got = pd.read_csv(f"jiaozi://{ref}/data/train.csv", storage_options=data["opts"])
        pd.testing.assert_frame_equal(got, data["df"])
    # The branch is its current state (the uncommitted change).
    now = pd.read_csv("jiaozi://main/data/train.csv", storage_options=data["opts"])
    assert list(now["label"]) == ["changed"]


def test_pyarrow_reads_parquet_at_a_commit(data) -> None:
    fs = data["fs"]
    t = pq.read_table(f"{data['commit']}/data/train.parquet", filesystem=fs)
    pd.testing.assert_frame_equal(t.to_pandas(), data["df"])
    got = pd.read_parquet("jiaozi://v1/data/train.parquet", storage_options=data["opts"])
    pd.testing.assert_frame_equal(got, data["df"])
    # A dataset over the directory (discovery goes through ls/info).
    ds = pa.dataset.dataset(f"{data['commit']}/data/parts", filesystem=fs, format="parquet")
    assert ds.count_rows() == len(data["df"])
    got = ds.to_table().to_pandas().sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, data["df"])


def test_parquet_reads_are_random_access(data, monkeypatch) -> None:
    """One row group of one column fetches a small part of the file, not all of it."""
    fetched: list[tuple[int, int]] = []
    orig = JiaoziFile._fetch_range

    def spy(self, start: int, end: int) -> bytes:
        fetched.append((start, end))
        return orig(self, start, end)

    monkeypatch.setattr(JiaoziFile, "_fetch_range", spy)
    fs = data["fs"]
    df = _frame(200_000)
    buf = io.BytesIO()
    df.to_parquet(buf, row_group_size=20_000)
    fs.pipe_file("main/big.parquet", buf.getvalue())
    path = "main/big.parquet"
    size = fs.size(path)
    fetched.clear()
    with fs.open(path, "rb", cache_type="none") as f:
        pf = pq.ParquetFile(f)
        assert pf.num_row_groups == 10
        col = pf.read_row_group(7, columns=["score"]).column("score").to_pylist()
    assert col == list(df["score"][140_000:160_000])
    total = sum(e - s for s, e in fetched)
    assert fetched[0][1] == size  # the footer first
    assert total < size / 2, (total, size)


def test_ls_info_cat_and_ukey(data) -> None:
    fs = data["fs"]
    c = data["commit"]
    assert fs.ls("", detail=False) == ["main", "v1"]
    assert fs.ls(f"jiaozi://{c}/data", detail=False) == [
        f"{c}/data/parts", f"{c}/data/train.csv", f"{c}/data/train.parquet"]
    info = fs.info(f"{c}/data/train.csv")
    assert info["type"] == "file" and info["commit"] == c
    assert info["size"] == len(data["df"].to_csv(index=False).encode())
    assert fs.info(f"{c}/data")["type"] == "directory"
    assert fs.info(c)["type"] == "directory"
    assert fs.isdir("main/data") and fs.isfile("main/data/train.csv")
    assert not fs.exists(f"{c}/data/nope")
    with pytest.raises(FileNotFoundError):
        fs.info(f"{c}/data/nope")
    with pytest.raises(FileNotFoundError):
        fs.cat_file("unknown-ref/x")
    raw = data["df"].to_csv(index=False).encode()
    assert fs.cat_file(f"{c}/data/train.csv") == raw
    assert fs.cat_file(f"{c}/data/train.csv", 3, 20) == raw[3:20]
    assert fs.cat_file(f"{c}/data/train.csv", -10) == raw[-10:]
    assert fs.cat_file(f"{c}/data/train.csv", 5, -5) == raw[5:-5]
    assert fs.ukey(f"{c}/data/train.csv") == fs.ukey("v1/data/train.csv") == info["id"]
    assert fs.ukey("main/data/train.csv") != info["id"]
    assert fs.modified(f"{c}/data/train.csv").year >= 2024
    assert sorted(fs.find(c)) == [f"{c}/data/parts/part-0.parquet",
                                  f"{c}/data/parts/part-1.parquet",
                                  f"{c}/data/train.csv", f"{c}/data/train.parquet"]
    assert fs.glob(f"{c}/data/*.parquet") == [f"{c}/data/train.parquet"]


def test_writes_go_to_branches_only(data) -> None:
    fs = data["fs"]
    df = data["df"].head(10)
    df.to_csv("jiaozi://main/out/small.csv", storage_options=data["opts"], index=False)
    pd.testing.assert_frame_equal(
        pd.read_csv("jiaozi://main/out/small.csv", storage_options=data["opts"]), df)
    fs.pipe_file("main/out/p.bin", b"piped")
    assert fs.cat_file("main/out/p.bin") == b"piped"
    with fs.open("main/out/empty", "wb"):
        pass
    assert fs.cat_file("main/out/empty") == b""
    with pytest.raises(FileExistsError):
        fs.open("main/out/p.bin", "xb")
    for target in (f"{data['commit']}/x.csv", "v1/x.csv"):
        with pytest.raises(OSError) as exc:
            df.to_csv(f"jiaozi://{target}", storage_options=data["opts"])
        assert exc.value.errno == 30  # EROFS
    with jz.open(data["path"]) as r:
        assert {c.path for c in r.status()} >= {"out/small.csv", "out/p.bin", "out/empty"}
        r.commit("main", "outputs")
        assert r.read("main~0", "out/p.bin") == b"piped"


def test_repo_from_the_environment(data, monkeypatch) -> None:
    monkeypatch.setenv("JIAOZIFUSE_REPO", data["path"])
    fs = JiaoziFileSystem()
    assert fs.cat_file("v1/data/train.csv")[:8] == b"id,label"
    monkeypatch.delenv("JIAOZIFUSE_REPO")
    with pytest.raises(ValueError, match="storage_options"):
        JiaoziFileSystem(skip_instance_cache=True)


def test_filecache_chaining(data, tmp_path: Path) -> None:
    url = f"filecache::jiaozi://{data['commit']}/data/train.csv"
    with fsspec.open(url, "rb", jiaozi=data["opts"],
                     filecache={"cache_storage": str(tmp_path / "cache")}) as f:
        assert f.read(8) == b"id,label"
    assert any((tmp_path / "cache").iterdir())


def test_entry_point_registration() -> None:
    """`fsspec.filesystem("jiaozi")` works without importing this module first."""
    from importlib.metadata import entry_points

    if not any(ep.name == "jiaozi" for ep in entry_points(group="fsspec.specs")):
        pytest.skip("the fsspec.specs entry point is not installed (pyproject.toml)")
    code = ("import fsspec; cls = fsspec.get_filesystem_class('jiaozi'); "
            "print(cls.__module__ + '.' + cls.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "jiaozifuse.fsspec_fs.JiaoziFileSystem"


def test_huggingface_datasets_offline(data, tmp_path: Path, monkeypatch) -> None:
    """datasets loads Parquet and CSV at a commit; no socket may be opened meanwhile."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    c = data["commit"]
    for fmt, name in (("parquet", "train.parquet"), ("csv", "train.csv")):
        ds = datasets.load_dataset(fmt, data_files=f"jiaozi://{c}/data/{name}",
                                   storage_options=data["opts"], split="train",
                                   cache_dir=str(tmp_path / "cache"))
        assert ds.num_rows == len(data["df"])
        assert ds[3]["label"] == "item-3"


def test_instances_are_cached_per_repository(data, tmp_path: Path) -> None:
    a = fsspec.filesystem("jiaozi", repo=data["path"])
    assert a is data["fs"]
    other = tmp_path / "other"
    Repository.init(other).close()
    b = fsspec.filesystem("jiaozi", repo=str(other))
    assert b is not a and b.ls("", detail=False) == ["main"]
    assert os.path.samefile(b.repo.path, other)
