"""Archive runs and restore: CARs checked by independent implementations, the UnixFS
DAG against the commit's files, round trips through CARs alone, and bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from jiaozifuse import archive as arc
from jiaozifuse.car import CarError, cid_str, iter_car
from jiaozifuse.commp import commp_file, max_payload
from jiaozifuse.errors import Exists, JiaoziError
from jiaozifuse.repo import Repository

from .conftest import MiB, Sample, make_sample, tree_listing

TARGET = 2 * MiB  # small pieces, so that a run spans several CARs


def _cars(d: Path) -> list[Path]:
    return sorted(d.glob("*.car"))


def test_archive_layout(sample: Sample, tmp_path: Path, node) -> None:
    out = tmp_path / "out"
    res = arc.archive(sample.repo, "main", out, target_size=TARGET)
    pieces = res["pieces"]
    cars = _cars(out)
    assert len(pieces) == len(cars) >= 3
    roots = [res["root_cid"], res["meta_cid"]]
    # the head's root directory is the payload CID
    assert res["root_cid"] == pieces[0]["payload_cid"]
    seen: set[str] = set()
    theirs = {t["file"]: t for t in node("commp", *cars)}
    for p in pieces:
        car = out / p["car_file"]
        assert car.name == p["piece_cid"] + ".car"
        assert car.stat().st_size == p["car_size"] <= max_payload(TARGET)
        assert p["piece_size"] == 1 << (p["piece_size"].bit_length() - 1) <= TARGET
        t = theirs[str(car)]
        assert (t["v1"], t["v2"], t["size"]) == (p["piece_cid"], p["piece_cid_v2"],
                                                 p["piece_size"])
        doc = node("car", car)  # every block hash-checked, dag-pb/cbor canonical
        assert doc["roots"] == roots
        cids = [b["cid"] for b in doc["blocks"]]
        assert not seen & set(cids), "a block is in two pieces"
        seen |= set(cids)
        assert len(cids) == p["blocks"]
    assert res["meta_cid"] in seen and res["root_cid"] in seen
    # the deal manifest
    with open(out / arc.MANIFEST_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(arc.CSV_COLUMNS)
    assert [(r["piece_cid"], int(r["piece_size"]), int(r["car_size"]), r["filename"],
             r["payload_cid"]) for r in rows] == [
        (p["piece_cid"], p["piece_size"], p["car_size"], p["car_file"], p["payload_cid"])
        for p in pieces]
    # bookkeeping in the store
    st = arc.status(sample.repo)
    assert [p["piece_cid"] for p in st["pieces"]] == [p["piece_cid"] for p in pieces]
    assert st["counts"]["packed"] == len(pieces)
    assert st["refs"] == {"branch/main": sample.head.hex()}


def _walk_export(repo: Repository, ref: str, dest: Path) -> dict[str, dict]:
    repo.export(ref, dest)
    out = {}
    for rel, rec in tree_listing(dest).items():
        if rec[0] == "l":
            out[rel] = {"type": "symlink", "target": rec[1], "mtime": rec[2]}
        else:
            kind = "directory" if rec[4] is None else "file"
            out[rel] = {"type": kind, "mode": rec[1], "mtime": rec[2], "sha256": rec[4]}
    return out


def test_unixfs_dag_matches_commit(sample: Sample, tmp_path: Path, node) -> None:
    """ipfs-unixfs-exporter, walking the DAG across all CARs, sees the commit's files."""
    out = tmp_path / "out"
    res = arc.archive(sample.repo, "main", out, target_size=TARGET)
    listing = node("unixfs", res["root_cid"], *_cars(out))
    want = _walk_export(sample.repo, "main", tmp_path / "export")
    got = {e["path"]: e for e in listing if e["path"]}
    assert set(got) == set(want)
    for path, w in want.items():
        g = got[path]
        assert g["type"] == w["type"], path
        secs, nsecs = g["mtime"]
        assert secs * 10**9 + nsecs == w["mtime"], path
        if w["type"] == "symlink":
            assert g["target"] == w["target"]
        else:
            assert g["mode"] == w["mode"], path
        if w["type"] == "file":
            assert g["sha256"] == w["sha256"], path


def test_ipfs_car_unpack(tmp_path: Path, ipfs_car) -> None:
    """``ipfs-car unpack`` (the CLI, one CAR) rebuilds the commit's files byte for byte.

    ipfs-car refuses symlinks and keeps no modes, so this commit has none of those.
    """
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f.bin").write_bytes(os.urandom(3 * MiB + 1))
    (src / "top.txt").write_text("top\n")
    (src / "empty").write_bytes(b"")
    repo = Repository.init(tmp_path / "repo")
    try:
        repo.import_dir("main", src)
        repo.commit("main", "one")
        res = arc.archive(repo, "main", tmp_path / "out")
        (car,) = _cars(tmp_path / "out")
        roots = ipfs_car("roots", car)
        assert roots.stdout.split() == [res["root_cid"], res["meta_cid"]]
        un = ipfs_car("unpack", car, "--root", res["root_cid"], "--output", tmp_path / "un")
        assert un.returncode == 0, un.stderr
        for p in src.rglob("*"):
            q = tmp_path / "un" / p.relative_to(src)
            assert q.exists(), q
            if p.is_file():
                assert p.read_bytes() == q.read_bytes()
        assert len(list((tmp_path / "un").rglob("*"))) == len(list(src.rglob("*")))
    finally:
        repo.close()


def _export_all(repo: Repository, refs: list[str], dest: Path) -> dict[str, dict]:
    return {ref: tree_listing(_exported(repo, ref, dest / ref.replace("/", "_")))
            for ref in refs}


def _exported(repo: Repository, ref: str, dest: Path) -> Path:
    repo.export(ref, dest)
    return dest


def test_round_trip(sample: Sample, tmp_path: Path) -> None:
    """archive -> restore into an empty directory -> same commits, refs, bytes, metadata."""
    out = tmp_path / "out"
    arc.archive(sample.repo, "main", out, target_size=TARGET)
    arc.archive(sample.repo, "dev", out, target_size=TARGET)
    arc.archive(sample.repo, sample.tag, out, target_size=TARGET)
    (tmp_path / "new").mkdir()
    res = arc.restore(out, tmp_path / "new")
    assert res["refs"] == {"branch/main": sample.head.hex(), "branch/dev": sample.dev.hex(),
                           "tag/v1": sample.head.hex()}
    assert all(p["checked_against"] for p in res["pieces"])
    refs = ["main", "dev", "v1", sample.first.hex()]
    want = _export_all(sample.repo, refs, tmp_path / "want")
    with Repository.open(tmp_path / "new") as r2:
        assert r2.resolve("main") == sample.head and r2.resolve("dev") == sample.dev
        assert [c for c, _ in r2.log("main")] == [c for c, _ in sample.repo.log("main")]
        assert r2.get_commit(sample.first).meta_dict == {"run": "1"}
        got = _export_all(r2, refs, tmp_path / "got")
        from jiaozifuse.fsck import fsck

        assert fsck(r2)["ok"]
        # the sparse file's hole stays a hole (no chunk for it)
        e = r2.tree_entry(sample.head, "sparse")
        assert e is not None and e.size == 3 * MiB + 14
        # the restored branches are usable: commit on them
        (tmp_path / "more").mkdir()
        (tmp_path / "more" / "x").write_text("x")
        r2.import_dir("dev", tmp_path / "more")
        r2.commit("dev", "after restore")
    assert got == want
    assert want["main"]["README.md"][5] == (("user.origin", b"jiaozifuse-test"),)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new.restore-")]


def test_incremental_runs(sample: Sample, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = arc.archive(sample.repo, sample.first.hex(), out, target_size=TARGET)
    again = arc.archive(sample.repo, sample.first.hex(), out, target_size=TARGET)
    assert again["pieces"] == [] and "nothing new" in again["message"]
    second = arc.archive(sample.repo, "main", out, target_size=TARGET)
    # only what changed: the new 1 MiB file and a few small blocks
    assert MiB <= second["data_bytes"] < MiB + 64 * 1024
    assert second["car_bytes"] < first["car_bytes"] / 3
    # a new tag on an archived commit costs one small piece (metadata only)
    sample.repo.create_tag("v2", "main")
    tag = arc.archive(sample.repo, "v2", out, target_size=TARGET)
    assert tag["data_bytes"] == 0 and len(tag["pieces"]) == 1
    res = arc.restore(out, tmp_path / "new")
    assert res["runs"] == [1, 2, 3]
    assert res["refs"]["branch/main"] == sample.head.hex()
    assert res["refs"]["tag/v2"] == sample.head.hex()


def test_failed_piece_is_packed_again(sample: Sample, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = arc.archive(sample.repo, "main", out, target_size=TARGET)
    victim = res["pieces"][0]
    arc.set_state(sample.repo, victim["piece_cid"], "failed", {"reason": "deal expired"})
    (out / victim["car_file"]).unlink()
    again = arc.archive(sample.repo, "main", out, target_size=TARGET)
    assert again["pieces"], "the failed piece's blocks must be packed again"
    assert again["blocks"] >= victim["blocks"]
    st = arc.status(sample.repo)
    assert st["counts"]["failed"] == 1
    # the failed CAR is gone, yet the rest restores the repository
    res2 = arc.restore(out, tmp_path / "new")
    assert res2["refs"]["branch/main"] == sample.head.hex()
    with pytest.raises(JiaoziError, match="unknown piece state"):
        arc.set_state(sample.repo, victim["piece_cid"], "lost")


def _script(tmp_path: Path, body: str) -> list[str]:
    p = tmp_path / "onramp.py"
    p.write_text("import json, sys\npiece = json.loads(sys.stdin.readline())\n" + body)
    return [sys.executable, str(p)]


def test_command_onramp(sample: Sample, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    argv = _script(tmp_path, (
        f"open({str(log)!r}, 'a').write(json.dumps(piece) + '\\n')\n"
        "print('submitting', piece['piece_cid'])\n"
        "print(json.dumps({'state': 'active', 'deal_id': 'd-' + piece['piece_cid'][-6:]}))\n"))
    onramp = arc.CommandOnramp(argv, tmp_path / "out")
    res = arc.archive(sample.repo, "main", onramp, target_size=TARGET)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["piece_cid"] for c in calls] == [p["piece_cid"] for p in res["pieces"]]
    for c in calls:
        assert Path(c["car_path"]).is_file()
        assert {"piece_cid_v2", "piece_size", "payload_cid", "car_size"} <= set(c)
    st = arc.status(sample.repo)
    assert st["counts"]["active"] == len(res["pieces"])
    assert all(p["detail"]["deal_id"].startswith("d-") for p in st["pieces"])
    assert not (tmp_path / "out" / arc.MANIFEST_CSV).exists()


def test_command_onramp_failure(sample: Sample, tmp_path: Path) -> None:
    argv = _script(tmp_path, "sys.stderr.write('provider said no\\n')\nsys.exit(3)\n")
    onramp = arc.CommandOnramp(argv, tmp_path / "out")
    with pytest.raises(JiaoziError, match=r"failed at the command onramp.*provider said no"):
        arc.archive(sample.repo, "main", onramp, target_size=TARGET)
    st = arc.status(sample.repo)
    assert st["counts"]["failed"] == len(st["pieces"]) > 0
    assert st["pieces"][0]["detail"]["exit"] == 3
    # every block was given back: the next run packs everything again
    res = arc.archive(sample.repo, "main", tmp_path / "out2", target_size=TARGET)
    assert res["data_bytes"] > 5 * MiB
    with pytest.raises(JiaoziError, match="not found"):
        arc.CommandOnramp(["/no/such/onramp"], tmp_path / "x").check()


@pytest.fixture
def archived(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Sample]:
    base = tmp_path_factory.mktemp("archived")
    s = make_sample(base)
    arc.archive(s.repo, "main", base / "out", target_size=TARGET)
    s.repo.close()
    return base / "out", s


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_nothing_restored(tmp_path: Path) -> None:
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if ".restore-" in p.name]


def test_restore_truncated(archived: tuple[Path, Sample], tmp_path: Path) -> None:
    cars = _copy(archived[0], tmp_path / "cars")
    victim = _cars(cars)[1]
    victim.write_bytes(victim.read_bytes()[:-1000])
    with pytest.raises(CarError, match=rf"{victim.name} is truncated"):
        arc.restore(cars, tmp_path / "new")
    _assert_nothing_restored(tmp_path)


def test_restore_flipped_byte(archived: tuple[Path, Sample], tmp_path: Path) -> None:
    cars = _copy(archived[0], tmp_path / "cars")
    victim = _cars(cars)[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    victim.write_bytes(bytes(raw))
    with pytest.raises(CarError, match=rf"{victim.name} is corrupt: block \w+ at offset \d+ "
                                       "does not match its hash"):
        arc.restore(cars, tmp_path / "new")
    _assert_nothing_restored(tmp_path)


def test_restore_wrong_commitment(archived: tuple[Path, Sample], tmp_path: Path) -> None:
    """A CAR whose bytes are intact but whose piece CID (name or manifest) is not theirs."""
    cars = _copy(archived[0], tmp_path / "cars")
    a, b = _cars(cars)[:2]
    # swap two CARs' names: every block still verifies, the commitments do not
    tmp = a.with_suffix(".tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    with pytest.raises(CarError, match=r"piece commitment mismatch: the manifest\.csv row "
                                       r"says baga\w+, the CAR's bytes give baga\w+"):
        arc.restore(cars, tmp_path / "new")
    _assert_nothing_restored(tmp_path)
    # without the manifest, the file name is what is checked
    (cars / arc.MANIFEST_CSV).unlink()
    with pytest.raises(CarError, match="the file name says"):
        arc.restore(cars, tmp_path / "new")
    _assert_nothing_restored(tmp_path)


def test_restore_missing_car(archived: tuple[Path, Sample], tmp_path: Path) -> None:
    cars = _copy(archived[0], tmp_path / "cars")
    with open(cars / arc.MANIFEST_CSV, newline="") as f:
        pieces = list(csv.DictReader(f))
    (cars / pieces[-1]["filename"]).unlink()  # the run's last CAR: holds the metadata
    with pytest.raises(CarError, match=r"metadata block .* is missing"):
        arc.restore(cars, tmp_path / "new")
    _assert_nothing_restored(tmp_path)
    cars2 = _copy(archived[0], tmp_path / "cars2")
    (cars2 / pieces[0]["filename"]).unlink()
    with pytest.raises(CarError, match="missing"):
        arc.restore(cars2, tmp_path / "new")
    _assert_nothing_restored(tmp_path)


def test_restore_refuses_existing(archived: tuple[Path, Sample], tmp_path: Path) -> None:
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "x").write_text("x")
    with pytest.raises(Exists):
        arc.restore(archived[0], tmp_path / "new")


def test_car_roots_and_meta(archived: tuple[Path, Sample]) -> None:
    out, s = archived
    cars = _cars(out)
    roots = arc.car_roots(cars[0])
    assert all(arc.car_roots(c) == roots for c in cars)
    metas = []
    for car in cars:
        it = iter_car(car)
        next(it)
        metas += [b for b in it if cid_str(b.cid.raw) == roots[1]]
    assert len(metas) == 1
    import cbor2

    doc = cbor2.loads(metas[0].data)
    assert doc["t"] == "jiaozifuse/archive" and doc["refs"] == {"branch/main": s.head}
    assert doc["default_branch"] == "main" and doc["previous"] is None
    assert commp_file(cars[0]).cid_v1 == cars[0].stem


def test_restore_corrupt_header_without_names(archived: tuple[Path, Sample],
                                              tmp_path: Path) -> None:
    """CARs known by no piece CID (renamed, no manifest) still refuse a damaged header."""
    cars = _copy(archived[0], tmp_path / "cars")
    (cars / arc.MANIFEST_CSV).unlink()
    for i, c in enumerate(_cars(cars)):
        c.rename(cars / f"part{i}.car")
    victim = cars / "part0.car"
    raw = bytearray(victim.read_bytes())
    raw[30] ^= 0x04  # inside the first root CID of the header
    victim.write_bytes(bytes(raw))
    with pytest.raises(CarError, match=r"part0\.car: its header's root"):
        arc.restore(cars, tmp_path / "new")
    _assert_nothing_restored(tmp_path)
