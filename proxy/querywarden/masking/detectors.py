"""Content detectors: the backstop that redacts secrets in text values of unmarked columns.

Column masking covers what the policy marks sensitive; these detectors catch well-known
secret formats that turn up elsewhere (a card number in a ``notes`` column, a token pasted
into a comment). Sans-I/O and pure: :class:`ContentScanner` takes a string (or a wire value
and its encoding) and returns the redacted string and the names of the detectors that
fired, or ``None`` when nothing matched.

Detectors (ASCII forms only; each match becomes ``[redacted:<name>]``):

- ``ssn``: US social security numbers ``ddd-dd-dddd`` or ``ddd dd dddd`` (one separator
  used twice), not run into other digits, excluding numbers never issued: area 000, 666
  or 900-999, group 00, serial 0000.
- ``credit_card``: 13-19 digits, either contiguous or in groups (a first group of 4, then
  2-5 groups of 1-6 digits, one separator: space or dash), passing the Luhn check. If the
  whole run fails, shorter runs of its leading groups are tried (a card number followed by
  another number).
- ``api_key``: AWS access key ids (``AKIA``/``ASIA`` + 16), GitHub tokens (``ghp_``,
  ``gho_``, ``ghu_``, ``ghs_``, ``ghr_``, ``github_pat_``), Slack tokens (``xoxa-``,
  ``xoxb-``, ``xoxp-``, ``xoxr-``, ``xoxs-``), Stripe live keys (``sk_live_``,
  ``rk_live_``), Google API keys (``AIza`` + 35), and ``sk-`` keys (OpenAI and alike) of 32
  or more characters mixing digits, upper and lower case.
- ``jwt``: three base64url segments separated by dots, the first starting ``eyJ`` (the
  encoding of ``{"``); the signature may be empty (unsecured tokens still carry claims).
- ``private_key``: ``-----BEGIN ... PRIVATE KEY-----`` (also ``PRIVATE KEY BLOCK``) through
  the matching END line, or to the end of the value if there is none.
- ``email``: ``local@domain.tld`` with an alphabetic top-level domain.

Cost is bounded three ways:

- a prefilter: every match of a detector contains one of its literal hints (``@``,
  ``eyJ``, ``AKIA``, ``PRIVATE KEY``, ...) or three digits in a row, and only detectors
  whose hints occur in the value run at all. A clean value costs one regex search (short
  values) or a few substring searches (long ones).
- every pattern runs in linear time on adversarial input: repetitions are possessive or
  bounded, and each unbounded one starts behind a look-behind that forbids starting
  again inside the run just scanned, so no position is examined more than a constant
  number of times.
- values longer than ``max_scan_bytes`` (default 1 MiB; :meth:`ContentScanner.scan` counts
  characters, :meth:`ContentScanner.scan_bytes` bytes) are not scanned at all: if the
  prefilter finds a hint anywhere in them they are redacted whole as
  ``[redacted:oversize]`` (fail closed: scanning only a prefix would pass the tail
  unchecked), otherwise they pass unchanged.

Redaction rewrites the text in place, which keeps a plain string a plain string. In a json,
jsonb or xml value a match can span syntax (a card number written as a JSON number, an
unterminated key block that runs to the end), so for those types callers should treat a
non-``None`` result as "mask the whole value" (e.g. the ``redact`` strategy, which yields a
valid JSON string) and use only the detector names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import AnyStr, Final

#: Values longer than this are never scanned; see the module docstring.
MAX_SCAN_BYTES: Final = 1 << 20

#: The label used when a value is redacted whole for being too long to scan.
OVERSIZE: Final = "oversize"

Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class _Detector:
    name: str
    pattern: re.Pattern[str]
    # Every match of ``pattern`` contains one of these literals, or (digit_run) three ASCII
    # digits in a row. Checking for them is far cheaper than running ``pattern``, so it
    # decides whether ``pattern`` runs at all.
    literals: tuple[str, ...] = ()
    digit_run: bool = False
    # What to search for on long values before running ``pattern``, if not ``literals``:
    # a few single characters are found much faster than many literals.
    screen: tuple[str, ...] | None = None
    # Narrows or rejects a match (Luhn, a plausible domain); None accepts it as it is.
    accept: Callable[[re.Match[str]], Span | None] | None = None


# --- credit cards ------------------------------------------------------------------------

# Luhn: from the right, every second digit is doubled and its digits summed.
_DOUBLED: Final = {str(d): (2 * d) // 10 + (2 * d) % 10 for d in range(10)}
_SINGLE: Final = {str(d): d for d in range(10)}


def luhn_valid(digits: str) -> bool:
    """True if the ASCII digit string ``digits`` passes the Luhn check."""
    total = sum([_SINGLE[c] for c in digits[-1::-2]])
    total += sum([_DOUBLED[c] for c in digits[-2::-2]])
    return total % 10 == 0


def _accept_card(match: re.Match[str]) -> Span | None:
    separator = match[1]
    if separator is None:  # contiguous digits, 13-19 by the pattern
        return match.span() if luhn_valid(match[0]) else None
    groups = match[0].split(separator)
    for count in range(len(groups), 2, -1):
        digits = "".join(groups[:count])
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return match.start(), match.start() + len(separator.join(groups[:count]))
    return None


# --- social security numbers, api keys and emails ---------------------------------------


def _accept_ssn(match: re.Match[str]) -> Span | None:
    number = match[0]
    area, group, serial = number[:3], number[4:6], number[7:]
    # Never issued: area 000, 666 and 900-999, group 00, serial 0000.
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return None
    return match.span()


def _accept_api_key(match: re.Match[str]) -> Span | None:
    key = match[0]
    # "sk-" also starts slugs and prose ("sk-learn-..."); real keys are random base62 and
    # mix digits and both cases. The other formats have distinctive prefixes.
    if key.startswith("sk-") and not (
        any(c.isdigit() for c in key) and any(c.isupper() for c in key) and key.lower() != key
    ):
        return None
    return match.span()


def _accept_email(match: re.Match[str]) -> Span | None:
    address = match[0]
    at = address.index("@")
    labels = address[at + 1 :].split(".")
    # Drop trailing labels until the last one is a plausible top-level domain (alphabetic
    # or an IDN "xn--" label), keeping at least "domain.tld".
    while len(labels) >= 2:
        tld = labels[-1]
        if (len(tld) >= 2 and tld.isalpha()) or tld.startswith("xn--"):
            return match.start(), match.start() + at + 1 + len(".".join(labels))
        labels.pop()
    return None


# --- the detectors -------------------------------------------------------------------------

# Patterns that start with a character class or a literal let the regex engine skip
# ahead to candidate positions; their guards are therefore look-behinds placed just after
# that first character or literal (``[0-9](?<![0-9]{2})``: this digit is not preceded by
# another one).

_SSN: Final = _Detector(
    "ssn",
    re.compile(r"[0-9](?<![0-9]{2})[0-9]{2}([- ])[0-9]{2}\1[0-9]{4}(?![0-9])"),
    digit_run=True,
    accept=_accept_ssn,
)

_CREDIT_CARD: Final = _Detector(
    "credit_card",
    re.compile(
        r"[0-9](?<![0-9]{2})"
        r"(?:[0-9]{12,18}|[0-9]{3}([ -])[0-9]{1,6}(?:\1[0-9]{1,6}){1,4})(?![0-9])"
    ),
    digit_run=True,
    accept=_accept_card,
)

_API_KEY: Final = _Detector(
    "api_key",
    re.compile(
        r"A[KS]IA(?<![A-Za-z0-9]A[KS]IA)[A-Z0-9]{16}(?![A-Za-z0-9])"
        r"|AIza(?<![A-Za-z0-9_-]AIza)[A-Za-z0-9_-]{35,}+"
        r"|gh[pousr]_(?<![A-Za-z0-9]gh[pousr]_)[A-Za-z0-9]{30,}+"
        r"|github_pat_(?<![A-Za-z0-9_]github_pat_)[A-Za-z0-9_]{22,}+"
        r"|xox[abprs]-(?<![A-Za-z0-9-]xox[abprs]-)[A-Za-z0-9-]{10,}+"
        r"|rk_live_(?<![A-Za-z0-9_]rk_live_)[A-Za-z0-9]{16,}+"
        r"|sk_live_(?<![A-Za-z0-9_]sk_live_)[A-Za-z0-9]{16,}+"
        r"|sk-(?<![A-Za-z0-9_-]sk-)[A-Za-z0-9_-]{32,}+"
    ),
    literals=(
        "AKIA",
        "ASIA",
        "AIza",
        "ghp_",
        "gho_",
        "ghu_",
        "ghs_",
        "ghr_",
        "github_pat_",
        "xox",
        "k_live_",
        "sk-",
    ),
    # Every key contains 'A', '_' or '-': three single-character searches cost far less
    # than twelve substring searches.
    screen=("A", "_", "-"),
    accept=_accept_api_key,
)

_JWT: Final = _Detector(
    "jwt",
    re.compile(r"eyJ(?<![A-Za-z0-9_-]eyJ)[A-Za-z0-9_-]{5,}+\.[A-Za-z0-9_-]{5,}+\.[A-Za-z0-9_-]*+"),
    literals=("eyJ",),
)

_PRIVATE_KEY: Final = _Detector(
    "private_key",
    re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----"
        r".*?(?:-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----|\Z)",
        re.DOTALL,
    ),
    literals=("PRIVATE KEY",),
)

_EMAIL: Final = _Detector(
    "email",
    re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]++@[A-Za-z0-9-]++(?:\.[A-Za-z0-9-]++)++"),
    literals=("@",),
    accept=_accept_email,
)

_DETECTORS: Final = {d.name: d for d in (_SSN, _CREDIT_CARD, _API_KEY, _JWT, _PRIVATE_KEY, _EMAIL)}

#: Every detector name a policy may list.
DETECTOR_NAMES: Final[tuple[str, ...]] = tuple(_DETECTORS)


# Detectors whose matches are digit runs need at least this many ASCII digits in the value
# (an SSN has 9, a card number 13 to 19): counting digits is one C-speed translate, and
# most text (names, notes, "customer 12345") has fewer, so they need not run at all.
_MIN_DIGITS: Final = {"ssn": 9, "credit_card": 13}
_NO_DIGITS_TEXT: Final = str.maketrans("", "", "0123456789")


def _digits(value: str | bytes) -> int:
    """How many ASCII digits ``value`` holds."""
    if isinstance(value, bytes):
        return len(value) - len(value.translate(None, b"0123456789"))
    return len(value) - len(value.translate(_NO_DIGITS_TEXT))


# Up to this length one regex of all the hints is the quickest way to see a clean value;
# beyond it, substring searches win (the regex engine tries every hint at every position,
# while ``in`` skips through the text).
_SHORT: Final = 48

# (detector, literals one of which its matches contain, digits its matches need (0: none))
_Gate = tuple[_Detector, tuple[AnyStr, ...], int]


class ContentScanner:
    """Finds and redacts secrets with the named detectors (see the module docstring)."""

    __slots__ = (
        "_any_hint",
        "_any_hint_bytes",
        "_gates",
        "_gates_bytes",
        "_hints",
        "_hints_bytes",
        "_min_digits",
        "max_scan_bytes",
        "names",
    )

    def __init__(self, detectors: Sequence[str], *, max_scan_bytes: int = MAX_SCAN_BYTES) -> None:
        """Compile a scanner; raises ValueError naming an unknown detector."""
        if isinstance(detectors, str):
            raise TypeError("detectors must be a sequence of names, not one string")
        names: list[str] = []
        for name in detectors:
            if name not in _DETECTORS:
                known = ", ".join(DETECTOR_NAMES)
                raise ValueError(f"unknown content detector {name!r} (known: {known})")
            if name not in names:
                names.append(name)
        #: The detectors this scanner runs, in the order given (duplicates dropped).
        self.names: tuple[str, ...] = tuple(names)
        self.max_scan_bytes = max_scan_bytes
        chosen = [_DETECTORS[name] for name in names]
        # The hints are ASCII, so the same literals find them in the bytes of any
        # ASCII-compatible encoding (all PostgreSQL client encodings are).
        screens = [d.literals if d.screen is None else d.screen for d in chosen]
        self._gates, self._gates_bytes = _gates(chosen, screens)
        self._hints, self._hints_bytes = _gates(chosen, [d.literals for d in chosen])
        hints = sorted({re.escape(lit) for d in chosen for lit in d.literals})
        any_hint = "|".join(hints)
        # The literal hints of every detector in one regex; digit runs are counted apart.
        self._any_hint = re.compile(any_hint) if hints else None
        self._any_hint_bytes = re.compile(any_hint.encode("ascii")) if hints else None
        needs = [_MIN_DIGITS.get(d.name, 3) for d in chosen if d.digit_run]
        self._min_digits = min(needs) if needs else None

    @property
    def prefilter(self) -> tuple[tuple[bytes, ...], int | None]:
        """What every match of this scanner's detectors contains, in a wire value.

        (ASCII literals, fewest ASCII digits): a value holding none of the literals and
        fewer digits than that (None: no digit-run detector) cannot match, so
        :meth:`scan_bytes` returns None for it. The compiled row masker skips the call on
        such values.
        """
        literals = dict.fromkeys(hint for _, hints, _ in self._hints_bytes for hint in hints)
        return tuple(literals), self._min_digits

    def _clean(self, value: AnyStr, any_hint: re.Pattern[AnyStr] | None, digits: int) -> bool:
        """Whether no detector can match: no literal hint, too few digits for the rest."""
        if self._min_digits is not None and digits >= self._min_digits:
            return False
        if any_hint is None:
            return True
        # Short values: one regex of every hint. Longer ones go to the per-detector
        # substring checks, which skip through the text faster.
        return len(value) <= _SHORT and any_hint.search(value) is None

    def scan(self, text: str) -> tuple[str, tuple[str, ...]] | None:
        """Redact every match in ``text``: (redacted text, detector names), or ``None``.

        Texts longer than ``max_scan_bytes`` characters are redacted whole if a hint of
        any detector occurs in them (see the module docstring).
        """
        digits = _digits(text) if self._min_digits is not None else 0
        if self._clean(text, self._any_hint, digits):
            return None
        if len(text) > self.max_scan_bytes:
            hinted = _gated(self._hints, text, digits)
            return (_OVERSIZE_TEXT, tuple(d.name for d in hinted)) if hinted else None
        active = _gated(self._gates, text, digits)
        return _redact(text, active) if active else None

    def scan_bytes(self, value: bytes, encoding: str) -> tuple[bytes, tuple[str, ...]] | None:
        """As :meth:`scan`, for a wire value in the Python codec ``encoding``.

        Returns ``None`` when nothing matched. Bytes that do not decode in ``encoding``
        are kept as they are (``surrogateescape``), so a secret written in ASCII among
        them is still found and replaced.
        The length bound counts bytes and is applied before decoding.
        """
        digits = _digits(value) if self._min_digits is not None else 0
        if self._clean(value, self._any_hint_bytes, digits):
            return None
        if len(value) > self.max_scan_bytes:
            hinted = _gated(self._hints_bytes, value, digits)
            return (_OVERSIZE_BYTES, tuple(d.name for d in hinted)) if hinted else None
        active = _gated(self._gates_bytes, value, digits)
        if not active:
            return None
        try:
            # Undecodable bytes survive as surrogates, so ASCII secrets among them are
            # still found and the bytes around them come back as they were.
            text = value.decode(encoding, "surrogateescape")
        except UnicodeDecodeError:  # codecs without surrogateescape support
            return None
        result = _redact(text, active)
        if result is None:
            return None
        redacted, fired = result
        try:
            return redacted.encode(encoding, "surrogateescape"), fired
        except UnicodeEncodeError:  # not expected: the text came from this encoding
            return _OVERSIZE_BYTES, fired


def _gates(
    chosen: list[_Detector], literals: list[tuple[str, ...]]
) -> tuple[tuple[_Gate[str], ...], tuple[_Gate[bytes], ...]]:
    """Gates for ``chosen`` detectors on the given literals, for text and for bytes."""
    pairs = list(zip(chosen, literals, strict=True))
    need = [_MIN_DIGITS.get(d.name, 3) if d.digit_run else 0 for d, _ in pairs]
    text = tuple((d, lits, n) for (d, lits), n in zip(pairs, need, strict=True))
    raw = tuple(
        (d, tuple(lit.encode("ascii") for lit in lits), n)
        for (d, lits), n in zip(pairs, need, strict=True)
    )
    return text, raw


def _gated(gates: tuple[_Gate[AnyStr], ...], value: AnyStr, digits: int) -> list[_Detector]:
    """The detectors whose hints occur in ``value``: the only ones that can match."""
    active: list[_Detector] = []
    for detector, literals, needs_digits in gates:
        if needs_digits:
            if digits >= needs_digits:
                active.append(detector)
        elif any(literal in value for literal in literals):
            active.append(detector)
    return active


def _redact(text: str, detectors: list[_Detector]) -> tuple[str, tuple[str, ...]] | None:
    """Replace every match of ``detectors`` in ``text``; ``None`` if there is none."""
    spans: list[tuple[int, int, str]] = []
    for detector in detectors:
        accept = detector.accept
        for match in detector.pattern.finditer(text):
            span = match.span() if accept is None else accept(match)
            if span is not None and span[0] < span[1]:
                spans.append((span[0], span[1], detector.name))
    if not spans:
        return None
    # Earliest first, longest first among equals; overlapping matches (a card number
    # inside an email address) merge into one redaction named after the first.
    spans.sort(key=lambda s: (s[0], -s[1]))
    parts: list[str] = []
    fired = {spans[0][2]}
    position = 0
    start, end, name = spans[0]
    for next_start, next_end, next_name in spans[1:]:
        fired.add(next_name)
        if next_start < end:
            end = max(end, next_end)
            continue
        parts += (text[position:start], "[redacted:", name, "]")
        position = end
        start, end, name = next_start, next_end, next_name
    parts += (text[position:start], "[redacted:", name, "]", text[end:])
    # Report in the scanner's order (the order of ``detectors``), once each.
    return "".join(parts), tuple(d.name for d in detectors if d.name in fired)


_OVERSIZE_TEXT: Final = f"[redacted:{OVERSIZE}]"
_OVERSIZE_BYTES: Final = _OVERSIZE_TEXT.encode("ascii")
