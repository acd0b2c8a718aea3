"""Self-tests of issue 14's rigs: each fault of the proxy really happens against the real
server, and the engine of the test's own starts, runs, restarts and cleans up without harming
the machine's engine."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import docker
import httpx
import pytest
from testrig.engine import HOST_CHECK_IMAGE, Engine
from testrig.faultproxy import (
    BLACKOUT_DROP,
    DELAY,
    DROP_AFTER,
    DROP_BEFORE,
    FORWARDED,
    HOLD,
    REFUSE_503,
    WS_CUT,
    WS_REFUSED,
    WS_STALL,
    FaultProxy,
    Plan,
)
from testrig.prefect_rig import PrefectRig, PrefectServer
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect


def _client(proxy: FaultProxy) -> httpx.Client:
    return httpx.Client(base_url=proxy.url, trust_env=False, timeout=10)


def _flow_exists(rig: PrefectRig, name: str) -> bool:
    found = rig._call("POST", "/flows/filter", {"flows": {"name": {"any_": [name]}}})
    return bool(found)


def _until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until `condition()`; return the seconds it took (AssertionError after timeout)."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def _health_ok(proxy: FaultProxy) -> bool:
    try:
        with _client(proxy) as http:
            return http.get("/health").status_code == 200
    except httpx.TransportError:
        return False


# --- the proxy ------------------------------------------------------------------------------


def test_503_is_answered_without_forwarding(fault_proxy: FaultProxy, rig: PrefectRig) -> None:
    name = f"rig-{secrets.token_hex(4)}"
    fault_proxy.inject(REFUSE_503, r"^POST /api/flows/$")
    with _client(fault_proxy) as http:
        assert http.post("/flows/", json={"name": name}).status_code == 503
        assert not _flow_exists(rig, name)
        assert http.post("/flows/", json={"name": name}).status_code in (200, 201)  # used up
    assert fault_proxy.count(REFUSE_503, r"^POST /api/flows/$") == 1
    assert _flow_exists(rig, name)


def test_drop_before_forwarding_never_reaches_the_server(
    fault_proxy: FaultProxy, rig: PrefectRig
) -> None:
    name = f"rig-{secrets.token_hex(4)}"
    fault_proxy.inject(DROP_BEFORE, r"^POST /api/flows/$")
    with _client(fault_proxy) as http, pytest.raises(httpx.TransportError):
        http.post("/flows/", json={"name": name})
    assert fault_proxy.count(DROP_BEFORE) == 1
    assert not _flow_exists(rig, name)


def test_drop_after_apply_loses_a_claims_answer(
    fault_proxy: FaultProxy, rig: PrefectRig, unique_pool: str
) -> None:
    """The claim (Scheduled → Pending) is applied on the server, the client sees a connection
    error, and claiming again is refused: the case issue 14 item 7 is about."""
    rig.create_work_pool(unique_pool)
    run_id = rig.create_flow_run(rig.create_deployment(unique_pool, "flows.py:hello"))
    claim = {"state": {"type": "PENDING", "name": "Pending"}}
    fault_proxy.inject(DROP_AFTER, r"/set_state$")
    with _client(fault_proxy) as http:
        with pytest.raises(httpx.TransportError):
            http.post(f"/flow_runs/{run_id}/set_state", json=claim)
        assert rig.read_flow_run(run_id)["state"]["type"] == "PENDING"
        again = http.post(f"/flow_runs/{run_id}/set_state", json=claim).json()
    assert again["status"] != "ACCEPT", again
    assert fault_proxy.count(DROP_AFTER, r"^POST /api/flow_runs/\{id\}/set_state$") == 1


def test_delay_holds_the_answer(fault_proxy: FaultProxy) -> None:
    fault_proxy.inject(DELAY, r"^GET /api/health$", delay=1.5)
    with _client(fault_proxy) as http:
        t0 = time.monotonic()
        assert http.get("/health").json() is True
        assert time.monotonic() - t0 >= 1.5
    assert fault_proxy.count(DELAY) == 1 and fault_proxy.count(FORWARDED) == 1


def test_hold_keeps_the_request_from_the_server_until_it_forwards_it(
    fault_proxy: FaultProxy, rig: PrefectRig
) -> None:
    """While held, the server has not seen the request (a claim still on its way); then it
    is forwarded and answered as usual."""
    name = f"rig-{secrets.token_hex(4)}"
    fault_proxy.inject(HOLD, r"^POST /api/flows/$", delay=3.0)
    answer: list[int] = []
    with _client(fault_proxy) as http:
        poster = threading.Thread(target=lambda: answer.append(
            http.post("/flows/", json={"name": name}).status_code))
        t0 = time.monotonic()
        poster.start()
        fault_proxy.wait_for(HOLD, timeout=5)
        time.sleep(1.0)
        seen_while_held = _flow_exists(rig, name)
        poster.join(10)
        took = time.monotonic() - t0
    assert not seen_while_held, "the server saw the request while the proxy held it"
    assert answer in ([200], [201]) and took >= 3.0, (answer, took)
    assert _flow_exists(rig, name)
    assert fault_proxy.count(HOLD) == 1 and fault_proxy.count(FORWARDED) == 1


def _outcomes(proxy: FaultProxy, n: int) -> list[str]:
    """What `n` health checks through the proxy saw, one fresh connection each."""
    seen = []
    for _ in range(n):
        try:
            with _client(proxy) as http:
                seen.append(str(http.get("/health").status_code))
        except httpx.TransportError as exc:
            seen.append(type(exc).__name__)
    return seen


def test_a_seeded_plan_is_bounded_and_repeatable(prefect_server: PrefectServer) -> None:
    plan = Plan(seed=14, rates={REFUSE_503: 0.15, DROP_BEFORE: 0.1, DROP_AFTER: 0.1,
                                DELAY: 0.1},
                max_faults={REFUSE_503: 4, DROP_BEFORE: 3, DROP_AFTER: 3, DELAY: 3},
                match=r"^GET /api/health$", delay_seconds=0.05, duration=120)
    runs = []
    for _ in range(2):
        with FaultProxy(prefect_server.port, lifetime=300) as proxy:
            proxy.arm(plan)
            runs.append((_outcomes(proxy, 80), proxy.summary()))
    (first, counts), (second, _) = runs
    assert first == second  # same seed, same requests: same faults
    for kind, bound in plan.max_faults.items():
        assert 1 <= counts.get(kind, 0) <= bound, counts
    assert first.count("503") == counts[REFUSE_503]


def test_a_plan_ends_with_its_window(fault_proxy: FaultProxy) -> None:
    fault_proxy.arm(Plan(rates={REFUSE_503: 1.0}, max_faults={REFUSE_503: 1000},
                         match=r"^GET /api/health$", duration=1.0))
    assert _outcomes(fault_proxy, 1) == ["503"]
    _until(lambda: _outcomes(fault_proxy, 1) == ["200"], 5, "faults after the window")
    assert fault_proxy.count(REFUSE_503) >= 1


def test_a_blackout_resets_open_and_new_connections_for_its_duration(
    fault_proxy: FaultProxy,
) -> None:
    with _client(fault_proxy) as kept:
        assert kept.get("/health").status_code == 200  # a keep-alive connection is open
        fault_proxy.blackout(3.0)
        _until(fault_proxy.blacked_out, 2, "blackout on")
        with pytest.raises(httpx.TransportError):
            kept.get("/health")
        took = _until(lambda: _health_ok(fault_proxy), 10, "back after the blackout")
    assert 2.5 <= took <= 6, took
    assert fault_proxy.count(BLACKOUT_DROP) >= 2


def test_planned_blackouts_happen_on_time(fault_proxy: FaultProxy) -> None:
    t0 = time.monotonic()
    fault_proxy.arm(Plan(blackouts=[(2.0, 3.0)]))
    assert _health_ok(fault_proxy)
    _until(lambda: not _health_ok(fault_proxy), 6, "the planned blackout")
    started = time.monotonic() - t0
    _until(lambda: _health_ok(fault_proxy), 10, "the end of the planned blackout")
    ended = time.monotonic() - t0
    assert 1.9 <= started <= 4.0 and 4.9 <= ended <= 8.0, (started, ended)


def _subscribe(proxy: FaultProxy) -> ClientConnection:
    """An event-stream subscription through the proxy, as the worker makes it."""
    ws_url = proxy.url.replace("http://", "ws://") + "/events/out"
    socket = connect(ws_url, subprotocols=["prefect"], open_timeout=5)
    socket.send(json.dumps({"type": "auth", "token": None}))
    assert json.loads(socket.recv(timeout=10))["type"] == "auth_success"
    return socket


def test_the_event_stream_is_cut_and_refused_for_a_while(fault_proxy: FaultProxy) -> None:
    socket = _subscribe(fault_proxy)
    assert fault_proxy.websocket_count() == 1
    fault_proxy.cut_websockets(refuse_for=3.0)
    with pytest.raises(ConnectionClosed):
        while True:
            socket.recv(timeout=5)
    with pytest.raises(InvalidStatus):
        _subscribe(fault_proxy)

    def reconnects() -> bool:
        try:
            _subscribe(fault_proxy).close()
            return True
        except (InvalidStatus, OSError):
            return False

    took = _until(reconnects, 10, "a reconnect after the refusal")
    assert 1.5 <= took <= 6, took
    assert fault_proxy.count(WS_CUT, r"^WS /api/events/out$") == 1
    assert fault_proxy.count(WS_REFUSED) >= 1


def test_a_stalled_event_stream_stays_open_and_silent(fault_proxy: FaultProxy) -> None:
    """Half-open: the socket does not close, but a ping gets no pong until the stall ends."""
    socket = _subscribe(fault_proxy)
    try:
        assert socket.ping().wait(5)
        fault_proxy.stall_websockets(3.0)
        _until(lambda: fault_proxy.count(WS_STALL) == 1, 2, "the stall begins")
        assert not socket.ping().wait(1.5)  # lost, and nothing closed
        fresh = _subscribe(fault_proxy)  # a new connection is not stalled
        assert fresh.ping().wait(5)
        fresh.close()
        _until(lambda: socket.ping().wait(0.5), 10, "pongs again after the stall")
    finally:
        socket.close()


def test_the_proxy_stops_by_itself(prefect_server: PrefectServer) -> None:
    proxy = FaultProxy(prefect_server.port, lifetime=1.5).start()
    try:
        assert _health_ok(proxy)
        _until(lambda: not _health_ok(proxy), 6, "the proxy's own stop")
    finally:
        proxy.stop()


# --- the engine -----------------------------------------------------------------------------


def _host_bridge() -> bool:
    done = subprocess.run(["ip", "link", "show", "docker0"], capture_output=True, check=False)
    return done.returncode == 0


def test_own_engine_runs_restarts_and_cleans_up(
    own_engine: Engine, docker_client: docker.DockerClient
) -> None:
    had_docker0 = _host_bridge()
    assert own_engine.load_images(docker_client, HOST_CHECK_IMAGE) == [HOST_CHECK_IMAGE]
    engine = own_engine.client
    assert engine.containers.run(HOST_CHECK_IMAGE, ["echo", "hi"], remove=True) == b"hi\n"
    done = engine.containers.run(HOST_CHECK_IMAGE, ["sh", "-c", "echo bye; exit 3"],
                                 detach=True, labels={"rig": "done"})
    assert done.wait(timeout=30)["StatusCode"] == 3
    busy = engine.containers.run(HOST_CHECK_IMAGE, ["sleep", "600"], detach=True)
    _until(lambda: engine.containers.get(busy.id).status == "running", 20, "busy runs")
    assert not docker_client.containers.list(all=True, filters={"id": busy.id})  # not the host's

    own_engine.restart()
    engine = own_engine.client
    done = engine.containers.get(done.id)
    assert (done.status, done.attrs["State"]["ExitCode"]) == ("exited", 3)
    assert done.logs() == b"bye\n" and done.labels["rig"] == "done"
    assert engine.containers.get(busy.id).status == "exited"  # the restart stopped it
    assert engine.containers.run(HOST_CHECK_IMAGE, ["true"], remove=True) == b""
    assert _host_bridge() == had_docker0

    own_engine.stop()  # checks the machine's engine itself; the fixture's stop is a no-op now
    assert not own_engine.root.exists()
    assert subprocess.run(["ip", "link", "show", own_engine.bridge],
                          capture_output=True, check=False).returncode != 0
    assert _host_bridge() == had_docker0
    assert docker_client.containers.run(HOST_CHECK_IMAGE, ["true"], remove=True) == b""


LEFTOVER_ENGINE = {"root": "/tmp/dwr14k", "bridge": "dwr14k-br0", "bridge_cidr": "172.30.21.1/24"}


def test_a_leftover_engine_of_a_killed_run_is_cleaned_up() -> None:
    """A test process killed without cleanup leaves its dockerd running (own session) and
    its lock released; the next start ends that dockerd and starts afresh on the same root.
    A root of this test's own: on the default one, another test process waiting for the lock
    could be the next start."""
    script = ("import time; from testrig.engine import Engine; "
              f"e = Engine(**{LEFTOVER_ENGINE!r}).start(); "
              "print(e._daemon_pid(), flush=True); time.sleep(600)")
    victim = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None
        old_pid = int(victim.stdout.readline())
    finally:
        victim.kill()  # SIGKILL: no cleanup at all
        victim.wait(10)
    assert Path(f"/proc/{old_pid}").exists()  # the leftover
    fresh = Engine(**LEFTOVER_ENGINE)
    try:
        fresh.start()
        assert fresh.client.ping()
        assert fresh._daemon_pid() != old_pid
        _until(lambda: not Path(f"/proc/{old_pid}").exists(), 30, "the leftover dockerd ends")
        assert fresh.client.containers.list(all=True) == []
    finally:
        fresh.stop()


def test_a_second_user_of_the_engine_root_waits_for_the_first(own_engine: Engine) -> None:
    """Another process's engine on the same root is never taken for a leftover."""
    with pytest.raises(RuntimeError, match="in use"):
        Engine(str(own_engine.root), own_engine.bridge, own_engine.bridge_cidr).start(
            wait_for_root=1.0)
    assert own_engine.client.ping()
