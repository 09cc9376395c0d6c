"""Shared fixtures: a real S3 API on loopback (moto's server) and the environment every test runs in."""

from __future__ import annotations

import os
import uuid

import pytest

# Set before any client library reads them: dummy credentials (never real ones), no instance-metadata lookups,
# no proxies between the tests and loopback servers, no telemetry.
_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
for _key, _value in _TEST_ENV.items():
    if _key.startswith("AWS_"):
        os.environ[_key] = _value  # always the dummies: a test must never reach a real account
    elif _key.lower() == "no_proxy":
        os.environ[_key] = ",".join(filter(None, [os.environ.get(_key), _value]))
    else:
        os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL (`http://127.0.0.1:PORT`) of a moto S3 server running for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_storage(s3_server):
    """A StorageConfig pointing at the moto server, credentials from the (dummy) environment."""
    from cfgen.config import StorageConfig

    return StorageConfig(endpoint_url=s3_server)


@pytest.fixture
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client):
    """A fresh, empty bucket name (unique per test)."""
    name = f"cfgen-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray on loopback for the slow tests, with more logical CPUs than cores so I/O keeps moving."""
    import ray

    from cfgen.config import RayConfig
    from cfgen.pipeline.runtime import init_ray

    init_ray(RayConfig(num_cpus=4))
    yield ray
    ray.shutdown()
