"""compose/prometheus/ as Prometheus itself reads it (issue 18): promtool, in the local
Prometheus image, checks the config and its rule files and runs the alerts' unit tests.
The live stack with Prometheus scraping its replicas is in test_compose.py."""

from __future__ import annotations

import docker
import pytest
from testrig.prometheus import LOCAL_PROMETHEUS, promtool


@pytest.fixture(scope="module")
def prometheus_image(docker_client: docker.DockerClient) -> str:
    try:
        docker_client.images.get(LOCAL_PROMETHEUS)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {LOCAL_PROMETHEUS} is missing: run images/build-local.sh first",
                    pytrace=False)
    return LOCAL_PROMETHEUS


def test_promtool_accepts_the_config_and_its_rules(prometheus_image, docker_client) -> None:
    code, output = promtool(docker_client, "check", "config", "/etc/prometheus/prometheus.yml")
    assert code == 0, output
    assert "SUCCESS: 2 rule files found" in output, output  # rules.yml and alerts.yml
    code, output = promtool(docker_client, "check", "rules", "/etc/prometheus/rules.yml",
                            "/etc/prometheus/alerts.yml")
    assert code == 0, output
    assert output.count("SUCCESS: 5 rules found") == 2, output


def test_alerts_fire_on_their_unit_test_series(prometheus_image, docker_client) -> None:
    code, output = promtool(docker_client, "test", "rules",
                            "/etc/prometheus/tests/alerts_test.yml")
    assert code == 0, output
    assert "SUCCESS" in output and "FAILED" not in output, output
