"""Round 13 mutation testing: checks on the round's SDK, CLI, worker and deploy changes that no earlier test pinned
down. Each test here fails on a small mutant of the product code that the rest of the suite let through."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from ierf_client import AsyncClient, Client, IerfError, RetryPolicy
from ierf_proto.v1 import explainer_pb2 as pb
from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

LONG_ID = "resnet18_imagenet_finetuned_v2"  # longer than the CLI's 20-character minimum column


class _Recorder(pb_grpc.ExplainServiceServicer):
    """Records what Explain/ComputeIERF received, then refuses; ListModels answers a long id and the default."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def Explain(self, request: Any, context: Any) -> Any:
        self.seen.append(request)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "recorded")

    def ComputeIERF(self, request: Any, context: Any) -> Any:
        self.seen.append(request)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "recorded")

    def ListModels(self, request: Any, context: Any) -> Any:
        spec = pb.InputSpec(preprocess_version="resize256-crop224-v2")
        models = [pb.ModelInfo(id=LONG_ID, input=spec), pb.ModelInfo(id="b", input=spec)]
        return pb.ListModelsResponse(models=models, default_model_id="b")


@pytest.fixture
def server() -> Any:
    recorder = _Recorder()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ExplainServiceServicer_to_server(recorder, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield f"127.0.0.1:{port}", recorder
    grpc_server.stop(None)


def test_numpy_booleans_are_flags(server: Any) -> None:
    """check_flag takes numpy's booleans (a mask's element, ``arr.any()``) as True/False: they reach the server."""
    address, recorder = server
    pixels = np.zeros((8, 8, 3), np.uint8)
    with Client(address, timeout=5, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(IerfError, match="recorded"):
            client.explain(pixels, overlay=np.bool_(True), return_input=np.bool_(True))
        with pytest.raises(IerfError, match="recorded"):
            client.ierf(pixels, "layer1", [(0, 0)], overlay=np.bool_(True), return_input=np.bool_(False))
    assert [(r.overlay, r.return_input) for r in recorder.seen] == [(True, True), (True, False)]


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize("value", [2**20, 2**31 - 1, np.int64(64 * 2**20)], ids=["1MiB", "int32-max", "numpy"])
def test_max_message_bytes_takes_its_whole_documented_range(cls: type, value: object, monkeypatch) -> None:
    """max_message_bytes is "1 MiB to 2 GiB - 1", both ends included, and a numpy integer is an int; the channel
    gets a plain int (grpc drops anything else without a word)."""
    seen: dict[str, Any] = {}
    real = grpc.insecure_channel

    def recording(target: str, options: Any = None, *args: Any, **kwargs: Any) -> Any:
        seen.update(dict(options or []))
        return real(target, options, *args, **kwargs)

    monkeypatch.setattr(grpc, "insecure_channel", recording)
    client = cls("127.0.0.1:1", max_message_bytes=value)
    try:
        options = dict(client._options) if cls is AsyncClient else seen
        assert options["grpc.max_receive_message_length"] == int(value)  # type: ignore[call-overload]
        assert type(options["grpc.max_receive_message_length"]) is int
    finally:
        if cls is AsyncClient:
            asyncio.run(client.close())
        else:
            client.close()


def test_the_cli_models_table_stays_aligned_with_a_long_model_id(
    server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ierf --server ADDR models` widens the id column for ids past 20 characters ("<id> (default)" among
    them), so every row's preprocessing starts under the header's."""
    from ierf.cli import main

    address, _ = server
    assert main(["--server", address, "models"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    column = header.index("preprocessing")
    assert len(rows) == 2
    for row in rows:
        assert row.index("resize256-crop224-v2") == column, (header, rows)


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_a_bool_message_limit_is_a_type_error(cls: type) -> None:
    """True is not a number of bytes: refused as the wrong type (TypeError), not as a 1-byte limit out of range."""
    with pytest.raises(TypeError, match="max_message_bytes must be an int"):
        cls("127.0.0.1:1", max_message_bytes=True)


@pytest.fixture(scope="module")
def host() -> Any:
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    config = ServiceConfig.from_args(
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True}], "cache": {"redis_url": None}}
    )
    return ModelHost(config.models[0], config.cache)


def test_every_cache_key_and_the_provenance_carry_the_engine_digest(host: Any) -> None:
    """The engine digest only protects a shared Redis if it is in the keys: the logits' key (the forward's
    version) and a method's key and provenance (the method's version) all carry it."""
    from ierf.serving.worker import FORWARD_METHOD, engine_code_digest

    digest = engine_code_digest()
    assert digest in host._key("logits", FORWARD_METHOD, "h")
    assert digest in host._key("decomposition", "srd", "h")
    assert host._provenance("srd", "h").method_version.endswith(f".{digest}")


def test_the_async_client_keeps_the_servers_default_model(server: Any) -> None:
    """AsyncClient.models() returns a ModelList with ListModels' default_model_id, as Client.models() does."""
    address, _ = server

    async def call() -> Any:
        async with AsyncClient(address, timeout=5) as client:
            return await client.models()

    models = asyncio.run(call())
    assert [m.id for m in models] == [LONG_ID, "b"] and models.default_model_id == "b"


def test_a_proxy_cap_exactly_the_image_cap_plus_overhead_is_enough() -> None:
    """RAY_SERVE_GRPC_MAX_MESSAGE_SIZE equal to max_image_bytes + the request overhead carries every image the
    ingress accepts: it is taken (the boundary), one byte less is refused."""
    from ierf.serving.settings import GRPC_MAX_MESSAGE_ENV, GRPC_REQUEST_OVERHEAD_BYTES, grpc_max_message_bytes

    needed = 8 * 2**20 + GRPC_REQUEST_OVERHEAD_BYTES
    assert grpc_max_message_bytes(8 * 2**20, {GRPC_MAX_MESSAGE_ENV: str(needed)}) == needed
    with pytest.raises(ValueError, match="max_image_bytes"):
        grpc_max_message_bytes(8 * 2**20, {GRPC_MAX_MESSAGE_ENV: str(needed - 1)})


def test_a_class_contrast_overlay_names_the_subtracted_class_not_the_target(host: Any, monkeypatch) -> None:
    """The caption of "class 5 minus class 7" names class 7 by its own name: the audit test accepts the bare
    number, so the contrast's name could have been the target's."""
    import ierf.viz as viz
    from ierf.serving.images import canonicalise
    from ierf.serving.worker import ExplainJob

    captions: list[str] = []
    real = viz.overlay_signed

    def spy(*args: Any, **kwargs: Any) -> Any:
        captions.append(kwargs.get("caption") or "")
        return real(*args, **kwargs)

    monkeypatch.setattr(viz, "overlay_signed", spy)
    image = canonicalise(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    host.explain(ExplainJob(image.pixels, image.content_hash, target=5, contrast=7, overlay=True))
    names = host.model.class_names
    assert names[5] != names[7]
    (caption,) = captions
    assert caption.endswith(f"minus 7 {names[7]!r}"), caption


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_make_run_hands_a_relative_config_to_the_launcher_as_an_absolute_path(tmp_path: Path) -> None:
    """CONFIG is named relative to where make runs; the launcher (which may change directory, and whose Serve
    processes do) gets it as an absolute --config, as the Makefile's $(abspath) promises."""
    import os

    from serving.test_operator_findings import ROOT, _detached, _end, _make

    bin_dir, run = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    run.mkdir()
    args_file = tmp_path / "args"
    fake = bin_dir / "python"  # stands in for the launcher: records its arguments, says ready, then waits
    fake.write_text(
        "#!/bin/bash\n"
        'echo "$@" > "$IERF_TEST_ARGS"\n'
        'while [ $# -gt 0 ]; do [ "$1" = --ready-file ] && touch "$2"; shift; done\n'
        "exec sleep 300\n"
    )
    fake.chmod(0o755)
    config = tmp_path / "two-models.yaml"
    config.write_text("applications: []\n")
    relative = os.path.relpath(config, ROOT)
    assert not os.path.isabs(relative)
    redis = _detached(name="redis-server")
    (run / "redis.pid").write_text(f"{redis}\n")
    (run / "redis.port").write_text("16379\n")
    ports = ["GRPC_PORT=19001", "METRICS_PORT=18081", "HTTP_PORT=18001", "REDIS_PORT=16379"]
    try:
        started = _make(
            "start",
            f"RUN_DIR={run}",
            f"BIN={bin_dir}",
            f"CONFIG={relative}",
            *ports,
            env={"IERF_TEST_ARGS": str(args_file)},
        )
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"serve --config {config.resolve()} --grpc-port 19001" in args_file.read_text()
    finally:
        with contextlib.suppress(OSError, ValueError):
            _end(int((run / "service.pid").read_text()))
        _end(redis)


def _alert_rules() -> dict[str, dict[str, Any]]:
    import yaml

    from serving.test_operator_findings import ROOT

    doc = yaml.safe_load((ROOT / "deploy" / "k8s" / "alerts.yaml").read_text())
    return {r["alert"]: r for g in doc["spec"]["groups"] for r in g["rules"] if "alert" in r}


def test_every_alert_says_what_it_is_in_a_summary() -> None:
    """The pager shows the summary: a rule without one pages with its bare name."""
    rules = _alert_rules()
    assert "IerfTimingOut" in rules
    missing = [name for name, rule in rules.items() if not rule.get("annotations", {}).get("summary")]
    assert not missing, f"alerts without a summary: {missing}"
    unlabelled = [name for name, rule in rules.items() if rule.get("labels", {}).get("severity") is None]
    assert not unlabelled, f"alerts without a severity: {unlabelled}"


def test_ratio_alerts_fire_on_a_fraction_of_requests() -> None:
    """IerfServerErrors and IerfTimingOut divide failures by all requests: a threshold of 1 or more could never
    be crossed, and each summary's percentage must be the threshold it states."""
    import re

    rules = _alert_rules()
    for name in ("IerfServerErrors", "IerfTimingOut"):
        threshold = float(re.findall(r">\s*([0-9.]+)\s*$", rules[name]["expr"].strip())[-1])
        assert 0 < threshold < 1, (name, threshold)
        stated = float(re.search(r"over ([0-9.]+) %", rules[name]["annotations"]["summary"]).group(1))
        assert stated == pytest.approx(threshold * 100), (name, threshold, stated)
