"""The local Ray that `init_ray` starts: the dashboard's state API where a job trains, and only there."""

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PROBE = """
import sys
from cfgen.config import RayConfig
from cfgen.pipeline.runtime import init_ray
from ray.util.state import list_nodes

ray = init_ray(RayConfig(num_cpus=1, dashboard={dashboard}), trains={trains})
try:
    # this Ray's address: other tests' Ray instances may run on the machine at the same time
    list_nodes(address=ray.get_runtime_context().gcs_address, timeout=10)
    print("STATE-API-UP")
except Exception as error:
    print("STATE-API-DOWN", type(error).__name__)
ray.shutdown()
"""


def _state_api(dashboard, trains: bool) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE.format(dashboard=dashboard, trains=trains)],
                          capture_output=True, text=True, timeout=150)
    lines = [line for line in done.stdout.splitlines() if line.startswith("STATE-API")]
    assert lines, done.stderr[-2000:]
    return lines[-1].split()[0]


def test_a_training_job_gets_the_state_api_ray_trains_placement_group_cleaner_polls():
    """Without it the cleaner logged a warning every second or two of training (123 lines in one `make demo`) and
    could not free a crashed run's placement group."""
    assert _state_api(None, trains=True) == "STATE-API-UP"


def test_other_jobs_start_no_dashboard_unless_asked():
    assert _state_api(None, trains=False) == "STATE-API-DOWN"
    assert _state_api(True, trains=False) == "STATE-API-UP"
