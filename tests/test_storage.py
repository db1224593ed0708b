"""Storage round trips on local disk and on a real S3 API (moto server), seen also by boto3 and pyarrow."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from raydb.storage import NotFound, Storage, StorageError, is_s3, join, split_s3


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> tuple[Storage, str]:
    """``(storage, root URI)`` on local disk or in a fresh moto bucket."""
    if request.param == "local":
        return Storage(), str(tmp_path / "root")
    import boto3

    # conftest's s3_bucket names the bucket after the test id, whose "[s3]" is not a valid bucket name
    endpoint = request.getfixturevalue("s3_server")
    name = "raydb-store-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return Storage(endpoint), f"s3://{name}/root"


def test_uri_helpers() -> None:
    assert is_s3("s3://b/k") and not is_s3("/tmp/x")
    assert split_s3("s3://bucket/a/b") == ("bucket", "a/b")
    assert split_s3("s3://bucket") == ("bucket", "")
    assert join("s3://b/", "/x/", "", "y") == "s3://b/x/y"
    assert join("/tmp/a", "b") == "/tmp/a/b"
    with pytest.raises(StorageError):
        split_s3("/not/s3")


def test_bytes_and_json_round_trip(store) -> None:
    storage, root = store
    payload = bytes(range(256)) * 10
    assert storage.write_bytes(join(root, "a/b/blob.bin"), payload) is True
    assert storage.read_bytes(join(root, "a/b/blob.bin")) == payload
    obj = {"z": [1, 2.5, None], "a": {"nested": "ü"}}
    storage.write_json(join(root, "meta.json"), obj)
    assert storage.read_json(join(root, "meta.json")) == obj
    assert storage.read_json_or(join(root, "nope.json"), {"default": 1}) == {"default": 1}


def test_listing(store) -> None:
    storage, root = store
    for name in ["top.txt", "sub/one.txt", "sub/deeper/two.txt"]:
        storage.write_bytes(join(root, name), name.encode())
    assert storage.list(root) == ["sub/", "top.txt"]
    assert storage.list(root, recursive=True) == ["sub/deeper/two.txt", "sub/one.txt", "top.txt"]
    assert storage.list(join(root, "sub")) == ["deeper/", "one.txt"]
    assert storage.list(root, recursive=True, limit=1) == ["sub/deeper/two.txt"]
    assert storage.list(join(root, "missing")) == []


def test_content_ids_change_with_the_bytes_not_the_time(store) -> None:
    storage, root = store
    storage.write_bytes(join(root, "a.png"), b"one")
    storage.write_bytes(join(root, "sub/b.png"), b"two")
    first = storage.content_ids(root)
    assert [name for name, _ in first] == ["a.png", "sub/b.png"]
    assert len({cid for _, cid in first}) == 2
    storage.write_bytes(join(root, "a.png"), b"one")  # rewritten, same bytes
    assert storage.content_ids(root) == first
    storage.write_bytes(join(root, "a.png"), b"uno")  # same name and size, new bytes
    changed = storage.content_ids(root)
    assert changed[0] != first[0] and changed[1] == first[1]
    assert storage.content_ids(join(root, "missing")) == []


def test_exists_and_delete(store) -> None:
    storage, root = store
    uri = join(root, "dir/file.txt")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"x")
    storage.write_bytes(join(root, "dir/other.txt"), b"y")
    assert storage.exists(uri)
    assert storage.exists(join(root, "dir"))  # a folder / prefix exists too
    storage.delete(uri)
    assert not storage.exists(uri)
    assert storage.list(join(root, "dir")) == ["other.txt"]
    storage.delete(join(root, "dir"), recursive=True)
    assert not storage.exists(join(root, "dir"))
    assert storage.list(root, recursive=True) == []
    storage.delete(join(root, "never-there"))  # deleting nothing is not an error


def test_overwrite_replaces_content(store) -> None:
    storage, root = store
    uri = join(root, "state.json")
    storage.write_json(uri, {"version": 1, "pad": "x" * 5000})
    storage.write_json(uri, {"version": 2})
    assert storage.read_json(uri) == {"version": 2}
    assert storage.list(root) == ["state.json"]


def test_local_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    storage = Storage()
    target = tmp_path / "d" / "file.bin"
    storage.write_bytes(str(target), b"old" * 1000)
    inode_before = target.stat().st_ino
    storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"new"
    # os.replace swaps in a new inode: a reader holding the old file sees all of the old content
    assert target.stat().st_ino != inode_before
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]
    assert storage.write_bytes(str(target), b"again", if_absent=True) is False
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_if_absent(store) -> None:
    storage, root = store
    uri = join(root, "claims/v0001")
    assert storage.write_bytes(uri, b"first", if_absent=True) is True
    assert storage.write_bytes(uri, b"second", if_absent=True) is False
    assert storage.read_bytes(uri) == b"first"
    assert storage.write_json(join(root, "c.json"), {"a": 1}, if_absent=True) is True
    assert storage.write_json(join(root, "c.json"), {"a": 2}, if_absent=True) is False
    assert storage.read_json(join(root, "c.json")) == {"a": 1}
    # a plain write still overwrites
    assert storage.write_bytes(uri, b"third") is True
    assert storage.read_bytes(uri) == b"third"


def test_missing_key_raises_not_found_naming_uri(store) -> None:
    storage, root = store
    uri = join(root, "nothing/here.bin")
    with pytest.raises(NotFound) as info:
        storage.read_bytes(uri)
    assert uri in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(NotFound, match="here.json"):
        storage.read_json(join(root, "nothing/here.json"))


def test_invalid_json_is_a_storage_error(store) -> None:
    storage, root = store
    uri = join(root, "broken.json")
    storage.write_bytes(uri, b"{not json")
    with pytest.raises(StorageError, match="broken.json"):
        storage.read_json(uri)


def test_upload_and_download_dir(store, tmp_path: Path) -> None:
    storage, root = store
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "unet" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    storage.upload_dir(src, join(root, "model"))
    assert storage.list(join(root, "model"), recursive=True) == ["model_index.json", "unet/weights.bin"]
    out = storage.download_dir(join(root, "model"), tmp_path / "dst")
    assert (out / "unet" / "weights.bin").read_bytes() == b"\x00\x01" * 100
    with pytest.raises(NotFound, match="empty-prefix"):
        storage.download_dir(join(root, "empty-prefix"), tmp_path / "dst2")


def test_s3_data_is_plain_s3_for_boto3(s3_bucket) -> None:
    import boto3

    endpoint, bucket = s3_bucket
    storage = Storage(endpoint)
    storage.write_bytes(join(bucket, "x/y.bin"), b"via storage")
    client = boto3.client("s3", endpoint_url=endpoint)
    name, _ = split_s3(bucket)
    assert client.get_object(Bucket=name, Key="x/y.bin")["Body"].read() == b"via storage"
    client.put_object(Bucket=name, Key="x/z.bin", Body=b"via boto3")
    assert storage.read_bytes(join(bucket, "x/z.bin")) == b"via boto3"
    assert storage.list(join(bucket, "x")) == ["y.bin", "z.bin"]


def test_s3_endpoint_from_environment(s3_bucket, monkeypatch) -> None:
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    storage = Storage()
    assert storage.endpoint_url == endpoint
    storage.write_bytes(join(bucket, "env.txt"), b"ok")
    assert Storage(endpoint).read_bytes(join(bucket, "env.txt")) == b"ok"


def test_s3_through_pyarrow(s3_bucket) -> None:
    import pyarrow.fs as pafs

    endpoint, bucket = s3_bucket
    storage = Storage(endpoint)
    storage.write_bytes(join(bucket, "arrow/from-storage.bin"), b"written by Storage")
    fs, path = storage.arrow_fs(join(bucket, "arrow/from-storage.bin"))
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == f"{split_s3(bucket)[0]}/arrow/from-storage.bin"
    with fs.open_input_stream(path) as fh:
        assert fh.read() == b"written by Storage"
    fs, path = storage.arrow_fs(join(bucket, "arrow/from-arrow.bin"))
    with fs.open_output_stream(path) as fh:
        fh.write(b"written by pyarrow")
    assert storage.read_bytes(join(bucket, "arrow/from-arrow.bin")) == b"written by pyarrow"
    fs, folder = storage.arrow_fs(join(bucket, "arrow"))
    infos = fs.get_file_info(pafs.FileSelector(folder))
    assert sorted(i.base_name for i in infos) == ["from-arrow.bin", "from-storage.bin"]


def test_local_arrow_fs(tmp_path: Path) -> None:
    import pyarrow.fs as pafs

    Storage().write_bytes(str(tmp_path / "f.bin"), b"local")
    fs, path = Storage().arrow_fs(str(tmp_path / "f.bin"))
    assert isinstance(fs, pafs.LocalFileSystem)
    with fs.open_input_stream(path) as fh:
        assert fh.read() == b"local"


def test_errors_never_contain_the_secret(s3_bucket) -> None:
    endpoint, bucket = s3_bucket
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    storage = Storage(endpoint)
    messages = []
    for call in (
        lambda: storage.read_bytes("s3://no-such-bucket-raydb/key"),
        lambda: storage.read_bytes(join(bucket, "missing")),
        lambda: storage.write_bytes("s3://no-such-bucket-raydb/key", b"x"),
        lambda: storage.list("s3://no-such-bucket-raydb/prefix"),
    ):
        with pytest.raises(StorageError) as info:
            call()
        messages.append(str(info.value))
    for message in messages:
        assert secret not in message
        assert "s3://" in message  # each names the URI it failed on


def test_s3_recursive_delete_at_bucket_root(s3_bucket) -> None:
    endpoint, bucket = s3_bucket
    storage = Storage(endpoint)
    for name in ["a.txt", "d/b.txt"]:
        storage.write_bytes(join(bucket, name), b"x")
    assert storage.exists(bucket)
    storage.delete(bucket, recursive=True)
    assert storage.list(bucket, recursive=True) == []


def test_recursive_delete_of_a_single_file(store) -> None:
    storage, root = store
    uri = join(root, "single.bin")
    storage.write_bytes(uri, b"x")
    storage.delete(uri, recursive=True)
    assert not storage.exists(uri)


def test_download_dir_refuses_keys_that_leave_the_folder(s3_bucket, tmp_path: Path) -> None:
    """A ``../`` S3 key (legal in S3) must never write outside the target folder (issue 18)."""
    import boto3

    endpoint, bucket = s3_bucket
    name, _ = split_s3(bucket)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.put_object(Bucket=name, Key="model/model_index.json", Body=b"{}")
    client.put_object(Bucket=name, Key="model/sub/../../../escaped.txt", Body=b"pwned")
    storage = Storage(endpoint)
    assert "sub/../../../escaped.txt" in storage.list(join(bucket, "model"), recursive=True)
    target = tmp_path / "deep" / "dst"
    with pytest.raises(StorageError, match=r"escaped\.txt.*leaves the target folder"):
        storage.download_dir(join(bucket, "model"), target)
    assert not list(tmp_path.rglob("escaped.txt")) and not target.exists()  # nothing written at all


def test_compare_and_swap(store) -> None:
    storage, root = store
    uri = join(root, "latest.json")
    storage.write_bytes(uri, b"one")
    data, tag = storage.read_tagged(uri)
    assert data == b"one"
    assert storage.write_bytes(uri, b"two", if_match=tag) is True
    assert storage.write_bytes(uri, b"three", if_match=tag) is False  # someone moved it since
    assert storage.read_bytes(uri) == b"two"
    assert storage.write_bytes(join(root, "missing"), b"x", if_match=tag) is False
    assert storage.list(root) == ["latest.json"]  # the local lock file is hidden
    with pytest.raises(NotFound):
        storage.read_tagged(join(root, "missing"))
