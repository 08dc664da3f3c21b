"""The Redis tier against hostile values and secrets: a value under a key is at most a cheap miss, and a
Redis password never reaches a log or an error message."""

from __future__ import annotations

import gc
import json
import os
import struct
import time
import zlib

import pytest
import safetensors.torch


def _many_tensor_value(key: str, count: int) -> bytes:
    """A value with the right format, key and CRC (anyone who can write to Redis computes them) whose header
    lists ``count`` empty tensors: 5.5 MB at 100,000, far under the 64 MiB value cap."""
    from ierf.serving.cache import CODEC_FORMAT

    header: dict = {"__metadata__": {"format": CODEC_FORMAT, "key": key, "crc32": f"{zlib.crc32(b''):08x}"}}
    for i in range(count):
        header[f"t{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text


def _refuse_layout(state: dict) -> tuple[object, int]:
    """As the worker's rebuild does for tensors that are not its decomposition's layout."""
    raise ValueError(f"{len(state)} tensors do not match this replica's layout")


@pytest.mark.parametrize("count", [100_000, 9_000], ids=["5.5MB-header", "past-the-tensor-count"])
def test_a_value_with_a_huge_header_is_a_cheap_miss(
    redis_flushed: object, count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_read_header`` accepts headers up to 100 MiB, and the value is parsed as JSON, then again by
    safetensors, which builds every listed tensor, before the layout check refuses it: 100,000 empty
    tensors (5.5 MB) took 3-9 s on the worker's one compute thread, a 56 MiB value of 1,000,000 took 25 s,
    with the image's single-flight lock held, and Redis may be written again after the delete. A real
    decomposition's header is ~15 KB (about 150 tensors): a header far past that is garbage, refused
    before it is parsed."""
    import redis
    from ierf.serving.cache import RedisSettings, RedisTier, TieredCache

    key = "ierf:v1:decomposition:m:0123456789abcdef:v1-r256-c224-imagenet:srd@srd-1.0+ierf-0.1.0:" + "a" * 64
    client = redis.Redis.from_url(redis_flushed.url)  # type: ignore[attr-defined]
    client.set(key, _many_tensor_value(key, count))
    tier = RedisTier(RedisSettings(url=redis_flushed.url))  # type: ignore[attr-defined]
    cache = TieredCache(0, tier)
    parsed: list[int] = []  # refused before safetensors builds any tensor: what the time bound stands for
    monkeypatch.setattr(safetensors.torch, "load", lambda data: parsed.append(len(data)) or {})
    gc.disable()  # a collection late in a long session is no part of the refusal (0.52 s seen once in a full run)
    try:
        start = time.perf_counter()
        found = cache.get(key, _refuse_layout)
        seconds = time.perf_counter() - start
    finally:
        gc.enable()
        cache.close()
        client.close()
    assert found.value is None and found.tier == "miss"
    assert not parsed, "the value reached safetensors, which builds every listed tensor"
    assert seconds < 0.5, f"a hostile value held the compute thread {seconds:.2f} s before it was a miss"


def test_the_writer_keeps_to_the_bounds_the_reader_enforces() -> None:
    """A value the reader would refuse must never be written (it would be deleted as garbage on every
    read): past the bounds the encoder refuses, and the value stays in L1."""
    import torch
    from ierf.serving.cache import MAX_TENSORS, CodecError, decode_tensors, encode_tensors

    tensors = {f"t{i}": torch.zeros(1) for i in range(MAX_TENSORS)}
    assert len(decode_tensors("k", encode_tensors("k", tensors))) == MAX_TENSORS
    tensors["one-more"] = torch.zeros(1)
    with pytest.raises(CodecError, match="at most"):
        encode_tensors("k", tensors)
    with pytest.raises(CodecError, match="header"):
        encode_tensors("k", {"x" * (1 << 20): torch.zeros(1)})


@pytest.mark.parametrize("password", ["Zm9v/YmFy+cXV4=", "ab?cd-secret", "ab#cd-secret"])
def test_a_redis_password_with_reserved_characters_is_never_echoed(password: str) -> None:
    """README: put the password in ``IERF_REDIS_URL`` as ``redis://:PASSWORD@ierf-redis:6379/0``.
    Generated passwords often hold '/', '+', '=' (``openssl rand -base64``) or '?', '#'; unencoded, such a
    URL does not parse, and the refusal printed the whole URL (urlsplit finds no password in it, so
    ``_redacted`` left it) plus redis-py's "Port could not be cast to integer value as '<start of the
    password>'". That message stops the replica, so it lands in the replica log and in the Serve
    deployment's status, which KubeRay copies into the RayService status for anyone who can read it."""
    from ierf.serving.settings import CacheConfig, check_redis_url

    url = f"redis://:{password}@ierf-redis:6379/0"
    with pytest.raises(ValueError) as direct:
        check_redis_url(url, "redis_url")
    os.environ["IERF_SECURITY_TEST_REDIS_URL"] = url
    try:
        with pytest.raises(ValueError) as from_env:
            CacheConfig(redis_url="env:IERF_SECURITY_TEST_REDIS_URL").resolved_redis_url()
    finally:
        del os.environ["IERF_SECURITY_TEST_REDIS_URL"]
    for message in (str(direct.value), str(from_env.value)):
        fragments = [password, password[:6]]
        assert not any(f in message for f in fragments), message
