"""The engine versions kvcached supports, stated once.

Patches check the running engine against these ranges at start (and fail loudly outside
them); ``kvctl doctor`` checks the installed ones. Reading a version here never imports
the engine: ``importlib.metadata`` reads the installed distribution's metadata.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata

__all__ = ["SUPPORTED", "EngineVersion", "VersionRange", "VersionRanges", "check_installed", "installed_version", "parse_version", "require_supported"]

_RELEASE_RE = re.compile(r"^\s*v?(\d+(?:\.\d+)*)")


def parse_version(text: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``"0.26.0+cu128"`` → ``(0, 26, 0)``.

    Pre-release and local suffixes are dropped, so ``0.21.0rc1`` counts as ``0.21.0``.

    Raises:
        ValueError: no leading release number.
    """
    match = _RELEASE_RE.match(text)
    if not match:
        raise ValueError(f"cannot read a version number from {text!r}")
    numbers = [int(part) for part in match.group(1).split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()  # 0.5 == 0.5.0
    return tuple(numbers)


@dataclass(frozen=True)
class VersionRange:
    """Inclusive range ``[low, high]`` of release versions."""

    low: str
    high: str

    def __contains__(self, version: object) -> bool:
        if not isinstance(version, str):
            return False
        try:
            release = parse_version(version)
        except ValueError:
            return False
        return parse_version(self.low) <= release <= parse_version(self.high)

    def __str__(self) -> str:
        return f"{self.low}–{self.high}"


@dataclass(frozen=True)
class VersionRanges:
    """A union of inclusive ranges, e.g. SGLang 0.5.17 and 0.5.23 without the releases between."""

    ranges: tuple[VersionRange, ...]

    def __contains__(self, version: object) -> bool:
        return any(version in span for span in self.ranges)

    def __str__(self) -> str:
        return " and ".join(span.low if span.low == span.high else str(span) for span in self.ranges)


SUPPORTED: dict[str, VersionRanges] = {
    "vllm": VersionRanges((VersionRange("0.26.0", "0.34.0"),)),
    # one patch package per entry: kvcached.integrations.sglang.RANGES
    "sglang": VersionRanges((VersionRange("0.5.17", "0.5.17"), VersionRange("0.5.23", "0.5.23"))),
}


@dataclass(frozen=True)
class EngineVersion:
    """What is installed of one engine. ``version`` None: not installed."""

    engine: str
    version: str | None
    supported: VersionRanges

    @property
    def installed(self) -> bool:
        return self.version is not None

    @property
    def ok(self) -> bool:
        """Installed and inside the supported range."""
        return self.version is not None and self.version in self.supported


def require_supported(engine: str, display_name: str, version: str) -> None:
    """Stop an engine outside the supported range, naming the range.

    Raises:
        RuntimeError: ``version`` of ``engine`` is not supported.
    """
    supported = SUPPORTED[engine]
    if version not in supported:
        raise RuntimeError(
            f"kvcached supports {display_name} {supported}, found {version}; "
            f"install a supported {display_name} or unset ENABLE_KVCACHED to run without kvcached"
        )


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None if it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def check_installed() -> list[EngineVersion]:
    """Each supported engine with its installed version (None if absent)."""
    return [EngineVersion(name, installed_version(name), span) for name, span in SUPPORTED.items()]
