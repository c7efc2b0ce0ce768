"""Manifest parsing, name rules, the ACL encoding and the compression decision: pure logic."""

from __future__ import annotations

import copy
import json
import os
import tempfile

import pytest

from slurm_mm.errors import ImageCorrupt, UnsafePath
from slurm_mm.store import FileEntry, Manifest, acl, compression
from slurm_mm.store.safe_fs import check_name

SHA = "a" * 64


def manifest_dict() -> dict:
    return {
        "format_version": 1, "job_id": "1234_7", "epoch": 2, "uid": 1001, "gid": 1001, "node": "n2",
        "created": 1700000000.5, "trigger": "preempt",
        "files": [
            {"name": "core-1.img", "size": 10, "stored_size": 7, "sha256": SHA, "compressed": True},
            {"name": "pages-1.img", "size": 4096, "stored_size": 4096, "sha256": "b" * 64, "compressed": False},
        ],
        "gpu": {"count": 1, "model": "H100"}, "criu_version": "4.2.1", "extra": {"pid": 4242},
    }


def test_manifest_round_trips_through_json():
    m = Manifest.from_dict(manifest_dict())
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert again.files[0] == FileEntry("core-1.img", 10, 7, SHA, True)
    assert again.files[0].stored_name == "core-1.img.zst"
    assert again.files[1].stored_name == "pages-1.img.raw"
    assert again.total_size == 4106 and again.stored_size == 4103


def _with(path: str, value):
    """manifest_dict() with the field at dotted `path` set (or deleted with value=DELETE)."""
    data = copy.deepcopy(manifest_dict())
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    key = int(last) if last.isdigit() else last
    if value is DELETE:
        del target[key]
    else:
        target[key] = value
    return json.dumps(data)


DELETE = object()

HOSTILE = [
    # (manifest text, a piece of the message that names the bad value)
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not an object"),
    ('{"epoch": 1, "epoch": 2}', "duplicate key 'epoch'"),
    (json.dumps(manifest_dict()).replace('"epoch": 2', '"epoch": NaN'), "NaN"),
    (b"\xff\xfe{}", "not UTF-8"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    (_with("format_version", 3), "format_version 3 is not one of 1, 2"),
    (_with("format_version", 2), "manifest lacks 'dirs'"),
    (_with("format_version", "1"), "format_version '1' is not an integer"),
    (_with("job_id", "../etc"), "contains '/'"),
    (_with("epoch", "2"), "epoch '2' is not an integer"),
    (_with("epoch", True), "epoch True is not an integer"),
    (_with("epoch", -1), "epoch -1 is out of range"),
    (_with("uid", 2**40), "uid 1099511627776 is out of range"),
    (_with("trigger", "whenever"), "trigger 'whenever' is not one of"),
    (_with("node", "n1\nn2"), "node 'n1\\nn2'"),
    (_with("created", "yesterday"), "created 'yesterday'"),
    (_with("gpu", [1]), "gpu [1] is not an object"),
    (_with("extra", None), "extra None is not an object"),
    (_with("files", {}), "files {} is not a list"),
    (_with("criu_version", DELETE), "lacks 'criu_version'"),
    (_with("surprise", 1), "unknown field 'surprise'"),
    (_with("files.0.name", "a/b"), "'a/b' contains '/'"),
    (_with("files.0.name", ".."), "'..' is a '..' component"),
    (_with("files.0.name", "/etc/shadow"), "'/etc/shadow' is an absolute path"),
    (_with("files.0.name", ".hidden"), "'.hidden' is empty, too long, starts with '.'"),
    (_with("files.0.name", 7), "7 is not a string"),
    (_with("files.0.size", 2**60), "files[0].size 1152921504606846976 is out of range"),
    (_with("files.0.size", -5), "files[0].size -5 is out of range"),
    (_with("files.0.stored_size", 1.5), "files[0].stored_size 1.5 is not an integer"),
    (_with("files.0.sha256", "ZZ"), "files[0].sha256 'ZZ' is not 64 lowercase hex"),
    (_with("files.0.compressed", "yes"), "files[0].compressed 'yes' is not true or false"),
    (_with("files.0.extra_key", 1), "files[0] has unknown field 'extra_key'"),
    (_with("files.1.stored_size", 1), "stored_size 1 differs from size 4096 for a raw file"),
    (_with("files.1.name", "core-1.img"), "'core-1.img' is listed twice"),
    (_with("files.0", "core"), "files[0] is 'core', not an object"),
]


@pytest.mark.parametrize("text, needle", HOSTILE, ids=[n for _, n in HOSTILE])
def test_hostile_manifest_is_image_corrupt_with_one_line_naming_value(text, needle):
    with pytest.raises(ImageCorrupt) as info:
        Manifest.from_json(text, source="/ckpt/12/ckpt-000001/manifest.json")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("/ckpt/12/ckpt-000001/manifest.json: ")
    assert needle in message
    assert len(message) < 300


def test_huge_value_in_manifest_keeps_message_short():
    with pytest.raises(ImageCorrupt) as info:
        Manifest.from_json(_with("node", "x" * 100000))
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("job_id", ["12", "1234_7", "1234+1", "a.b-c"])
def test_slurm_job_ids_are_accepted(job_id):
    assert check_name(job_id, kind="job id") == job_id


@pytest.mark.parametrize("job_id, needle", [
    ("..", "'..' component"), (".", "'.' component"), ("../12", "contains '/'"), ("/etc", "absolute path"),
    ("12/..", "contains '/'"), (".lock", "starts with '.'"), ("", "empty"), ("1 2", "characters outside"),
    ("x" * 200, "too long"), (12, "not a string"),
])
def test_bad_job_ids_are_refused_naming_them(job_id, needle):
    with pytest.raises(UnsafePath) as info:
        check_name(job_id, kind="job id")
    assert needle in str(info.value)
    assert str(info.value).startswith("job id ")


def test_acl_pack_matches_kernel_layout_and_round_trips():
    blob = acl.owner_read_acl(1234, directory=True)
    # u32 version 2, then (u16 tag, u16 perm, u32 id) sorted by tag, little endian
    assert blob.hex() == (
        "02000000"
        "01000700ffffffff"   # USER_OBJ rwx
        "02000500d2040000"   # USER 1234 r-x
        "04000500ffffffff"   # GROUP_OBJ r-x
        "10000500ffffffff"   # MASK r-x
        "20000000ffffffff")  # OTHER ---
    assert acl.unpack(blob)[1] == (acl.USER, 5, 1234)
    file_blob = acl.owner_read_acl(1234, directory=False)
    assert (acl.USER, acl.READ, 1234) in acl.unpack(file_blob)
    with pytest.raises(ValueError):
        acl.unpack(blob[:-1])


@pytest.mark.skipif(os.geteuid() != 0, reason="setting another user's ACL entry needs root")
def test_kernel_accepts_the_acl_and_reads_it_back():
    with tempfile.NamedTemporaryFile(dir="/tmp") as f:
        assert acl.grant_owner_read(f.fileno(), 4321, 4321, directory=False) is True
        assert acl.named_users(f.fileno()) == [4321]
        assert oct(os.fstat(f.fileno()).st_mode & 0o777) == "0o640"


def test_compression_pays_only_for_compressible_data():
    with tempfile.TemporaryFile() as zeros, tempfile.TemporaryFile() as noise, tempfile.TemporaryFile() as empty:
        zeros.write(bytes(1 << 20))
        noise.write(os.urandom(1 << 20))
        zeros.flush()
        noise.flush()
        assert compression.worth_compressing(zeros.fileno(), 3) is True
        assert compression.worth_compressing(noise.fileno(), 3) is False
        assert compression.worth_compressing(empty.fileno(), 3) is False


def test_decision_samples_across_the_file_not_just_its_start():
    # A CRIU pages file can start with compressible pages and be random after that (GPU
    # state): slices across the file decide, still without a full compression pass.
    with tempfile.TemporaryFile() as f:
        f.write(bytes(2 << 20) + os.urandom(62 << 20))
        f.flush()
        assert compression.worth_compressing(f.fileno(), 3) is False
    with tempfile.TemporaryFile() as f:
        f.write(os.urandom(2 << 20) + bytes(62 << 20))
        f.flush()
        assert compression.worth_compressing(f.fileno(), 3) is True


# ---------------------------------------------------------------------------- format 2

H = "c" * 32


def manifest_v2() -> dict:
    data = manifest_dict()
    data.update(format_version=2, hash="xxh3-128", dirs=["files", "files/tmp"])
    data["files"] = [
        {"name": "pages-1.img", "size": 150000, "stored_size": 70000, "chunk_size": 65536,
         "chunks": [[30000, "z", H], [30000, "z", H], [10000, "z", H]]},
        {"name": "files/tmp/input", "size": 70000, "stored_size": 70000, "chunk_size": 65536,
         "chunks": [[65536, "r", H], [4464, "r", H]]},
    ]
    return data


def _v2(path: str, value) -> str:
    data = copy.deepcopy(manifest_v2())
    *parents, last = path.split(".")
    target = data
    for key in parents:
        target = target[int(key)] if key.isdigit() else target[key]
    target[int(last) if last.isdigit() else last] = value
    return json.dumps(data)


def test_manifest_of_format_2_round_trips_through_json():
    m = Manifest.from_dict(manifest_v2())
    assert Manifest.from_json(m.to_json()) == m
    assert m.dirs == ("files", "files/tmp")
    pages, nested = m.files
    assert pages.stored_name == "pages-1.img.zst" and nested.stored_name == "files/tmp/input.raw"
    assert [s[:3] for s in pages.chunk_spans()] == [(0, 0, 0), (1, 65536, 30000), (2, 131072, 60000)]
    assert pages.raw_length(2) == 150000 - 131072


HOSTILE_V2 = [
    (_v2("hash", "sha1"), "hash 'sha1' is not xxh3-128"),
    (_v2("files.0.chunks", [[30000, "z", H]]), "files[0].chunks is not a list of 3 chunks"),
    (_v2("files.0.chunk_size", 1000), "files[0].chunk_size 1000 is out of range"),
    (_v2("files.0.chunks.1", [30000, "x", H]), "files[0].chunks[1] kind 'x'"),
    (_v2("files.0.chunks.1", [30000, "z", "C" * 32]), "files[0].chunks[1] hash 'CCCC"),
    (_v2("files.0.chunks.1", [10 ** 9, "z", H]), "files[0].chunks[1] stored size 1000000000 is not in"),
    (_v2("files.0.chunks.1", [30000, "r", H]), "files[0].chunks[1] is raw but stores 30000 of its 65536"),
    (_v2("files.0.chunks.1", "30000"), "is not [stored_size, 'z'|'r', hash]"),
    (_v2("files.0.stored_size", 5), "files[0].stored_size 5 is not the sum of its chunks"),
    (_v2("files.1.chunks.1", [4464, "z", H]), "files[1] mixes raw and zstd chunks"),
    (_v2("files.1.name", "files/../../etc/passwd"), "'..' component"),
    (_v2("files.1.name", "files//input"), "empty"),
    (_v2("files.1.name", "/etc/passwd"), "empty"),
    (_v2("files.1.name", "other/input"), "'other/input' is in a directory not listed in dirs"),
    (_v2("files.1.name", "files/tmp"), "has the name of a directory"),
    (_v2("dirs", ["files/tmp", "files"]), "dirs[0] 'files/tmp' comes before its parent"),
    (_v2("dirs", ["files", "files", "files/tmp"]), "directory 'files' is listed twice"),
    (_v2("dirs", ["files", "files/tmp", "a/" * 20 + "b"]), "more than 16 directories deep"),
    (_v2("dirs", "files"), "dirs 'files' is not a list"),
]


@pytest.mark.parametrize("text, needle", HOSTILE_V2, ids=[n for _, n in HOSTILE_V2])
def test_hostile_manifest_of_format_2_is_image_corrupt_naming_the_value(text, needle):
    with pytest.raises(ImageCorrupt) as info:
        Manifest.from_json(text, source="m.json")
    message = str(info.value)
    assert "\n" not in message and message.startswith("m.json: ") and len(message) < 300
    assert needle in message
