"""How ``ierf.serving.local`` sets Ray up before starting it (no cluster is started here)."""

from __future__ import annotations

import os

import pytest
from ierf.serving import local
from ierf.serving.local import GRPC_MAX_MESSAGE_ENV, choose_node_ip, grpc_max_message_bytes, is_loopback


@pytest.fixture
def routable(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(local, "routable_ip", lambda: "10.1.2.3")
    return "10.1.2.3"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "localhost", "::1", "[::1]"])
def test_a_loopback_http_host_keeps_ray_and_its_metrics_on_loopback(host: str, routable: str) -> None:
    assert choose_node_ip(host) == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", ""])
def test_a_wildcard_http_host_puts_the_node_on_the_routable_address(host: str, routable: str) -> None:
    assert choose_node_ip(host) == routable


def test_without_a_routable_address_the_node_stays_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "routable_ip", lambda: None)
    assert choose_node_ip("0.0.0.0") == "127.0.0.1"


def test_a_specific_address_is_the_node_address_and_an_explicit_node_ip_wins(routable: str) -> None:
    assert choose_node_ip("192.0.2.7") == "192.0.2.7"
    assert choose_node_ip("0.0.0.0", node_ip="127.0.0.1") == "127.0.0.1"
    assert choose_node_ip("127.0.0.1", node_ip="192.0.2.7") == "192.0.2.7"


def test_routable_ip_skips_loopback_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """No route out (the UDP probe's source is loopback): fall back to the host name's address, and to
    None when that is loopback too (Debian maps the host name to 127.0.1.1)."""

    class LoopbackRoute:
        def __init__(self, *args: object) -> None:
            pass

        def __enter__(self) -> LoopbackRoute:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def connect(self, address: object) -> None:
            pass

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", 40000)

    monkeypatch.setattr(local.socket, "socket", LoopbackRoute)
    monkeypatch.setattr(local.socket, "gethostbyname", lambda name: "127.0.1.1")
    assert local.routable_ip() is None
    monkeypatch.setattr(local.socket, "gethostbyname", lambda name: "10.1.2.3")
    assert local.routable_ip() == "10.1.2.3"
    assert is_loopback("127.0.1.1") and not is_loopback("10.1.2.3")


def test_grpc_cap_sits_above_the_image_cap() -> None:
    assert grpc_max_message_bytes(32 * 2**20, {}) == 40 * 2**20
    assert grpc_max_message_bytes(64 * 2**20, {}) == 65 * 2**20  # follows a raised image cap
    assert grpc_max_message_bytes(32 * 2**20, {GRPC_MAX_MESSAGE_ENV: "50000000"}) == 50_000_000
    with pytest.raises(ValueError, match="would refuse images the ingress accepts"):
        grpc_max_message_bytes(40 * 2**20, {GRPC_MAX_MESSAGE_ENV: str(40 * 2**20)})


def test_loopback_start_sets_rays_switch_only_while_ray_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private import ray_constants

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    seen = {}

    def fake_init(**kwargs: object) -> None:
        seen.update(kwargs)
        seen["env"] = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        seen["constant"] = ray_constants.ENABLE_RAY_CLUSTER

    import ray

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: seen["_node_ip_address"])
    before = ray_constants.ENABLE_RAY_CLUSTER
    assert local._init_ray(1, 80 * 2**20, "/tmp/x", 9999, "127.0.0.1") == "127.0.0.1"
    assert (seen["env"], seen["constant"]) == ("0", False)
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    assert ray_constants.ENABLE_RAY_CLUSTER is before
    assert local._init_ray(1, 80 * 2**20, "/tmp/x", 9999, "192.0.2.7") == "192.0.2.7"
    assert (seen["env"], seen["constant"]) == (None, before)


def test_stop_keeps_the_replicas_logs_before_removing_the_clusters_files(tmp_path) -> None:
    """The worker's ready line, Redis warnings and access logs lived only in the private cluster's
    directory, which stop() removes: `make stop` keeps a copy in run/serve-logs/<session>, and nothing
    already in that directory is removed (``--keep-logs .`` once emptied the working directory)."""
    from ierf.serving.local import RunningService

    temp_dir = tmp_path / "ierf-ray-x"
    session = temp_dir / "session_2026-11-27_07-00-00_1"
    (session / "logs" / "serve").mkdir(parents=True)
    (session / "logs" / "serve" / "replica_ierf_Worker.log").write_text("worker ready\n")
    (temp_dir / "session_latest").symlink_to(session)
    kept = tmp_path / "run" / "serve-logs"
    kept.mkdir(parents=True)
    (kept / "mine.txt").write_text("the user's\n")
    service = RunningService(9000, 8000, 8080, str(temp_dir), owns_temp_dir=True, keep_logs_in=str(kept))
    assert service.replica_logs == str(temp_dir / "session_latest" / "logs" / "serve")
    service.stop()  # no Ray running here: serve and ray shut down as no-ops
    assert (kept / session.name / "replica_ierf_Worker.log").read_text() == "worker ready\n"
    assert (kept / session.name / ".ierf-kept-logs").is_file()  # what pruning looks for
    assert (kept / "mine.txt").read_text() == "the user's\n" and not temp_dir.exists()


def test_only_the_newest_kept_sessions_stay(tmp_path) -> None:
    """Every stop added a copy and nothing pruned them; only Ray's session folders are ever removed."""
    from ierf.serving.local import KEPT_MARK, prune_kept_sessions

    names = [f"session_2026-11-{day:02d}_07-00-00_123456_{100 + day}" for day in range(1, 14)]  # as Ray names them
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / KEPT_MARK).write_text("")
    live = "session_2026-11-01_06-00-00_123456_99"  # a live Ray session (no mark): --keep-logs /tmp/ray
    (tmp_path / live).mkdir()
    (tmp_path / "session_notes").mkdir()  # not Ray's: stays
    (tmp_path / "mine.txt").write_text("the user's\n")
    prune_kept_sessions(str(tmp_path), keep=10)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*names[3:], live, "session_notes", "mine.txt"])
