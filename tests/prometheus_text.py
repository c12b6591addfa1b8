"""Reading Prometheus's text exposition format in tests, two ways.

:func:`promtext` hands the text to Prometheus's own parser (``expfmt``, built into the
tools cache as ``promtext`` by scripts/build-tools.sh): what a Prometheus server would
read. :func:`parse` is a strict reader written here from the format's description, which
also checks what expfmt tolerates (a sample before its family's TYPE, a histogram whose
buckets do not add up), so a test can compare the two and hold the text to both.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import dataclass, field
from typing import Any

import pytest

from k8s.k8sharness.tools import ToolsMissing, tool

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
_SUFFIXES = ("_bucket", "_sum", "_count", "_total")


@dataclass
class Family:
    """One metric family: its TYPE, HELP and samples ((name, labels, value) in order)."""

    kind: str
    help: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, name: str, **labels: str) -> float:
        """The value of the one sample named ``name`` whose labels include ``labels``."""
        found = [v for n, ls, v in self.samples if n == name and labels.items() <= ls.items()]
        assert len(found) == 1, (name, labels, self.samples)
        return found[0]


def parse(text: str) -> dict[str, Family]:
    """The families of ``text``; AssertionError on anything the format does not allow."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, Family] = {}
    helps: dict[str, str] = {}
    # Lines end at "\n" only: str.splitlines would also cut at U+0085 and the like, which
    # a label value may hold.
    for number, line in enumerate(text[:-1].split("\n"), start=1):
        where = f"line {number}: {line!r}"
        if not line.strip():
            continue
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert _NAME.fullmatch(name), where
            assert name not in helps, f"{where}: a second HELP"
            helps[name] = _unescape(help_text)
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert _NAME.fullmatch(name), where
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), where
            assert name not in families, f"{where}: a second TYPE"
            families[name] = Family(kind, helps.get(name, ""))
            continue
        if line.startswith("#"):
            continue
        match = _NAME.match(line)
        assert match, where
        name = match.group(0)
        rest = line[match.end() :]
        labels: dict[str, str] = {}
        if rest.startswith("{"):
            end = _labels_end(rest)
            body = rest[1:end]
            rest = rest[end + 1 :]
            position = 0
            while position < len(body):
                pair = _LABEL.match(body, position)
                assert pair, f"{where}: bad label at {body[position:]!r}"
                assert pair.group(1) not in labels, f"{where}: label twice"
                labels[pair.group(1)] = _unescape(pair.group(2))
                position = pair.end()
                if position < len(body):
                    assert body[position] == ",", where
                    position += 1
        fields = rest.split()
        assert len(fields) in (1, 2) and rest.startswith(" "), where
        value = float(fields[0])
        family = _family_of(name, families)
        assert family is not None, f"{where}: a sample before its family's TYPE"
        family.samples.append((name, labels, value))
    for base, family in families.items():
        if family.kind == "histogram":
            _check_histogram(base, family)
        if family.kind == "counter":
            assert all(n == base or n == base + "_total" for n, _, _ in family.samples), base
            assert all(v >= 0 for _, _, v in family.samples), base
    return families


def _labels_end(rest: str) -> int:
    # The closing brace outside any quoted value.
    quoted = False
    index = 1
    while index < len(rest):
        char = rest[index]
        if quoted and char == "\\":
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == "}" and not quoted:
            return index
        index += 1
    raise AssertionError(f"no closing brace in {rest!r}")


def _unescape(value: str) -> str:
    return re.sub(r"\\[\\\"n]", lambda m: _ESCAPES[m.group(0)], value)


def _family_of(name: str, families: dict[str, Family]) -> Family | None:
    if name in families:
        return families[name]
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in families:
            return families[name[: -len(suffix)]]
    return None


def _check_histogram(base: str, family: Family) -> None:
    """Buckets per series: cumulative, ending in +Inf equal to _count; one _sum."""
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for name, labels, value in family.samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        entry = series.setdefault(key, {"buckets": [], "sum": None, "count": None})
        if name == base + "_bucket":
            entry["buckets"].append((float(labels["le"]), value))
        elif name == base + "_sum":
            entry["sum"] = value
        elif name == base + "_count":
            entry["count"] = value
        else:
            raise AssertionError(f"{name} in histogram {base}")
    for key, entry in series.items():
        bounds = [b for b, _ in entry["buckets"]]
        counts = [c for _, c in entry["buckets"]]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, (base, key, bounds)
        assert counts == sorted(counts), (base, key, "buckets are not cumulative")
        assert entry["count"] == counts[-1], (base, key)
        assert entry["sum"] is not None, (base, key)


def promtext(text: str) -> dict[str, Any]:
    """``text`` as Prometheus's parser reads it: {family: {type, help, samples}}.

    Fails the test (not skips it) when the parser is not built, or does not accept the
    text, with its message.
    """
    try:
        binary = tool("promtext")
    except ToolsMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    result = subprocess.run(
        [str(binary)], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"Prometheus's parser refused the text: {result.stderr}"
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed
