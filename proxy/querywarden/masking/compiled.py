"""The compiled row masker (``querywarden_native``) and the setting that chooses it.

:class:`~querywarden.masking.rows.RowLayout` is written twice, as psycopg is: the pure
Python loop in ``rows.py`` is the reference and the fallback, and ``querywarden_native``
(Rust, ``native/``) runs the same loop over whole runs of DataRows, calling back into
Python only for what it does not implement itself. Both give the same bytes, errors and
counts (``tests/unit/test_native_masking.py``).

The gateway setting ``performance.native`` (``QUERYWARDEN_PERFORMANCE__NATIVE``) picks one
for the process: ``auto`` (the default) uses the compiled one when it is installed, ``on``
requires it, ``off`` uses the reference. Layouts made after :func:`select` use its choice.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Final, Literal, get_args

if TYPE_CHECKING:
    from querywarden_native import RowMasker

log = logging.getLogger(__name__)

NativeMode = Literal["auto", "on", "off"]

#: The environment variable that also overrides the gateway setting.
ENV: Final = "QUERYWARDEN_PERFORMANCE__NATIVE"


def _load() -> type[RowMasker] | None:
    try:
        from querywarden_native import RowMasker
    except ImportError:
        return None
    return RowMasker


#: The compiled class, or None when the extension is not installed.
ROW_MASKER: Final = _load()

_enabled = False


def select(mode: NativeMode) -> bool:
    """Use the compiled row masker for layouts made from now on, as ``mode`` says.

    Returns whether it is used. Raises RuntimeError for ``on`` when it is not installed.
    """
    global _enabled  # noqa: PLW0603 - one switch per process, as the setting is
    if mode == "on" and ROW_MASKER is None:
        raise RuntimeError(
            "performance.native is 'on' but the compiled row masker (querywarden_native) is "
            "not installed: build it with `pip install ./native` (make does), or set 'auto'"
        )
    _enabled = mode != "off" and ROW_MASKER is not None
    return _enabled


def enabled() -> bool:
    """Whether new layouts use the compiled row masker."""
    return _enabled


def describe() -> str:
    """Which implementation masks rows, for the start-up log."""
    if _enabled:
        return "compiled (querywarden_native)"
    if ROW_MASKER is None:
        return "pure Python (querywarden_native is not installed)"
    return "pure Python (performance.native is off)"


def _initial() -> NativeMode:
    # Before the gateway's settings are read (tests, tools), the environment decides.
    value = os.environ.get(ENV, "auto").strip().lower()
    for mode in get_args(NativeMode):
        if value == mode:
            return mode  # type: ignore[no-any-return]
    return "auto"


select("auto" if _initial() == "on" and ROW_MASKER is None else _initial())
