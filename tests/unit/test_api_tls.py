"""The API client loads a CA bundle only where TLS can happen (api.tls_verification): a plain
http server URL keeps ~3 MiB out of the idle worker and still never accepts an unverified
certificate."""

from __future__ import annotations

import ssl

import pytest

from dockerworker.api import PROXY_VARIABLES, PrefectAPI, tls_verification


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def test_plain_http_gets_a_context_that_verifies_and_trusts_nothing() -> None:
    context = tls_verification("http://prefect-server:4200/api")
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 0
    assert context.get_ca_certs() == []


def test_https_keeps_httpx_s_default_verification() -> None:
    assert tls_verification("https://prefect.example/api") is True


@pytest.mark.parametrize("name", ["HTTPS_PROXY", "http_proxy", "ALL_PROXY"])
def test_a_proxy_from_the_environment_keeps_it_too(monkeypatch, name: str) -> None:
    """The proxy itself may speak TLS, whatever the server URL's scheme."""
    monkeypatch.setenv(name, "https://proxy.internal:3128")
    assert tls_verification("http://prefect-server:4200/api") is True


def test_no_proxy_alone_changes_nothing(monkeypatch) -> None:
    monkeypatch.setenv("NO_PROXY", "localhost")
    assert isinstance(tls_verification("http://127.0.0.1:4200/api"), ssl.SSLContext)


def test_the_client_uses_it() -> None:
    api = PrefectAPI("http://127.0.0.1:9/api")
    try:
        pool = api._client._transport._pool  # type: ignore[attr-defined]
        assert pool._ssl_context.get_ca_certs() == []
    finally:
        api.close()
