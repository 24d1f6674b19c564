"""Remote gc racing a writer, with the interleaving forced: the writer rescues
and pushes while the gc's second step runs, after the gc has read the refs and
before it deletes."""

from __future__ import annotations

import json

from mount.conftest import jz

from jiaozifuse import gc
from jiaozifuse.repo import Repository
from remote.test_gc import (
    drop_tmp,
    export_ok,
    lone_manifest_pack,
    opack_ids,
    packs,
    repo_with_keep,
    set_grace,
)


def test_a_rescue_during_the_second_gc_step_survives_it(tmp_path, bucket, monkeypatch) -> None:
    """B's rescue of a condemned object pack that holds exactly what it rescues
    (here one manifest) must go to a pack of a new name: the gc, which read the
    refs before B pushed, deletes the condemned pack by name."""
    s3, name = bucket
    env = s3.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    a, keep, shared, lone, manifest = lone_manifest_pack(tmp_path, s3, name)
    lone_hex = lone.removeprefix("repo/packs/").removesuffix(".opack")
    drop_tmp(tmp_path, s3, name, a)
    set_grace(a, 0)
    r1 = json.loads(jz("gc", "--remote", "--json", "--repo", str(a), env=env).stdout)
    assert lone_hex in r1["remote"]["condemned"]

    b = tmp_path / "b"
    jz("clone", f"s3://{name}/repo", str(b), env=env)  # 'located': the manifest is in lone
    b_src = tmp_path / "b-src"
    b_src.mkdir()
    (b_src / "copy.bin").write_bytes(shared)
    jz("import", str(b_src), "--repo", str(b), env=env)

    # the second step, in this process; B commits, rescues and pushes just
    # before the gc's first delete, when the gc's view of the refs is taken
    pushed = []
    real_collect = gc.collect_remote

    def collect(repo, dry_run=False, now=None):
        real_delete = repo.remote.delete

        def delete(key: str) -> None:
            if not pushed:
                jz("commit", "-m", "reuse", "--wait", "--repo", str(b), env=env)
                pushed.append(key)
            real_delete(key)

        monkeypatch.setattr(repo.remote, "delete", delete)
        return real_collect(repo, dry_run, now)

    with Repository.open(a) as repo:
        r2 = collect(repo)
    assert pushed, "the second step deletes something"
    assert lone_hex in r2["deleted"], "the condemned pack, unreachable in the gc's view, goes"
    assert any(manifest in ids for ids in opack_ids(s3, name).values()), \
        "B's rescue of the manifest went into the pack being deleted"
    export_ok(tmp_path, s3, name, {"copy.bin": shared, "keep.bin": keep})


def test_a_pack_whose_copy_we_located_is_gone_is_kept(tmp_path, bucket) -> None:
    """The store's 'located' names one pack per chunk; when that copy was
    deleted by another machine's gc (whose view named this pack instead),
    this pack holds the only copy and must not be condemned for having no
    'located' entry."""
    s3, name = bucket
    env = s3.env()
    a, keep = repo_with_keep(tmp_path, s3, name)
    client = s3.client()
    (pack,) = [k for k in packs(s3, name) if k.endswith(".pack")]
    # a second copy of the chunk pack under another name (as two uploads of the
    # same chunks make); our fetch learns it and 'located' moves to it
    dup = "repo/packs/" + "f" * 64
    for ext in (".pack", ".idx"):
        client.copy_object(Bucket=name, Key=dup + ext,
                           CopySource={"Bucket": name, "Key": pack.removesuffix(".pack") + ext})
    jz("fetch", "--repo", str(a), env=env)
    # another machine's gc, whose 'located' named the first copy, deleted the second
    for ext in (".pack", ".idx"):
        client.delete_object(Bucket=name, Key=dup + ext)
    set_grace(a, 0)
    for _ in range(3):
        r = json.loads(jz("gc", "--remote", "--json", "--repo", str(a), env=env).stdout)
        assert pack.removeprefix("repo/packs/").removesuffix(".pack") not in (
            r["remote"]["condemned"] + r["remote"]["deleted"])
    assert pack in packs(s3, name)
    export_ok(tmp_path, s3, name, {"keep.bin": keep})
    # and A's 'located' names the copy that is left
    with Repository.open(a) as repo, repo.store.read() as r:
        where = {bytes(v[:32]).hex() for _, v in r.prefix("located", b"")
                 if bytes(v[44:45]) == b"C"}
    assert where == {pack.removeprefix("repo/packs/").removesuffix(".pack")}
