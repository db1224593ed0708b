"""Storage round trips on local disk and on a real S3 API (moto server), seen also by boto3 and pyarrow."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from raydb.storage import NotFound, Storage, StorageError, is_s3, join, s3_segments, split_s3


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


# -- exact behaviour the mutants showed untested (issue 19) ----------------------------------------
def test_read_umask_reads_without_changing_it() -> None:
    """The module reads the umask once at import (os.umask is process-wide), so only a direct call
    can check the reader itself."""
    import raydb.storage as storage_module

    before = os.umask(0o027)
    try:
        assert storage_module._read_umask() == 0o027
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(before)


def test_local_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import raydb.storage as storage_module

    storage = Storage()
    for name, kw in (("plain", {}), ("absent", {"if_absent": True})):
        storage.write_bytes(str(tmp_path / name), b"x", **kw)
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~storage_module._UMASK


def test_local_swap_on_a_missing_deep_path_is_false(tmp_path: Path) -> None:
    assert Storage().write_bytes(str(tmp_path / "no" / "such" / "latest.json"), b"x", if_match="tag") is False


def test_if_absent_and_if_match_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^write_bytes: if_absent and if_match exclude each other$"):
        Storage().write_bytes(str(tmp_path / "f"), b"x", if_absent=True, if_match="t")
    assert not (tmp_path / "f").exists()


def test_local_sizes_and_hidden_files(tmp_path: Path) -> None:
    storage = Storage()
    storage.write_bytes(str(tmp_path / "r" / "a.bin"), b"abc")
    storage.write_bytes(str(tmp_path / "r" / "sub" / "b.bin"), b"hello")
    storage.write_bytes(str(tmp_path / "r" / ".hidden"), b"secret")
    assert storage.sizes(str(tmp_path / "r")) == [("a.bin", 3), ("sub/b.bin", 5)]


def test_download_dir_into_a_missing_folder_with_shared_subfolders(tmp_path: Path) -> None:
    storage = Storage()
    src = tmp_path / "src"
    files = {"a/b/one.bin": b"1", "a/b/two.bin": b"22", "a/three.bin": b"333", "top.bin": b"4"}
    for name, data in files.items():
        storage.write_bytes(str(src / name), data)
    out = storage.download_dir(str(src), tmp_path / "x" / "y")
    assert out == tmp_path / "x" / "y"
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_a_non_recursive_delete_never_removes_a_folders_files(tmp_path: Path) -> None:
    storage = Storage()
    storage.write_bytes(str(tmp_path / "d" / "f.bin"), b"x")
    with pytest.raises(OSError):
        storage.delete(str(tmp_path / "d"))
    assert (tmp_path / "d" / "f.bin").read_bytes() == b"x"


def test_recursive_delete_of_a_folder_uri_with_a_trailing_slash(store) -> None:
    storage, root = store
    for name in ("dirX/a.bin", "dirX/sub/b.bin", "keep.bin"):
        storage.write_bytes(join(root, name), b"x")
    storage.delete(join(root, "dirX") + "/", recursive=True)
    assert storage.list(root, recursive=True) == ["keep.bin"]


def test_arrow_fs_region_endpoint_and_path(monkeypatch) -> None:
    def fs_args(storage: Storage, uri: str = "s3://bucket/key"):
        fs, path = storage.arrow_fs(uri)
        return fs.__reduce__()[1][0], path

    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(Storage, "bucket_region", lambda self, bucket: None)  # S3 cannot say: the env
    assert fs_args(Storage("http://127.0.0.1:9000"))[0]["region"] == "us-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert fs_args(Storage("http://127.0.0.1:9000"))[0]["region"] == "ap-south-1"
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    args, path = fs_args(Storage("http://127.0.0.1:9000"))
    assert (args["region"], args["scheme"]) == ("eu-west-3", "http")
    assert args["endpoint_override"] == "127.0.0.1:9000"
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert fs_args(Storage("http://127.0.0.1:9000"))[0]["region"] == "eu-west-3"
    args, _ = fs_args(Storage("minio.example.com"))  # no scheme given: https
    assert (args["scheme"], args["endpoint_override"]) == ("https", "minio.example.com")
    storage = Storage("http://127.0.0.1:9000")
    assert [fs_args(storage, uri)[1] for uri in ("s3://bucket/key", "s3://bucket", "s3://bucket/dirX/")] == [
        "bucket/key", "bucket", "bucket/dirX"]


# -- S3 paths answered by botocore's Stubber: no server, exact requests and error texts --------------
@pytest.fixture(scope="module")
def _offline_s3_client():
    import boto3

    return boto3.session.Session().client("s3", region_name="us-east-1", aws_access_key_id="testing",
                                          aws_secret_access_key="testing")


@pytest.fixture
def stubbed(_offline_s3_client, monkeypatch):
    """``(storage, stubber)``: every S3 call of ``storage`` must match a queued, validated request."""
    import boto3
    from botocore.stub import Stubber

    monkeypatch.setattr(boto3.session.Session, "client", lambda self, *a, **kw: _offline_s3_client)
    with Stubber(_offline_s3_client) as stub:
        yield Storage("http://stubbed.invalid"), stub
        stub.assert_no_pending_responses()


def _body(data: bytes):
    import io

    from botocore.response import StreamingBody

    return StreamingBody(io.BytesIO(data), len(data))


def _error(stub, method: str, code: str, message: str = "msg", status: int = 400) -> None:
    stub.add_client_error(method, service_error_code=code, service_message=message, http_status_code=status)


def test_s3_error_messages_name_the_uri_and_the_error(stubbed) -> None:
    storage, stub = stubbed
    uri = "s3://b/k"

    def text(op: str) -> str:
        return f"An error occurred (AccessDenied) when calling the {op} operation: Access Denied"

    calls = [
        ("get_object", lambda: storage.read_bytes(uri), f"cannot read {uri}: {text('GetObject')}"),
        ("get_object", lambda: storage.read_tagged(uri), f"cannot read {uri}: {text('GetObject')}"),
        ("get_object", lambda: storage.read_bounded(uri, 5), f"cannot read {uri}: {text('GetObject')}"),
        ("put_object", lambda: storage.write_bytes(uri, b"x"), f"cannot write {uri}: {text('PutObject')}"),
        ("put_object", lambda: storage.write_bytes(uri, b"x", if_match="t"),
         f"cannot write {uri}: {text('PutObject')}"),
        ("head_object", lambda: storage.exists(uri), f"cannot stat {uri}: {text('HeadObject')}"),
        ("delete_object", lambda: storage.delete(uri), f"cannot delete {uri}: {text('DeleteObject')}"),
        ("list_objects_v2", lambda: storage.list(uri), f"cannot list {uri}: {text('ListObjectsV2')}"),
        ("list_objects_v2", lambda: storage.sizes(uri), f"cannot list {uri}: {text('ListObjectsV2')}"),
    ]
    for method, call, expected in calls:
        _error(stub, method, "AccessDenied", "Access Denied", 403)
        with pytest.raises(StorageError) as info:
            call()
        assert not isinstance(info.value, NotFound)
        assert str(info.value) == expected


def test_s3_error_text_is_one_line_of_at_most_300_characters(stubbed) -> None:
    storage, stub = stubbed
    _error(stub, "get_object", "SlowDown", "x" * 400 + "\nRequestId: 123")
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://b/k")
    head = "An error occurred (SlowDown) when calling the GetObject operation: "
    assert str(info.value) == "cannot read s3://b/k: " + (head + "x" * 400)[:300]


@pytest.mark.parametrize("code", ["NoSuchKey", "404", "NotFound", "NoSuchBucket"])
def test_s3_missing_objects_are_not_found(stubbed, code) -> None:
    storage, stub = stubbed
    for call in (lambda: storage.read_bytes("s3://b/k"), lambda: storage.read_tagged("s3://b/k"),
                 lambda: storage.read_bounded("s3://b/k", 3)):
        _error(stub, "get_object", code, status=404)
        with pytest.raises(NotFound) as info:
            call()
        assert str(info.value) == "no such object: s3://b/k"


def test_s3_reads_send_exact_requests(stubbed) -> None:
    storage, stub = stubbed
    stub.add_response("get_object", {"Body": _body(b"hello")}, {"Bucket": "b", "Key": "a/k"})
    assert storage.read_bytes("s3://b/a/k") == b"hello"
    stub.add_response("get_object", {"Body": _body(b"hello"), "ETag": '"5d41"'},
                      {"Bucket": "b", "Key": "a/k"})
    assert storage.read_tagged("s3://b/a/k") == (b"hello", "5d41")
    stub.add_response("get_object", {"Body": _body(b"0123456789abc")},
                      {"Bucket": "b", "Key": "a/k", "Range": "bytes=0-9"})
    assert storage.read_bounded("s3://b/a/k", 10) == b"0123456789"
    _error(stub, "get_object", "InvalidRange", status=416)  # an empty object has no byte 0
    assert storage.read_bounded("s3://b/a/k", 10) == b""


def test_s3_writes_send_exact_conditions(stubbed) -> None:
    storage, stub = stubbed
    base = {"Bucket": "b", "Key": "k", "Body": b"x"}
    stub.add_response("put_object", {}, base)
    assert storage.write_bytes("s3://b/k", b"x") is True
    stub.add_response("put_object", {}, base | {"IfNoneMatch": "*"})
    assert storage.write_bytes("s3://b/k", b"x", if_absent=True) is True
    stub.add_response("put_object", {}, base | {"IfMatch": '"abc"'})
    assert storage.write_bytes("s3://b/k", b"x", if_match="abc") is True
    stub.add_response("put_object", {}, base | {"Body": b'{\n  "a": 1\n}\n', "IfNoneMatch": "*"})
    assert storage.write_json("s3://b/k", {"a": 1}, if_absent=True) is True


@pytest.mark.parametrize("code", ["PreconditionFailed", "412", "ConditionalRequestConflict", "NoSuchKey"])
def test_s3_conditional_write_conflicts_return_false(stubbed, code) -> None:
    """A lost condition is False, not an error; without a condition the same answer is an error."""
    storage, stub = stubbed
    _error(stub, "put_object", code, status=412)
    assert storage.write_bytes("s3://b/k", b"x", if_match="abc") is False
    _error(stub, "put_object", code, status=412)
    assert storage.write_bytes("s3://b/k", b"x", if_absent=True) is False
    _error(stub, "put_object", code, status=412)
    with pytest.raises(StorageError, match=r"^cannot write s3://b/k: An error occurred \(" + code):
        storage.write_bytes("s3://b/k", b"x")


def test_s3_exists_heads_objects_and_lists_folders(stubbed) -> None:
    storage, stub = stubbed
    stub.add_response("head_object", {}, {"Bucket": "b", "Key": "p/k"})
    assert storage.exists("s3://b/p/k") is True
    _error(stub, "head_object", "404", status=404)  # no object: maybe a folder
    stub.add_response("list_objects_v2", {"CommonPrefixes": [{"Prefix": "p/k/sub/"}]},
                      {"Bucket": "b", "Prefix": "p/k/", "Delimiter": "/"})
    assert storage.exists("s3://b/p/k") is True
    _error(stub, "head_object", "NoSuchKey", status=404)
    stub.add_response("list_objects_v2", {}, {"Bucket": "b", "Prefix": "p/k/", "Delimiter": "/"})
    assert storage.exists("s3://b/p/k") is False
    stub.add_response("list_objects_v2", {"Contents": [{"Key": "p/a"}]},
                      {"Bucket": "b", "Prefix": "p/", "Delimiter": "/"})
    assert storage.exists("s3://b/p/") is True  # a folder: listed, never HEADed
    stub.add_response("list_objects_v2", {}, {"Bucket": "b", "Prefix": "", "Delimiter": "/"})
    assert storage.exists("s3://b") is False


def test_s3_listing_pages_and_limit(stubbed) -> None:
    storage, stub = stubbed
    first = {"Contents": [{"Key": "p/b"}, {"Key": "p/"}], "CommonPrefixes": [{"Prefix": "p/d/"}],
             "IsTruncated": True, "NextContinuationToken": "t"}
    second = {"Contents": [{"Key": "p/a"}, {"Key": "p/c"}], "IsTruncated": False}
    params = {"Bucket": "b", "Prefix": "p/", "Delimiter": "/"}
    stub.add_response("list_objects_v2", first, params)
    stub.add_response("list_objects_v2", second, params | {"ContinuationToken": "t"})
    assert storage.list("s3://b/p") == ["a", "b", "c", "d/"]  # the folder marker "p/" itself is left out
    stub.add_response("list_objects_v2", first, params)  # enough names on the first page: no second request
    assert storage.list("s3://b/p/", limit=2) == ["b", "d/"]
    # the folder marker "p/" is no entry, so it must not count toward the limit either (it did: a
    # first page of [marker, b] stopped the listing at ["b"])
    stub.add_response("list_objects_v2", first | {"CommonPrefixes": []}, params)
    stub.add_response("list_objects_v2", second, params | {"ContinuationToken": "t"})
    assert storage.list("s3://b/p", limit=2) == ["a", "b"]
    stub.add_response("list_objects_v2", second, {"Bucket": "b", "Prefix": "p/"})
    assert storage.list("s3://b/p", recursive=True) == ["a", "c"]


def test_s3_sizes_content_ids_and_recursive_delete(stubbed) -> None:
    storage, stub = stubbed
    page = {"Contents": [{"Key": "p/z.bin", "Size": 7, "ETag": '"e1"'},
                         {"Key": "p/.hidden", "Size": 1, "ETag": '"e2"'},
                         {"Key": "p/a/b.bin", "Size": 3, "ETag": '"e3-2"'}]}
    stub.add_response("list_objects_v2", page, {"Bucket": "b", "Prefix": "p/"})
    assert storage.sizes("s3://b/p") == [("a/b.bin", 3), ("z.bin", 7)]
    stub.add_response("list_objects_v2", page, {"Bucket": "b", "Prefix": "p/"})
    assert storage.content_ids("s3://b/p/") == [("a/b.bin", "e3-2"), ("z.bin", "e1")]
    stub.add_response("list_objects_v2", {"Contents": [{"Key": "p/dX/a"}, {"Key": "p/dX/s/b"}]},
                      {"Bucket": "b", "Prefix": "p/dX/"})
    for key in ("p/dX/", "p/dX/a", "p/dX/s/b"):
        stub.add_response("delete_object", {}, {"Bucket": "b", "Key": key})
    storage.delete("s3://b/p/dX/", recursive=True)
    stub.add_response("delete_object", {}, {"Bucket": "b", "Key": "p/dX"})
    storage.delete("s3://b/p/dX")  # not recursive: the one key only


@pytest.mark.parametrize("key", ["sub/../../escaped.txt", "a//b.txt", "a\\..\\..\\x.txt", "/abs.txt"])
def test_download_dir_refuses_each_escaping_key_by_name(stubbed, tmp_path: Path, key) -> None:
    storage, stub = stubbed
    page = {"Contents": [{"Key": "m/ok.txt"}, {"Key": "m/" + key}]}
    stub.add_response("list_objects_v2", page, {"Bucket": "b", "Prefix": "m/"})
    with pytest.raises(StorageError) as info:
        storage.download_dir("s3://b/m", tmp_path / "dst")
    name = join("s3://b/m", key)
    assert str(info.value) == f"refusing to download {name!r}: its key leaves the target folder"
    assert not (tmp_path / "dst").exists()


def test_s3_object_listings_span_pages_and_the_bucket_root(stubbed) -> None:
    storage, stub = stubbed
    stub.add_response("list_objects_v2", {"Contents": [{"Key": "b.bin", "Size": 2}], "IsTruncated": True,
                                          "NextContinuationToken": "t"}, {"Bucket": "b", "Prefix": ""})
    stub.add_response("list_objects_v2", {"Contents": [{"Key": "a.bin", "Size": 1}], "IsTruncated": False},
                      {"Bucket": "b", "Prefix": "", "ContinuationToken": "t"})
    assert storage.sizes("s3://b") == [("a.bin", 1), ("b.bin", 2)]
    stub.add_response("list_objects_v2", {"Contents": [{"Key": "p/dX/a", "ETag": '"e"'}]},
                      {"Bucket": "b", "Prefix": "p/dX/"})
    assert storage.content_ids("s3://b/p/dX") == [("a", "e")]


def test_s3_exists_stops_listing_at_the_first_entry(stubbed) -> None:
    """A folder with many pages of keys costs one request (no second page is queued here)."""
    storage, stub = stubbed
    first = {"Contents": [{"Key": "p/a"}], "IsTruncated": True, "NextContinuationToken": "t"}
    stub.add_response("list_objects_v2", first, {"Bucket": "b", "Prefix": "p/", "Delimiter": "/"})
    assert storage.exists("s3://b/p/") is True
    _error(stub, "head_object", "404", status=404)
    stub.add_response("list_objects_v2", first, {"Bucket": "b", "Prefix": "p/", "Delimiter": "/"})
    assert storage.exists("s3://b/p") is True


def test_s3_failures_without_an_error_answer_are_storage_errors(
    stubbed, _offline_s3_client, monkeypatch
) -> None:
    """A dropped connection carries no S3 error code: still a StorageError naming the URI (never an
    AttributeError from reading the missing code), and a conditional write does not report a lost race."""
    from botocore.exceptions import EndpointConnectionError

    storage, _ = stubbed

    def unreachable(**kwargs):
        raise EndpointConnectionError(endpoint_url="http://s3.invalid")

    for method in ("get_object", "put_object"):
        monkeypatch.setattr(_offline_s3_client, method, unreachable)
    why = 'Could not connect to the endpoint URL: "http://s3.invalid"'
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://b/k")
    assert not isinstance(info.value, NotFound) and str(info.value) == f"cannot read s3://b/k: {why}"
    with pytest.raises(StorageError) as info:
        storage.write_bytes("s3://b/k", b"x", if_match="t")
    assert str(info.value) == f"cannot write s3://b/k: {why}"


def test_local_read_bounded_reads_at_most_limit_bytes_and_names_the_file(tmp_path):
    path = tmp_path / "photo.bin"
    path.write_bytes(b"0123456789")
    storage = Storage()
    assert storage.read_bounded(str(path), 4) == b"0123"
    assert storage.read_bounded(str(path), 99) == b"0123456789"
    with pytest.raises(NotFound) as missing:
        storage.read_bounded(str(tmp_path / "absent.bin"), 4)
    assert str(missing.value) == f"no such file: {tmp_path / 'absent.bin'}"
    with pytest.raises(StorageError) as folder:
        storage.read_bounded(str(tmp_path), 4)
    assert str(folder.value).startswith(f"cannot read {tmp_path}: ") and "Is a directory" in str(folder.value)


def test_local_writes_go_through_a_hidden_temp_file_beside_the_target(tmp_path, monkeypatch):
    """The temp file is ``.<name>.<random>.tmp`` in the target's own folder: hidden from listings and
    on the same file system, so the final rename is atomic."""
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    target = tmp_path / "d" / "state.json"
    Storage().write_bytes(str(target), b"x")
    [(tmp, dst)] = seen
    assert dst == target and tmp.parent == target.parent
    assert tmp.name.startswith(".state.json.") and tmp.name.endswith(".tmp")
    assert target.read_bytes() == b"x" and sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_failed_local_write_leaves_no_temp_file_and_raises_its_error(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    target = tmp_path / "state.json"
    with pytest.raises(OSError, match="No space left"):
        Storage().write_bytes(str(target), b"x")
    assert list(tmp_path.iterdir()) == []


def test_json_is_written_with_sorted_keys_and_a_final_newline(tmp_path):
    target = tmp_path / "r.json"
    Storage().write_json(str(target), {"b": 1, "a": {"d": 2, "c": 3}})
    assert target.read_text() == '{\n  "a": {\n    "c": 3,\n    "d": 2\n  },\n  "b": 1\n}\n'


def test_split_s3_keeps_the_key_whole_and_refuses_other_uris():
    assert split_s3("s3://bucket/XL/photo.png") == ("bucket", "XL/photo.png")
    assert split_s3("s3://bucket") == ("bucket", "")
    # not a URL: '?' and '#' are key characters (a URL parser would cut the key there)
    assert split_s3("s3://bucket/t1/a?b.png") == ("bucket", "t1/a?b.png")
    assert split_s3("s3://bucket/t1/a#b.png?x=1") == ("bucket", "t1/a#b.png?x=1")
    for bad in ("gs://bucket/key", "s3:///key", "/local/path"):
        with pytest.raises(StorageError) as err:
            split_s3(bad)
        assert str(err.value) == f"not an s3:// URI: {bad!r}"


def test_a_local_listing_hides_dot_files_but_not_dot_folders(tmp_path):
    """Non-recursive listings skip hidden files (``.DS_Store``, temp files) but list hidden folders
    with their trailing '/' (a folder is the caller's to skip or enter)."""
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / ".DS_Store").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    assert Storage().list(str(tmp_path)) == [".hidden/", "a.png", "sub/"]


def test_a_local_read_error_names_the_file(tmp_path):
    with pytest.raises(StorageError) as err:
        Storage().read_bytes(str(tmp_path))
    assert str(err.value).startswith(f"cannot read {tmp_path}: ") and "Is a directory" in str(err.value)


def test_keys_with_question_marks_and_hashes_are_their_own_objects(store):
    """``t1/a?b.png`` and ``t1/a#b.png`` are read, listed and written as those keys, never as ``t1/a``."""
    storage, root = store
    storage.write_bytes(f"{root}/t1/a", b"the prefix object")
    storage.write_bytes(f"{root}/t1/a?b.png", b"question")
    storage.write_bytes(f"{root}/t1/a#b.png", b"hash")
    assert storage.read_bytes(f"{root}/t1/a?b.png") == b"question"
    assert storage.read_bounded(f"{root}/t1/a#b.png", 100) == b"hash"
    assert storage.read_bytes(f"{root}/t1/a") == b"the prefix object"
    assert storage.exists(f"{root}/t1/a?b.png") and not storage.exists(f"{root}/t1/a?c.png")
    assert storage.list(f"{root}/t1") == ["a", "a#b.png", "a?b.png"]


_NOT_S3 = "not an s3:// URI"
_BAD_KEY = "the key is over 1024 bytes or has a backslash or control character"
_SEGMENTS = "empty, '.' and '..' path segments are not allowed"


@pytest.mark.parametrize(("uri", "why"), [
    ("https://bucket/a.png", _NOT_S3),
    ("s3:///a.png", _NOT_S3),
    (None, _NOT_S3),
    ("s3://Bad_Bucket/a.png", "bad bucket name 'Bad_Bucket'"),
    ("s3://bucket/a\\b.png", _BAD_KEY),
    ("s3://bucket/a\nb.png", _BAD_KEY),
    ("s3://bucket/" + "k" * 1025, _BAD_KEY),
    ("s3://bucket/" + "é" * 512 + "k", _BAD_KEY),  # 1025 bytes in 513 characters
    ("s3://bucket/t1/../t2/a.png", _SEGMENTS),
    ("s3://bucket/t1/./a.png", _SEGMENTS),
    ("s3://bucket/t1//a.png", _SEGMENTS),
])
def test_s3_segments_refuses_uris_a_proxy_could_normalise(uri, why):
    with pytest.raises(ValueError) as err:
        s3_segments(uri)
    assert str(err.value) == why


def test_s3_segments_of_plain_uris():
    assert s3_segments("s3://bucket") == ("bucket", [])
    assert s3_segments("s3://bucket/") == ("bucket", [])
    assert s3_segments("s3://up.loads-1/t1/rex/") == ("up.loads-1", ["t1", "rex"])
    assert s3_segments("s3://bucket/t1/a?b.png") == ("bucket", ["t1", "a?b.png"])  # as split_s3 reads it
    assert s3_segments("s3://bucket/" + "k" * 1024) == ("bucket", ["k" * 1024])  # S3's limit, inclusive


# -- the bucket's own region; streamed parallel downloads (moto server) ------------------------------
def test_arrow_fs_and_ray_storage_take_the_buckets_own_region(s3_server, monkeypatch, make_cfg) -> None:
    """A bucket outside the default region: pyarrow (and so Ray Train/Tune's storage filesystem) is
    signed for the bucket's region, not for AWS_DEFAULT_REGION, and really reads and writes it."""
    import boto3
    import pyarrow.fs as pafs

    from raydb.storage import _BUCKET_REGIONS
    from raydb.train.stage import storage_location

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    bucket = "raydb-eu-bucket"
    boto3.client("s3", endpoint_url=s3_server, region_name="eu-central-1").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
    _BUCKET_REGIONS.clear()
    storage = Storage(s3_server)
    assert storage.bucket_region(bucket) == "eu-central-1"
    fs, path = storage.arrow_fs(f"s3://{bucket}/runs/x")
    assert (fs.region, path) == ("eu-central-1", f"{bucket}/runs/x")
    with fs.open_output_stream(f"{bucket}/runs/x/checkpoint.bin") as out:
        out.write(b"step 7")
    assert storage.read_bytes(f"s3://{bucket}/runs/x/checkpoint.bin") == b"step 7"
    assert fs.get_file_info(f"{bucket}/runs/x/checkpoint.bin").type == pafs.FileType.File

    cfg = make_cfg(workspace=f"s3://{bucket}/ws", s3_endpoint_url=s3_server)
    ray_path, ray_fs = storage_location(Storage(s3_server), cfg)
    runs = f"{bucket}/ws/tenants/{cfg.subject.tenant}/runs/{cfg.subject.id}"
    assert (ray_fs.region, ray_path) == ("eu-central-1", runs)
    other = "raydb-default-region-bucket"  # and a us-east-1 bucket beside it keeps us-east-1
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=other)
    assert storage.arrow_fs(f"s3://{other}/a")[0].region == "us-east-1"


def test_model_download_streams_parts_in_parallel_into_place(s3_bucket, tmp_path, monkeypatch) -> None:
    """A weight file several read chunks long arrives whole through ranged GETs, beside a small one;
    no temporary file is left, and a failed download leaves no partial file at the target."""
    import hashlib

    import raydb.storage as storage_mod

    endpoint, root = s3_bucket
    monkeypatch.setattr(storage_mod, "DOWNLOAD_CHUNK", 1024 * 1024)
    big = os.urandom(3 * 1024 * 1024 + 12345)  # 3 chunks and a bit: four ranged GETs
    storage = Storage(endpoint)
    storage.write_bytes(join(root, "model/unet/diffusion_pytorch_model.safetensors"), big)
    storage.write_bytes(join(root, "model/model_index.json"), b"{}")
    ranges: list[str] = []
    storage._client().meta.events.register(
        "provide-client-params.s3.GetObject", lambda params, **_: ranges.append(params.get("Range", "")))
    target = storage.download_dir(join(root, "model"), tmp_path / "model")
    got = (target / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(big).hexdigest()
    assert (target / "model_index.json").read_bytes() == b"{}"
    assert sum(r.startswith("bytes=") for r in ranges) == 4
    assert sorted(p.name for p in target.rglob("*") if p.is_file()) == [
        "diffusion_pytorch_model.safetensors", "model_index.json"]

    storage._client().meta.events.register(
        "before-call.s3.GetObject", lambda **_: (_ for _ in ()).throw(OSError("connection reset")))
    with pytest.raises(StorageError, match="unet/diffusion_pytorch_model.safetensors"):
        storage.download_file(join(root, "model/unet/diffusion_pytorch_model.safetensors"),
                              tmp_path / "again" / "unet.safetensors")
    assert list((tmp_path / "again").iterdir()) == []
