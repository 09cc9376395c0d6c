"""cfgen.io.storage against a real S3 API (moto's server on loopback) and the local disk."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from cfgen.config import JobConfig, StorageConfig
from cfgen.io import storage as st

AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_TOKEN = "FwoGZXIvYXdzEJr//////////wEaDOp5Xw1Yc0FbN8oYxyKBAQ" + "Zk3p9" * 20


@pytest.fixture(autouse=True)
def _fresh_cache():
    st.clear_filesystem_cache()
    yield
    st.clear_filesystem_cache()


# ------------------------------------------------------------------------------------------------------ URIs
@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://bucket/a/b.dcm", ("s3", "bucket/a/b.dcm")),
        ("s3a://bucket/k", ("s3", "bucket/k")),
        ("gs://b/k", ("gs", "b/k")),
        ("file:///data/x.png", ("file", "/data/x.png")),
        ("/data/x.png", ("file", "/data/x.png")),
        ("rel/x.png", ("file", "rel/x.png")),
    ],
)
def test_split_uri(uri, expected):
    assert st.split_uri(uri) == expected


def test_is_remote():
    assert st.is_remote("s3://b/k") and st.is_remote("gs://b/k")
    assert not st.is_remote("/tmp/x") and not st.is_remote("file:///tmp/x") and not st.is_remote("x/y")


def test_join_uri_keeps_scheme_and_single_slashes():
    assert st.join_uri("s3://bucket/root/", "files/p10", "x.dcm") == "s3://bucket/root/files/p10/x.dcm"
    assert st.join_uri("s3://bucket", "./train/a.jpg") == "s3://bucket/train/a.jpg"
    assert st.join_uri("/data/chexpert", "train/a.jpg") == "/data/chexpert/train/a.jpg"
    assert st.join_uri("file:///data", "a.png") == "file:///data/a.png"


def test_join_uri_absolute_part_wins():
    assert st.join_uri("/data", "s3://other/k.png") == "s3://other/k.png"
    assert st.join_uri("s3://b/root", "gs://x/y") == "gs://x/y"


# --------------------------------------------------------------------------------------------------- S3 (moto)
def test_s3fs_write_read_exists(s3_storage, bucket):
    uri = f"s3://{bucket}/images/a.dcm"
    assert not st.exists(uri, s3_storage)
    st.write_bytes(uri, b"DICM\x00\x01", s3_storage)
    assert st.exists(uri, s3_storage)
    assert st.read_bytes(uri, s3_storage) == b"DICM\x00\x01"


def test_s3_object_written_by_boto_is_read(s3_storage, s3_client, bucket):
    s3_client.put_object(Bucket=bucket, Key="m/manifest.csv", Body=b"image_id,image_uri\n001,a.png\n")
    assert st.read_bytes(f"s3://{bucket}/m/manifest.csv", s3_storage).startswith(b"image_id")


def test_pyarrow_s3_filesystem_reads_what_s3fs_wrote(s3_storage, bucket):
    st.write_bytes(f"s3://{bucket}/x/blob.bin", b"\x00\xff" * 10, s3_storage)
    fs, path = st.pyarrow_filesystem(f"s3://{bucket}/x/blob.bin", s3_storage)
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == f"{bucket}/x/blob.bin"
    with fs.open_input_stream(path) as fh:
        assert fh.read() == b"\x00\xff" * 10


def test_pyarrow_s3_parquet_roundtrip_visible_to_s3fs(s3_storage, bucket):
    fs, path = st.pyarrow_filesystem(f"s3://{bucket}/out/rows.parquet", s3_storage)
    pq.write_table(pa.table({"image_id": ["001", "002"]}), path, filesystem=fs)
    assert st.exists(f"s3://{bucket}/out/rows.parquet", s3_storage)
    assert pq.read_table(path, filesystem=fs).column("image_id").to_pylist() == ["001", "002"]


def test_pyarrow_s3_endpoint_url_becomes_override_and_scheme():
    storage = StorageConfig(endpoint_url="https://minio.local:9443", region="eu-west-1")
    fs, _ = st.pyarrow_filesystem("s3://b/k", storage)
    options = fs.__reduce__()[1][0]  # the constructor arguments, as pickled for Ray workers
    assert (options["endpoint_override"], options["scheme"], options["region"]) == ("minio.local:9443", "https",
                                                                                    "eu-west-1")
    assert options["access_key"] is None  # nothing given: pyarrow falls back to the AWS credential chain


def test_explicit_credentials_are_used(s3_server, bucket):
    # moto accepts any key pair: the point is that the SecretStr values reach both clients without error.
    storage = StorageConfig(endpoint_url=s3_server, aws_access_key_id=SecretStr("AKIDEXAMPLE"),
                            aws_secret_access_key=SecretStr("secretexample"))
    st.write_bytes(f"s3://{bucket}/c.bin", b"ok", storage)
    fs, path = st.pyarrow_filesystem(f"s3://{bucket}/c.bin", storage)
    with fs.open_input_stream(path) as fh:
        assert fh.read() == b"ok"
    s3fs_fs, _ = st.fsspec_filesystem(f"s3://{bucket}/c.bin", storage)
    assert s3fs_fs.key == "AKIDEXAMPLE"


def test_missing_object_raises_file_not_found_without_retry(s3_storage, bucket, monkeypatch):
    fs, _ = st.fsspec_filesystem(f"s3://{bucket}/nope.dcm", s3_storage)
    calls = []
    real = fs.cat_file
    monkeypatch.setattr(fs, "cat_file", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    with pytest.raises(FileNotFoundError):
        st.read_bytes(f"s3://{bucket}/nope.dcm", s3_storage, retries=4, backoff_s=0.0)
    assert len(calls) == 1


def test_transient_errors_are_retried_then_succeed(s3_storage, bucket, monkeypatch):
    uri = f"s3://{bucket}/flaky.png"
    st.write_bytes(uri, b"PNG", s3_storage)
    fs, _ = st.fsspec_filesystem(uri, s3_storage)
    real = fs.cat_file
    calls = []

    def flaky(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            raise ConnectionResetError("connection reset by peer")
        if len(calls) == 2:
            raise TimeoutError("read timed out")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", flaky)
    assert st.read_bytes(uri, s3_storage, retries=3, backoff_s=0.001) == b"PNG"
    assert len(calls) == 3


def test_transient_errors_give_up_after_retries(s3_storage, bucket, monkeypatch):
    fs, _ = st.fsspec_filesystem(f"s3://{bucket}/x", s3_storage)
    calls = []

    def always_throttled(path, *a, **k):
        calls.append(path)
        raise OSError("503 SlowDown")

    monkeypatch.setattr(fs, "cat_file", always_throttled)
    with pytest.raises(OSError, match="SlowDown"):
        st.read_bytes(f"s3://{bucket}/x", s3_storage, retries=2, backoff_s=0.001)
    assert len(calls) == 3  # the first attempt and two retries


def test_permission_error_is_not_retried(tmp_path, monkeypatch):
    fs, _ = st.fsspec_filesystem(str(tmp_path / "a"))
    calls = []

    def denied(path, *a, **k):
        calls.append(path)
        raise PermissionError("AccessDenied")

    monkeypatch.setattr(fs, "cat_file", denied)
    with pytest.raises(PermissionError):
        st.read_bytes(str(tmp_path / "a"), StorageConfig(retries=5), backoff_s=0.0)
    assert len(calls) == 1


def test_filesystems_are_cached_per_endpoint_and_credentials(s3_server):
    a = StorageConfig(endpoint_url=s3_server)
    fs1, _ = st.fsspec_filesystem("s3://b/one", a)
    fs2, _ = st.fsspec_filesystem("s3://b/two", StorageConfig(endpoint_url=s3_server))
    fs3, _ = st.fsspec_filesystem("s3://b/one", StorageConfig(endpoint_url=s3_server,
                                                                aws_access_key_id=SecretStr("k"),
                                                                aws_secret_access_key=SecretStr("s")))
    assert fs1 is fs2
    assert fs3 is not fs1
    pa1, _ = st.pyarrow_filesystem("s3://b/one", a)
    pa2, _ = st.pyarrow_filesystem("s3://b/two", a)
    assert pa1 is pa2


def test_cache_key_holds_no_secret(s3_server):
    storage = StorageConfig(endpoint_url=s3_server, aws_access_key_id=SecretStr(AWS_KEY_ID),
                            aws_secret_access_key=SecretStr(AWS_SECRET))
    st.fsspec_filesystem("s3://b/k", storage)
    assert AWS_SECRET not in repr(list(st._CACHE))


# ------------------------------------------------------------------------------------------------------ local
def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "deep" / "dir" / "img.png"
    st.write_bytes(str(target), b"one")
    st.write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["img.png"]
    assert st.exists(str(target)) and st.exists(f"file://{target}")
    assert st.read_bytes(f"file://{target}") == b"two"


def test_local_filesystems_give_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = st.pyarrow_filesystem("rel/x.parquet")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "rel" / "x.parquet")
    _, path = st.fsspec_filesystem("rel/x.parquet")
    assert path == str(tmp_path / "rel" / "x.parquet")


def test_local_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        st.read_bytes(str(tmp_path / "missing.dcm"))


def test_gs_without_gcsfs_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install gcsfs"):
        st.fsspec_filesystem("gs://bucket/key", StorageConfig())


# ------------------------------------------------------------------------------------------------- secrets
def test_redact_masks_aws_keys_tokens_and_url_passwords():
    text = (
        f"key={AWS_KEY_ID} aws_secret_access_key='{AWS_SECRET}' token: {AWS_TOKEN} "
        f"url=https://alice:hunter2@minio.local:9000/bucket?X-Amz-Signature=deadbeef&X-Amz-Credential={AWS_KEY_ID}"
    )
    out = st.redact(text)
    for secret in (AWS_KEY_ID, AWS_SECRET, AWS_TOKEN, "hunter2", "alice", "deadbeef"):
        assert secret not in out
    assert "minio.local:9000/bucket" in out


def test_redact_masks_a_bare_secret_key_but_keeps_ordinary_text():
    assert AWS_SECRET not in st.redact(f"loaded {AWS_SECRET} from env")
    ordinary = "s3://bucket/p10/p10000032/s50414267/02aa804e-bde0afdd.dcm sha1 3f786850e387550fdab836ed7e6dc881de23001b"
    assert st.redact(ordinary) == ordinary
    assert st.redact("max_tokens=77 tokenizer=clip") == "max_tokens=77 tokenizer=clip"


def test_safe_storage_dict_masks_secrets():
    storage = StorageConfig(endpoint_url="http://minio:9000", aws_access_key_id=SecretStr(AWS_KEY_ID),
                            aws_secret_access_key=SecretStr(AWS_SECRET), aws_session_token=SecretStr(AWS_TOKEN))
    safe = st.safe_storage_dict(storage)
    assert safe["aws_access_key_id"] == "***" and safe["aws_secret_access_key"] == "***"
    assert safe["aws_session_token"] == "***"
    assert safe["endpoint_url"] == "http://minio:9000" and safe["retries"] == 5 and safe["anon"] is False
    assert all(s not in str(safe) for s in (AWS_KEY_ID, AWS_SECRET, AWS_TOKEN))
    assert st.safe_storage_dict(StorageConfig())["aws_secret_access_key"] is None


def test_job_config_dumps_never_contain_secrets():
    config = JobConfig(storage=StorageConfig(aws_access_key_id=AWS_KEY_ID, aws_secret_access_key=AWS_SECRET,
                                             aws_session_token=AWS_TOKEN))
    for text in (str(config), repr(config), config.model_dump_json(), str(config.model_dump())):
        assert AWS_SECRET not in text and AWS_KEY_ID not in text and AWS_TOKEN not in text
    assert config.storage.aws_secret_access_key.get_secret_value() == AWS_SECRET
