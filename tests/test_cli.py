"""The `cfgen` console script's argument handling, and `cfgen phantoms` writing to local disk and to S3."""

import json

import pandas as pd
import pytest

from cfgen.cli import main, parse_args


def test_flags_and_overrides_reach_the_config():
    command, job = parse_args(["phantoms", "--n", "12", "--size", "128", "--seed", "4", "--out", "s3://b/p",
                               "storage.endpoint_url=http://127.0.0.1:9"])
    assert command == "phantoms"
    assert (job.phantoms.n, job.phantoms.size, job.phantoms.seed) == (12, 128, 4)
    assert job.output_uri == "s3://b/p" and job.storage.endpoint_url == "http://127.0.0.1:9"


def test_unknown_subcommand_exits_with_usage(capsys):
    with pytest.raises(SystemExit):
        parse_args(["fly"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cfgen_phantoms_to_local_and_s3(ray_local, tmp_path, s3_server, bucket, capsys):
    assert main(["phantoms", "--n", "30", "--size", "64", "--seed", "7", "--out", str(tmp_path / "ph")]) == 0
    local = pd.read_csv(tmp_path / "ph" / "manifest.csv", dtype=str)
    assert len(local) == 30 and (tmp_path / "ph" / "images" / "PH000029.dcm").exists()
    capsys.readouterr()
    assert main(["phantoms", "--n", "30", "--size", "64", "--seed", "7", "--out", f"s3://{bucket}/ph",
                 f"storage.endpoint_url={s3_server}"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_images"] == 30
    from cfgen.config import StorageConfig
    from cfgen.io.storage import read_bytes

    remote = read_bytes(f"s3://{bucket}/ph/images/PH000029.dcm", StorageConfig(endpoint_url=s3_server))
    assert remote == (tmp_path / "ph" / "images" / "PH000029.dcm").read_bytes()  # same seed, same bytes
