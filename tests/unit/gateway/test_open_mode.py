"""Open mode (no API key) only where nobody else can reach it, and only when asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepserve.cluster.launcher import LaunchOptions, LocalCluster
from deepserve.cluster.layout import ClusterLayout
from deepserve.errors import FailedPrecondition
from deepserve.gateway.auth import check_open_mode
from deepserve.gateway.settings import GatewaySettings
from deepserve.processes import is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.5", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("", False),
        ("10.1.2.3", False),
        ("gateway", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_open_gateway_refuses_a_public_address_unless_allowed() -> None:
    check_open_mode(GatewaySettings(auth_open=True), "127.0.0.1")
    check_open_mode(GatewaySettings(auth_open=False), "0.0.0.0")
    with pytest.raises(FailedPrecondition) as err:
        check_open_mode(GatewaySettings(auth_open=True), "0.0.0.0")
    assert err.value.field == "auth_open"
    assert "AUTH_OPEN_ALLOW_REMOTE" in err.value.message
    check_open_mode(GatewaySettings(auth_open=True, auth_open_allow_remote=True), "0.0.0.0")


def cluster(tmp_path: Path, host: str = "127.0.0.1", **options: object) -> LocalCluster:
    layout = ClusterLayout(run_dir=tmp_path, host=host)
    return LocalCluster(LaunchOptions(layout=layout, **options), say=lambda _: None)  # type: ignore[arg-type]


def test_up_keeps_the_documented_variable_and_require_keys_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEEPSERVE_GATEWAY_AUTH_OPEN", raising=False)
    assert cluster(tmp_path).service_env()["DEEPSERVE_GATEWAY_AUTH_OPEN"] == "true"
    monkeypatch.setenv("DEEPSERVE_GATEWAY_AUTH_OPEN", "false")
    assert cluster(tmp_path).service_env()["DEEPSERVE_GATEWAY_AUTH_OPEN"] == "false"
    monkeypatch.setenv("DEEPSERVE_GATEWAY_AUTH_OPEN", "true")
    env = cluster(tmp_path, auth_open=False).service_env()  # --require-keys
    assert env["DEEPSERVE_GATEWAY_AUTH_OPEN"] == "false"


def test_up_refuses_an_open_gateway_on_a_public_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEEPSERVE_GATEWAY_AUTH_OPEN", raising=False)
    with pytest.raises(FailedPrecondition) as err:
        cluster(tmp_path, host="0.0.0.0").check_auth()
    assert "--require-keys" in err.value.message
    cluster(tmp_path, host="0.0.0.0", auth_open=False).check_auth()
    allowed = cluster(tmp_path, host="0.0.0.0", allow_open_remote=True)
    allowed.check_auth()
    assert allowed.service_env()["DEEPSERVE_GATEWAY_AUTH_OPEN_ALLOW_REMOTE"] == "true"
    cluster(tmp_path).check_auth()
