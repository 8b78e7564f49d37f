"""`flwr run` in local simulation (a SuperLink in simulation mode, Ray runs the nodes): the
simulated nodes find their private data through the run config's `simulation-datasets`."""

from __future__ import annotations

import subprocess
import time

import pytest

from app.federation import (
    flower_environment,
    flower_executable,
    free_port,
    port_accepts,
    stage_app,
)
from coordinator.base_models.service import register_base_model
from coordinator.core.app import open_database
from coordinator.core.config import Settings
from coordinator.experts.service import list_versions
from phatgoose.models import base_model_spec, load_base_model
from tests.client.helpers import save_tiny_base, write_private_data

# Flower's SuperLink and Ray listen on their default ports too: under `pytest -n`, the tests
# that start them run one at a time, on one worker (`--dist loadgroup`).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("flower")]


def test_flwr_run_in_local_simulation_catalogues_one_expert_per_simulated_node(tmp_path):
    base_dir = save_tiny_base(tmp_path / "tiny-base")
    settings = Settings(data_dir=tmp_path / "coordinator")
    engine, sessions = open_database(settings)
    with sessions() as session:
        register_base_model(
            session, base_model_spec(load_base_model(str(base_dir))[0], str(base_dir))
        )
    datasets = ";".join(
        f"{name}={write_private_data(tmp_path / f'{name}.jsonl', tag=name)}"
        for name in ("ant", "bee")
    )
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    env = flower_environment(FLWR_HOME=str(home))
    overrides = tmp_path / "run-config.toml"
    overrides.write_text(
        f'base-model = "{base_dir}"\nlora-steps = 3\ngate-steps = 2\nbatch-size = 4\n'
        f"max-length = 48\nmin-nodes = 2\nnode-wait-seconds = 60.0\n"
        f'coordinator-data-dir = "{settings.data_dir}"\nsimulation-datasets = "{datasets}"\n'
    )
    with (tmp_path / "superlink.log").open("wb") as log:
        superlink = subprocess.Popen(
            [
                flower_executable("flower-superlink"),
                "--insecure",
                "--simulation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while not port_accepts(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        run = subprocess.run(
            [
                flower_executable("flwr"),
                "run",
                str(stage_app(tmp_path / "app")),
                "sim",
                "--run-config",
                str(overrides),
                "--federation-config",
                "num-supernodes=2",
                "--stream",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
    finally:
        superlink.terminate()
        superlink.wait(timeout=30)

    assert "2 registered, 0 rejected, 0 failed, 0 timed out" in run.stdout, run.stdout + run.stderr
    with sessions() as session:
        versions = list_versions(session).items
        assert sorted(v.expert.name for v in versions) == ["ant", "bee"]
        assert all(v.expert.namespace.startswith("flower-") for v in versions)  # one per node
    engine.dispose()
