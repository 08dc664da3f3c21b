"""Error -> gRPC status mapping and validation of the application's settings."""

from __future__ import annotations

import pickle

import grpc
import pytest
from ierf.serving.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    to_status,
)
from ierf.serving.settings import ServiceConfig


@pytest.mark.parametrize(
    "exc,code",
    [
        (InvalidArgument("bad target"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("no model"), grpc.StatusCode.NOT_FOUND),
        (ResourceExhausted("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (Unavailable("restart"), grpc.StatusCode.UNAVAILABLE),
        (ValueError("engine: unknown layer 'x'"), grpc.StatusCode.INVALID_ARGUMENT),
        (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_codes(exc: Exception, code: grpc.StatusCode) -> None:
    assert to_status(exc)[0] == code


def test_internal_errors_do_not_leak_details() -> None:
    code, message = to_status(RuntimeError("secret path /etc/x"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message and "RuntimeError" in message


def test_ray_back_pressure_maps_to_resource_exhausted() -> None:
    from ray.serve.exceptions import BackPressureError

    code, message = to_status(BackPressureError(num_queued_requests=8, max_queued_requests=8))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in message


def test_wrapped_worker_errors_keep_their_code() -> None:
    class Wrapper(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("wrapped")
            self.cause = cause

    assert to_status(Wrapper(NotFound("unknown model 'x'"))) == (
        grpc.StatusCode.NOT_FOUND,
        "unknown model 'x'",
    )


def test_service_errors_survive_pickling_across_the_ray_hop() -> None:
    restored = pickle.loads(pickle.dumps(InvalidArgument("target 5000 is out of range")))
    assert isinstance(restored, ServiceError) and restored.message == "target 5000 is out of range"
    assert to_status(restored)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_settings_defaults_and_model_list() -> None:
    config = ServiceConfig.from_args({"models": ["efficientnet_lite0", {"id": "r50", "name": "resnet50"}]})
    assert config.default_model == "efficientnet_lite0"
    assert [m.deployment_name for m in config.models] == ["Worker_efficientnet_lite0", "Worker_r50"]
    assert config.models[1].name == "resnet50"


@pytest.mark.parametrize(
    "args,message",
    [
        ({"modles": []}, "unknown application arg"),
        ({"cache": {"redis": "x"}}, "unknown setting"),
        ({"models": [{"id": "a b"}]}, "letters, digits"),
        ({"models": ["a", "a"]}, "unique"),
        ({"models": ["a"], "default_model": "b"}, "default_model"),
    ],
)
def test_bad_settings_fail_with_the_key_named(args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServiceConfig.from_args(args)


@pytest.mark.parametrize(
    "args,message",
    [
        # a cap written with a unit would be accepted, then blame every caller's image
        ({"ingress": {"max_image_bytes": "32MiB"}}, r"ingress\.max_image_bytes must be a positive integer, got '32M"),
        ({"ingress": {"max_pixels": 0}}, r"ingress\.max_pixels must be a positive integer"),
        ({"ingress": {"max_side": 1.5}}, r"ingress\.max_side"),
        ({"ingress": {"max_positions": -1}}, r"ingress\.max_positions"),
        ({"ingress": {"max_top_k": True}}, r"ingress\.max_top_k"),
        ({"ingress": {"request_timeout_s": 0}}, r"ingress\.request_timeout_s must be a finite number of seconds > 0"),
        ({"ingress": {"request_timeout_s": float("inf")}}, r"ingress\.request_timeout_s"),
        ({"ingress": {"request_timeout_s": "300"}}, r"ingress\.request_timeout_s"),
        # a TTL Redis refuses would make every SET fail silently
        ({"cache": {"ttl_s": 0}}, r"cache\.ttl_s must be a positive integer \(seconds\), got 0"),
        ({"cache": {"ttl_s": -5}}, r"cache\.ttl_s"),
        ({"cache": {"ttl_s": 1.5}}, r"cache\.ttl_s"),
        ({"cache": {"ttl_s": True}}, r"cache\.ttl_s"),  # bool is an int in Python, not here
        ({"cache": {"l1_bytes": -1}}, r"cache\.l1_bytes must be an integer >= 0"),
        ({"cache": {"l1_bytes": "512MiB"}}, r"cache\.l1_bytes"),
        ({"cache": {"max_value_bytes": 0}}, r"cache\.max_value_bytes"),
        ({"cache": {"write_behind_bytes": -1}}, r"cache\.write_behind_bytes"),
        ({"ingress": {"decode_pixels": -1}}, r"ingress\.decode_pixels must be an integer >= 0"),
        ({"ingress": {"decode_queue_pixels": 100, "max_pixels": 1000}}, r"could otherwise never wait its turn"),
        ({"cache": {"failure_threshold": 0}}, r"cache\.failure_threshold"),
        ({"cache": {"timeout_s": 0}}, r"cache\.timeout_s must be a finite number of seconds > 0"),
        ({"cache": {"connect_timeout_s": float("nan")}}, r"cache\.connect_timeout_s"),
        ({"cache": {"open_seconds": -1}}, r"cache\.open_seconds"),
        ({"cache": {"redis_url": "127.0.0.1:6379"}}, r"cache\.redis_url must be null, a redis://"),
        ({"cache": {"redis_url": 6379}}, r"cache\.redis_url"),
        ({"cache": {"redis_url": "env:"}}, r"cache\.redis_url"),
        # URLs redis-py cannot read passed the scheme check, then failed every request with INVALID_ARGUMENT
        ({"cache": {"redis_url": "redis://127.0.0.1:99999/0"}}, r"Port out of range"),
        ({"cache": {"redis_url": "redis://h:port/0"}}, r"Port could not be cast"),
        ({"cache": {"redis_url": "redis://h:6379/zero"}}, r"database after the last '/' must be a number"),
        ({"cache": {"redis_url": "redis://h:0/0"}}, r"port 0 is not a port"),  # started, then missed every request
        ({"cache": {"redis_url": "redis://user:s3cret@h:port/0"}}, r"'redis://user:\*\*\*@h:port/0'"),
        ({"cache": {"redis_url": "redis://h:1/0?foo=1"}}, r"unexpected keyword argument 'foo'"),  # failed per request
        ({"cache": {"redis_url": "redis://h:1/0?protocol=4"}}, r"protocol must be either 2 or 3"),  # a raw RedisError
        ({"cache": {"redis_url": "redis://h:1/0?password=s3cret&foo=1"}}, r"\?password=\*\*\*&foo=1"),
        ({"cache": 5}, r"cache must be a mapping"),
        ({"ingress": ["max_pixels"]}, r"ingress must be a mapping"),
        ({"models": [{"id": "a", "seed": -1}]}, r"models\[0\]\.seed must be an integer >= 0"),
        ({"models": [{"id": "a", "num_threads": 1.5}]}, r"models\[0\]\.num_threads"),
        ({"models": [{"id": "a", "random_init": "yes"}]}, r"models\[0\]\.random_init must be true or false"),
        ({"models": [{"id": "a", "random_init": 1}]}, r"models\[0\]\.random_init"),
        (
            {"models": [{"id": "a", "random_init": True, "weights": "w.pth"}]},
            r"^models\[0\]\.weights: set weights or random_init",
        ),
        ({"models": [{"id": "a", "seed": 3}]}, r"^models\[0\]\.seed applies to random_init weights only \(model a\)"),
        ({"models": []}, r"models is empty"),  # silently served the bundled model
        ({"models": [{"id": "a", "device": "gpu"}]}, r"models\[0\]\.device must be 'auto'"),
        ({"models": [{"id": "a", "weights": ""}]}, r"models\[0\]\.weights must be a non-empty string or null"),
        ({"models": [{"id": "a", "name": None}]}, r"models\[0\]\.name must be a non-empty string"),
        ({"models": ["a", {"id": 5}]}, r"models\[1\]\.id"),
        ({"models": [{"name": "resnet18"}]}, r"models\[0\] lacks required setting\(s\): id"),
        ({"models": "resnet18"}, r"models must be a list"),
        ({"models": ["a"], "default_model": 1}, r"default_model must be a model id"),
        ({"models": ["a"], "default_model": 0}, r"default_model must be a model id"),  # was "the first model"
        ({"models": ["a"], "ingress": {"max_positions": 70_000}}, r"max_positions must be at most 65536"),
        ({"models": ["a"], "default_model": False}, r"default_model must be a model id"),
    ],
)
def test_bad_values_fail_at_build_time_with_the_key_named(args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServiceConfig.from_args(args)


def test_values_at_the_edge_of_their_range_are_accepted() -> None:
    config = ServiceConfig.from_args(
        {
            "models": [{"id": "a", "name": "resnet18", "random_init": True, "device": "cuda:1", "num_threads": 0}],
            "cache": {"l1_bytes": 0, "redis_url": None, "timeout_s": 1, "ttl_s": 1, "write_behind_bytes": 0},
            "ingress": {"max_positions": 1, "request_timeout_s": 0.001},
        }
    )
    assert config.cache.timeout_s == 1 and config.cache.resolved_redis_url() is None
    for url in ("redis://h:6379/0", "rediss://h:6380/1", "unix:///run/redis.sock", "env:REDIS_URL", ""):
        ServiceConfig.from_args({"cache": {"redis_url": url}})


def test_redis_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ServiceConfig.from_args({"cache": {"redis_url": "env:IERF_TEST_REDIS"}})
    monkeypatch.delenv("IERF_TEST_REDIS", raising=False)
    with pytest.raises(ValueError, match=r"\$IERF_TEST_REDIS is not set in this replica.*redis_url: null"):
        config.cache.resolved_redis_url()  # it meant "no Redis", silently
    monkeypatch.setenv("IERF_TEST_REDIS", "")
    with pytest.raises(ValueError, match="is not set"):
        config.cache.resolved_redis_url()
    monkeypatch.setenv("IERF_TEST_REDIS", "redis://127.0.0.1:1/0")
    assert config.cache.resolved_redis_url() == "redis://127.0.0.1:1/0"
    monkeypatch.setenv("IERF_TEST_REDIS", "ierf-redis:6379")  # no scheme: checked when the replica starts
    with pytest.raises(ValueError, match=r"\$IERF_TEST_REDIS .* got 'ierf-redis:6379'"):
        config.cache.resolved_redis_url()


def test_deployment_overrides_are_checked() -> None:
    from ierf.serving.app import build_application

    config = ServiceConfig.from_args({})
    with pytest.raises(ValueError, match="unknown deployment"):
        build_application(config, {"Worker_other": {"num_replicas": 1}})
    with pytest.raises(ValueError, match="unsupported option"):
        build_application(config, {"Ingress": {"num_replicass": 1}})
    build_application(config, {"Worker_efficientnet_lite0": {"max_queued_requests": 4}})


def test_an_unknown_architecture_is_refused_where_the_application_is_built() -> None:
    """It failed only in the worker replica's constructor, which Serve retries until it gives up."""
    from ierf.serving.app import build_app

    with pytest.raises(
        ValueError, match=r"model 'r50' \(name 'resnet5'\): unknown architecture; available: .*resnet50"
    ):
        build_app({"models": [{"id": "r50", "name": "resnet5", "random_init": True}]})
    with pytest.raises(ValueError, match=r"model 'resnet5': unknown architecture"):
        build_app({"models": ["resnet5"]})


def test_a_resize_below_the_models_crop_is_refused_where_the_application_is_built() -> None:
    """``resize`` (a renamed second-generation file: 232) below the crop would fail in every replica."""
    from ierf.serving.app import build_app

    with pytest.raises(
        ValueError, match=r"model 'v3' \(name 'inception_v3'\): resize 256 is below its centre crop 299"
    ):
        build_app({"models": [{"id": "v3", "name": "inception_v3", "random_init": True, "resize": 256}]})
    with pytest.raises(ValueError, match=r"resize must be an integer >= 0"):
        build_app({"models": [{"id": "r", "name": "resnet18", "random_init": True, "resize": "232"}]})
    build_app({"models": [{"id": "r", "name": "resnet18", "random_init": True, "resize": 232}]})


def test_building_the_application_loads_no_torch() -> None:
    """The check above read the registry, which brought torch (~470 MB) into `make run`'s driver."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ierf.serving.app import build_app\n"
        "build_app({'models': [{'id': 'r50', 'name': 'resnet50', 'random_init': True}]})\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


def test_local_config_file_parses_and_matches_the_app() -> None:
    from ierf.serving.app import GRPC_SERVICER_FUNCTIONS
    from ierf.serving.local import DEFAULT_CONFIG, load_serve_config

    config = load_serve_config(DEFAULT_CONFIG)
    app = config["applications"][0]
    assert app["import_path"] == "ierf.serving.app:build_app"
    assert config["grpc_options"]["grpc_servicer_functions"] == GRPC_SERVICER_FUNCTIONS
    service = ServiceConfig.from_args(app["args"])
    names = {d["name"] for d in app["deployments"]}
    assert names == {"Ingress"} | {m.deployment_name for m in service.models}


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
    ],
)
def test_error_for_round_trips_the_code(code: grpc.StatusCode) -> None:
    from ierf.serving.errors import error_for

    assert to_status(error_for(code, "m")) == (code, "m")


def test_a_write_behind_budget_below_the_value_cap_is_refused() -> None:
    """Values between the two would be dropped from the queue on every write, so Redis would never see them."""
    from ierf.serving.settings import CacheConfig

    with pytest.raises(ValueError, match=r"write_behind_bytes .* must be 0 .* or at least max_value_bytes"):
        CacheConfig(write_behind_bytes=1 << 20, max_value_bytes=64 << 20)
    assert CacheConfig(write_behind_bytes=0, max_value_bytes=64 << 20).write_behind_bytes == 0
    assert CacheConfig(write_behind_bytes=64 << 20, max_value_bytes=64 << 20).write_behind_bytes == 64 << 20


def test_decode_budget_defaults_to_twice_and_four_times_the_pixel_cap() -> None:
    """0 in the config means the documented defaults: decode twice, queue four times max_pixels."""
    from ierf.serving.settings import IngressConfig

    assert IngressConfig(max_pixels=1000).decode_budget == (2000, 4000)
    assert IngressConfig(max_pixels=1000, decode_pixels=1500, decode_queue_pixels=3000).decode_budget == (1500, 3000)


def test_only_non_ok_requests_count_as_errors() -> None:
    """explainer_errors_total feeds error-rate alerts: an OK request is timed but never counted there."""
    from ierf.serving.metrics import ServiceMetrics

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, dict]] = []

        def inc(self, value: float, tags: dict) -> None:
            self.calls.append(("inc", tags))

        def observe(self, value: float, tags: dict) -> None:
            self.calls.append(("observe", tags))

    metrics = ServiceMetrics()
    errors, durations = Recorder(), Recorder()
    metrics._metrics["explainer_errors_total"] = errors
    metrics._metrics["explainer_request_duration_seconds"] = durations
    metrics.request("Explain", "srd", "m", "OK", 0.1)
    metrics.request("Explain", "srd", "m", "INVALID_ARGUMENT", 0.1)
    assert errors.calls == [("inc", {"rpc": "Explain", "code": "INVALID_ARGUMENT", "reason": "none"})]
    assert len(durations.calls) == 2


def test_model_ids_may_use_dots_dashes_and_underscores() -> None:
    """The documented id alphabet is letters, digits and ``_ - .``: a versioned id such as ``resnet18-v1.2``
    must be accepted, and anything else still refused."""
    config = ServiceConfig.from_args({"models": [{"id": "resnet18-v1.2_b", "name": "resnet18", "random_init": True}]})
    assert config.default_model == "resnet18-v1.2_b"
    with pytest.raises(ValueError, match=r"models\[0\]\.id: model id 'a/b' must be non-empty"):
        ServiceConfig.from_args({"models": ["a/b"]})


def test_deployment_overrides_reach_the_ingress_and_the_workers() -> None:
    """``make run`` passes the config file's per-deployment options here: the ingress's
    ``max_queued_requests`` is the overload bound, so losing it changes when callers are refused."""
    from ierf.serving.app import build_application

    app = build_application(
        ServiceConfig.from_args({}),
        {"Ingress": {"max_queued_requests": 7}, "Worker_efficientnet_lite0": {"max_ongoing_requests": 3}},
    )
    ingress = app._bound_deployment
    (worker,) = ingress.init_args[0].values()
    assert (ingress.name, ingress.max_queued_requests) == ("Ingress", 7)
    assert (worker._bound_deployment.name, worker._bound_deployment.max_ongoing_requests) == (
        "Worker_efficientnet_lite0",
        3,
    )


def test_only_redis_values_are_sized_in_the_value_histogram() -> None:
    """explainer_cache_value_bytes is documented as the size of values read from or written to Redis:
    L1 hits (in-process, no bytes moved) must not be counted there."""
    from ierf.serving.metrics import ServiceMetrics

    observed: list[tuple[float, dict]] = []

    class Recorder:
        def inc(self, value: float, tags: dict) -> None:
            pass

        def observe(self, value: float, tags: dict) -> None:
            observed.append((value, tags))

    metrics = ServiceMetrics()
    metrics._metrics["explainer_cache_requests_total"] = Recorder()
    metrics._metrics["explainer_cache_value_bytes"] = Recorder()
    metrics.cache("l1", "get", "hit", 0.001, 5000)
    metrics.cache("l2", "get", "miss", 0.001, 0)
    metrics.cache("l2", "put", "stored", 0.001, 7000)
    assert observed == [(7000, {"op": "put"})]


def test_request_latency_buckets_reach_the_300_s_request_cap() -> None:
    """With buckets ending at 60 s (as the stage buckets once did) on the request histogram, every cold
    explanation between 60 and 300 s would fall in +Inf and a p99 could not be read."""
    from ierf.serving.metrics import REQUEST_BUCKETS_S, STAGE_BUCKETS_S, ServiceMetrics

    metrics = ServiceMetrics()
    assert metrics._metrics["explainer_request_duration_seconds"].boundaries == REQUEST_BUCKETS_S
    assert metrics._metrics["explainer_stage_duration_seconds"].boundaries == STAGE_BUCKETS_S
    assert REQUEST_BUCKETS_S[-1] == 300


def test_a_clipped_message_fits_the_limit_and_says_how_long_it_was() -> None:
    """``clip`` exists so a status message fits any client's trailer limits: its own suffix must fit too."""
    from ierf.serving.errors import MAX_MESSAGE_CHARS, clip

    assert clip("x" * MAX_MESSAGE_CHARS) == "x" * MAX_MESSAGE_CHARS
    clipped = clip("x" * 100_000)
    assert len(clipped) <= MAX_MESSAGE_CHARS and clipped.endswith("… [100000 chars]")


def test_an_overload_wrapped_by_ray_still_says_when_to_retry() -> None:
    """Ray wraps a worker's exception (its ``cause``): the code is read through the wrapper, and so must
    the overload's pause be, or an overload is told "never retry" (a RESOURCE_EXHAUSTED without a pause)."""
    from ierf.serving.errors import PUSHBACK_KEY, RETRY_AFTER_KEY, Overloaded, retry_trailers

    class Wrapper(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("wrapped")
            self.cause = cause

    wrapped = Wrapper(Overloaded("queue full"))
    code, _ = to_status(wrapped)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_trailers(wrapped, code) == [(RETRY_AFTER_KEY, "250"), (PUSHBACK_KEY, "250")]


def test_an_index_error_from_the_engine_is_the_callers_mistake() -> None:
    """Guards against IndexError falling through to INTERNAL: an index out of range (a class or position the
    checks let through) is a bad argument the caller can fix, not a server bug to page someone about."""
    code, message = to_status(IndexError("index 1000 is out of bounds for dimension 0 with size 1000"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "out of bounds" in message


def test_a_password_after_another_query_option_is_redacted() -> None:
    """Guards against redacting ``?password=`` only when it is the first query option: ``&password=`` would
    reach the deploy error (and the logs that keep it) in clear text."""
    with pytest.raises(ValueError, match=r"0\?foo=1&password=\*\*\*") as raised:
        ServiceConfig.from_args({"cache": {"redis_url": "redis://h:1/0?foo=1&password=s3cret"}})
    assert "s3cret" not in str(raised.value)


# -- mutation round 9 --------------------------------------------------------------------------------------------
def test_max_positions_may_be_exactly_what_the_proxy_parses() -> None:
    """Guards ``max_positions > MAX_REPEATED_ENTRIES``: the error says "at most 65536", so 65536 itself is a valid
    setting (the proxy's walk lets exactly that many through)."""
    from ierf.serving.protocol import MAX_REPEATED_ENTRIES

    config = ServiceConfig.from_args({"models": ["a"], "ingress": {"max_positions": MAX_REPEATED_ENTRIES}})
    assert config.ingress.max_positions == MAX_REPEATED_ENTRIES
    with pytest.raises(ValueError, match=rf"max_positions must be at most {MAX_REPEATED_ENTRIES}"):
        ServiceConfig.from_args({"models": ["a"], "ingress": {"max_positions": MAX_REPEATED_ENTRIES + 1}})


def test_a_resize_equal_to_the_centre_crop_is_accepted_where_the_application_is_built() -> None:
    """Guards ``resize < crop`` in the build check: "below its centre crop" is refused, the crop itself is not
    (weights evaluated as Resize(224) + CenterCrop(224) exist; load_model takes them, so must the config)."""
    from ierf.serving.app import build_app

    build_app({"models": [{"id": "r", "name": "resnet18", "random_init": True, "resize": 224}]})
    with pytest.raises(ValueError, match=r"model 'r' \(name 'resnet18'\): resize 223 is below its centre crop 224"):
        build_app({"models": [{"id": "r", "name": "resnet18", "random_init": True, "resize": 223}]})


def test_a_config_file_sets_the_worker_replicas_shutdown_grace() -> None:
    """A downscale or redeploy stops a worker replica after ``graceful_shutdown_timeout_s`` (30 s by default): a
    job running longer is killed and its caller sees UNAVAILABLE. Operators serving long jobs raise it in the
    Serve config (README, Deploy); the option must reach the deployment."""
    from ierf.serving.app import configured_deployments
    from ierf.serving.settings import ServiceConfig

    config = ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "random_init": True}]})
    assert configured_deployments(config)["Worker_r18"]._deployment_config.graceful_shutdown_timeout_s == 30
    chosen = configured_deployments(config, {"Worker_r18": {"graceful_shutdown_timeout_s": 310}})["Worker_r18"]
    assert chosen._deployment_config.graceful_shutdown_timeout_s == 310
