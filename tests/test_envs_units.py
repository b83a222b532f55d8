"""The env registry and the one size parser."""

from __future__ import annotations

import pytest

from kvcached import envs
from kvcached.units import SizeError, format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("512MiB", 512 << 20), ("12G", 12 << 30), ("1.5GiB", 3 << 29), ("2 MB", 2_000_000), ("1t", 1 << 40)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_percent_needs_a_total_and_at_most_100():
    assert parse_size("30%", total_bytes=1000) == 300
    with pytest.raises(SizeError, match="percentage"):
        parse_size("30%")
    with pytest.raises(SizeError, match="over 100%"):
        parse_size("130%", total_bytes=1000)


@pytest.mark.parametrize("text", ["", "-5G", "12 parsecs", "G", "1..2G"])
def test_parse_size_rejects_garbage_in_one_line(text):
    with pytest.raises(SizeError) as info:
        parse_size(text)
    assert "\n" not in str(info.value)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 << 29) == "1.5 GiB"
    assert format_bytes(200 << 20) == "200 MiB"


def test_envs_are_read_lazily_and_validated(monkeypatch):
    monkeypatch.delenv("KVCACHED_TRIM_IDLE_S", raising=False)
    assert envs.get("KVCACHED_TRIM_IDLE_S") == 0.5
    monkeypatch.setenv("KVCACHED_TRIM_IDLE_S", "0.25")
    assert envs.KVCACHED_TRIM_IDLE_S == 0.25
    monkeypatch.setenv("KVCACHED_TRIM_IDLE_S", "soon")
    with pytest.raises(envs.EnvError, match="KVCACHED_TRIM_IDLE_S='soon'"):
        envs.get("KVCACHED_TRIM_IDLE_S")
    monkeypatch.setenv("KVCACHED_HOST_CAP", "1GiB")
    assert envs.get("KVCACHED_HOST_CAP") == 1 << 30
    monkeypatch.setenv("KVCACHED_BACKEND", "tpu")
    with pytest.raises(envs.EnvError, match="accepts auto, cuda, host"):
        envs.get("KVCACHED_BACKEND")


def test_every_variable_is_documented():
    for name, _default, meaning in envs.describe():
        assert name.startswith(("KVCACHED_", "ENABLE_KVCACHED")) and meaning
    with pytest.raises(KeyError):
        envs.get("KVCACHED_NOT_A_THING")
