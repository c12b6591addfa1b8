"""Content detectors: what they find, what they leave alone, and that they stay linear."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from querywarden.masking import detectors
from querywarden.masking.detectors import (
    DETECTOR_NAMES,
    MAX_SCAN_BYTES,
    OVERSIZE,
    ContentScanner,
    luhn_valid,
)

ALL = ContentScanner(DETECTOR_NAMES)


def redacted(text: str, scanner: ContentScanner = ALL) -> str:
    result = scanner.scan(text)
    assert result is not None, text
    return result[0]


def fired(text: str, scanner: ContentScanner = ALL) -> tuple[str, ...]:
    result = scanner.scan(text)
    return () if result is None else result[1]


# --- the scanner --------------------------------------------------------------------------


def test_unknown_detector_is_named() -> None:
    with pytest.raises(ValueError, match="unknown content detector 'iban'"):
        ContentScanner(["ssn", "iban"])


def test_a_bare_string_is_not_a_list_of_names() -> None:
    with pytest.raises(TypeError):
        ContentScanner("ssn")


def test_names_keep_order_without_duplicates() -> None:
    scanner = ContentScanner(["email", "ssn", "email"])
    assert scanner.names == ("email", "ssn")
    assert scanner.max_scan_bytes == MAX_SCAN_BYTES == 1 << 20


def test_no_detectors_finds_nothing() -> None:
    scanner = ContentScanner([])
    assert scanner.scan("123-45-6789 bob@example.com") is None
    assert scanner.scan_bytes(b"123-45-6789", "utf-8") is None


def test_only_the_chosen_detectors_run() -> None:
    scanner = ContentScanner(["email"])
    assert scanner.scan("ssn 123-45-6789") is None
    assert scanner.scan("ssn 123-45-6789, bob@example.com") == (
        "ssn 123-45-6789, [redacted:email]",
        ("email",),
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Jane Doe",
        "Order shipped to 42 Main Street, Springfield on 2024-03-01",
        "Call 555-0100 or +1 (555) 010-0199 before 5 pm",
        "version 1.2.3, build 20240301, invoice INV-000123",
        "the task-list and the desk-lamp",
        "AKIA is not a key; neither is ghp_short nor sk-short",
        "a@b",
        "mail me at bob at example dot com",
        "no PRIVATE KEY here, only a mention",
        "eyJ on its own, eyJhbGciOiJIUzI1NiJ9 without dots",
        "x" * 5000,
        "The quick brown fox jumps over the lazy dog. " * 100,
    ],
)
def test_clean_text_returns_none(text: str) -> None:
    assert ALL.scan(text) is None
    assert ALL.scan_bytes(text.encode(), "utf-8") is None


@given(st.text(alphabet=st.characters(exclude_categories=["Nd"], exclude_characters="@")))
def test_text_without_digits_or_at_signs_and_short_words_is_clean(text: str) -> None:
    # Without digits no SSN or card; without '@' no email; the token formats need long
    # runs of ASCII letters that random unicode text practically never has.
    result = ALL.scan(text)
    assert result is None or set(result[1]) <= {"api_key", "jwt", "private_key"}


# --- ssn ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["123-45-6789", "ssn: 123 45 6789.", "(078-05-1120)", "id=219-09-9999;", "a123-45-6789b"],
)
def test_ssn_found(text: str) -> None:
    assert fired(text) == ("ssn",)
    assert "[redacted:ssn]" in redacted(text)


@pytest.mark.parametrize(
    "text",
    [
        "000-12-3456",  # area 000
        "666-12-3456",  # area 666
        "900-12-3456",  # 9xx
        "987-65-4321",
        "123-00-4567",  # group 00
        "123-45-0000",  # serial 0000
        "123-45 6789",  # mixed separators
        "123456789",  # no separators: too many other things look like that
        "1123-45-6789",  # runs into other digits
        "123-45-67890",
    ],
)
def test_ssn_not_found(text: str) -> None:
    assert "ssn" not in fired(text)


def test_ssn_redaction_keeps_surrounding_text() -> None:
    assert redacted("SSN 123-45-6789 on file") == "SSN [redacted:ssn] on file"


@given(
    area=st.integers(1, 899).filter(lambda n: n != 666),
    group=st.integers(1, 99),
    serial=st.integers(1, 9999),
    sep=st.sampled_from("- "),
    before=st.text(alphabet="abc ,;:()", max_size=10),
    after=st.text(alphabet="abc ,;:()", max_size=10),
)
def test_every_plausible_ssn_is_redacted(
    area: int, group: int, serial: int, sep: str, before: str, after: str
) -> None:
    ssn = f"{area:03d}{sep}{group:02d}{sep}{serial:04d}"
    out = redacted(before + ssn + after)
    assert ssn not in out
    assert out == before + "[redacted:ssn]" + after


# --- credit cards -------------------------------------------------------------------------

TEST_CARDS = [
    "4111111111111111",  # Visa
    "4012888888881881",
    "5555555555554444",  # Mastercard
    "2223003122003222",
    "378282246310005",  # Amex
    "6011111111111117",  # Discover
    "3530111333300000",  # JCB
    "30569309025904",  # Diners, 14 digits
    "6304000000000000",  # Maestro
    "4222222222222",  # 13 digits
    "6250941006528599",  # UnionPay
]


def test_luhn() -> None:
    for card in TEST_CARDS:
        assert luhn_valid(card), card
        broken = card[:-1] + str((int(card[-1]) + 1) % 10)
        assert not luhn_valid(broken), broken
    assert luhn_valid("0")
    assert luhn_valid("79927398713")


@pytest.mark.parametrize("card", TEST_CARDS)
def test_card_found_in_every_layout(card: str) -> None:
    layouts = [card, " ".join([card[:4], card[4:8], card[8:12], card[12:]])]
    layouts.append(layouts[1].replace(" ", "-"))
    for text in layouts:
        assert redacted(f"card {text}, thanks") == "card [redacted:credit_card], thanks"


def test_amex_grouping() -> None:
    assert fired("3782 822463 10005") == ("credit_card",)
    assert fired("3782-822463-10005") == ("credit_card",)


@pytest.mark.parametrize("card", TEST_CARDS)
def test_card_failing_luhn_is_left_alone(card: str) -> None:
    broken = card[:-1] + str((int(card[-1]) + 1) % 10)
    assert ALL.scan(f"ref {broken}") is None


def test_card_followed_by_more_digits() -> None:
    assert redacted("4111 1111 1111 1111 12/25") == "[redacted:credit_card] 12/25"
    assert redacted("4111 1111 1111 1111 123") == "[redacted:credit_card] 123"


def test_card_boundaries() -> None:
    assert ALL.scan("41111111111111110") is None  # 17 digits, not Luhn-valid
    assert "credit_card" not in fired("x" + "4111111111111111" * 2)  # 32 digits: not a card
    assert "credit_card" not in fired("4111 1111")  # too short
    assert "credit_card" not in fired("4111,1111,1111,1111")  # not a card separator


def luhn_complete(body: str) -> str:
    """``body`` plus the check digit that makes it Luhn-valid."""
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


@given(
    body=st.text(alphabet="0123456789", min_size=12, max_size=18),
    sep=st.sampled_from(["", " ", "-"]),
)
def test_every_luhn_valid_number_is_redacted(body: str, sep: str) -> None:
    card = luhn_complete(body)
    groups = [card[:4]] + [card[i : i + 4] for i in range(4, len(card), 4)]
    if sep and len(groups[-1]) < 3:  # 4-4-...-1/2 is not a card layout; merge the tail
        groups[-2:] = [groups[-2] + groups[-1]]
    text = sep.join(groups) if sep else card
    out = redacted(f"pay {text} now")
    assert out == "pay [redacted:credit_card] now"


@given(body=st.text(alphabet="0123456789", min_size=12, max_size=18))
def test_luhn_invalid_numbers_pass(body: str) -> None:
    card = luhn_complete(body)
    broken = card[:-1] + str((int(card[-1]) + 5) % 10)
    assert "credit_card" not in fired(f"ref {broken}")


# --- api keys -----------------------------------------------------------------------------

API_KEYS = [
    "AKIAIOSFODNN7EXAMPLE",
    "ASIAY34FZKBOKMUTVV7A",
    "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    "gho_16C7e42F292c6912E7710c838347Ae178B4a",
    "ghs_abcdefghijklmnopqrstuvwxyz0123456789",
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ012345",
    "xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "xoxp-123456789012-123456789012-123456789012-abcdef0123456789abcdef0123456789",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "rk_live_51H8aBcDeFgHiJkLmNoPqRsTuV",
    "AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe",
    "sk-proj-AbCdEf0123456789GhIjKlMnOpQrStUvWxYz0123",
    "sk-" + "Ab3De" * 10,
]


@pytest.mark.parametrize("key", API_KEYS)
def test_api_key_found(key: str) -> None:
    assert redacted(f"export TOKEN={key}\n") == "export TOKEN=[redacted:api_key]\n"
    assert redacted(f'{{"key": "{key}"}}') == '{"key": "[redacted:api_key]"}'


@pytest.mark.parametrize(
    "text",
    [
        "AKIAIOSFODNN7EXAMPL",  # 15 characters after the prefix
        "XAKIAIOSFODNN7EXAMPLE",  # inside a longer word
        "akiaiosfodnn7example",
        "ghp_tooShort123",
        "sk-learn-is-a-python-library-for-machine-learning",
        "sk-" + "a" * 40,  # no digits or capitals: not a random key
        "sk_test_4eC39HqLyjWDarjtT1zdp7dc",  # test keys are not secrets
        "AIzaShort",
        "xoxb-short",
    ],
)
def test_api_key_not_found(text: str) -> None:
    assert "api_key" not in fired(text)


# --- jwt ----------------------------------------------------------------------------------

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)


def test_jwt_found() -> None:
    assert redacted(f"Authorization: Bearer {JWT}") == "Authorization: Bearer [redacted:jwt]"
    unsecured = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJib2IifQ."
    assert redacted(f"token={unsecured} end") == "token=[redacted:jwt] end"


@pytest.mark.parametrize(
    "text", ["eyJhbGciOiJIUzI1NiJ9", "eyJabc.def", "xeyJhbGciOi.eyJzdWIiOi.sig", "eyJ..."]
)
def test_jwt_not_found(text: str) -> None:
    assert "jwt" not in fired(text)


# --- private keys -------------------------------------------------------------------------

KEY_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\nabc+/=\n"


@pytest.mark.parametrize("kind", ["", "RSA ", "EC ", "OPENSSH ", "ENCRYPTED ", "DSA "])
def test_private_key_block(kind: str) -> None:
    block = f"-----BEGIN {kind}PRIVATE KEY-----\n{KEY_BODY}-----END {kind}PRIVATE KEY-----"
    assert redacted(f"key:\n{block}\ntrailer") == "key:\n[redacted:private_key]\ntrailer"


def test_pgp_private_key_block() -> None:
    block = "-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBF\n-----END PGP PRIVATE KEY BLOCK-----"
    assert redacted(block + " x") == "[redacted:private_key] x"


def test_unterminated_private_key_runs_to_the_end() -> None:
    text = f"oops -----BEGIN RSA PRIVATE KEY-----\n{KEY_BODY}and 123-45-6789 too"
    assert ALL.scan(text) == ("oops [redacted:private_key]", ("ssn", "private_key"))


def test_public_key_and_certificate_pass() -> None:
    assert ALL.scan("-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----") is None
    assert ALL.scan("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----") is None


# --- email --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bob@example.com", "[redacted:email]"),
        ("Contact: a.b+tag@mail.example.co.uk.", "Contact: [redacted:email]."),
        ("<alice_99@corp-mail.io>", "<[redacted:email]>"),
        ("x@xn--bcher-kva.example", "[redacted:email]"),
        ("bob@example.com.123", "[redacted:email].123"),
    ],
)
def test_email_found(text: str, expected: str) -> None:
    assert redacted(text) == expected


@pytest.mark.parametrize("text", ["bob@localhost", "@example.com", "bob@", "a@b.c", "x@1.2.3.4"])
def test_email_not_found(text: str) -> None:
    assert "email" not in fired(text)


# --- several at once ------------------------------------------------------------------------


def test_several_detectors_in_one_value() -> None:
    text = f"ssn 123-45-6789 card 4111-1111-1111-1111 mail bob@example.com jwt {JWT}"
    assert ALL.scan(text) == (
        "ssn [redacted:ssn] card [redacted:credit_card] mail [redacted:email] jwt [redacted:jwt]",
        ("ssn", "credit_card", "jwt", "email"),
    )


def test_overlapping_matches_merge() -> None:
    # The card number is also the local part of an address: one redaction, both reported.
    assert ALL.scan("x 4111111111111111@example.com y") == (
        "x [redacted:email] y",
        ("credit_card", "email"),
    )


def test_repeated_matches() -> None:
    assert redacted("123-45-6789 and 123-45-6789") == "[redacted:ssn] and [redacted:ssn]"


FRAGMENTS = [
    "123-45-6789",
    "4111 1111 1111 1111",
    "4111111111111111",
    "bob@example.com",
    JWT,
    API_KEYS[0],
    API_KEYS[2],
    API_KEYS[-1],
    "-----BEGIN PRIVATE KEY-----",
    "-----END PRIVATE KEY-----",
    "hello",
    " ",
    "-",
    "@",
    ".",
    "2024",
    "x" * 60,
    "\u00e9\u2603",
]


@settings(max_examples=300)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join))
def test_prefilter_never_hides_a_match(text: str) -> None:
    # Whatever the prefilter skips, running every detector unconditionally finds nothing
    # more, on short values (one combined regex) and long ones (per-detector screens).
    everything = [detectors._DETECTORS[name] for name in DETECTOR_NAMES]
    assert ALL.scan(text) == detectors._redact(text, everything)
    padded = text + " " * 100
    assert ALL.scan(padded) == detectors._redact(padded, everything)


@settings(max_examples=200)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join))
def test_scan_bytes_agrees_with_scan(text: str) -> None:
    result = ALL.scan(text)
    expected = None if result is None else (result[0].encode(), result[1])
    assert ALL.scan_bytes(text.encode(), "utf-8") == expected


# --- wire values --------------------------------------------------------------------------


def test_scan_bytes_in_other_encodings() -> None:
    value = "caf\u00e9 123-45-6789".encode("latin-1")
    assert ALL.scan_bytes(value, "latin-1") == (
        "caf\u00e9 [redacted:ssn]".encode("latin-1"),
        ("ssn",),
    )
    sjis = "\u79c1\u306e 123-45-6789".encode("shift_jis")
    result = ALL.scan_bytes(sjis, "shift_jis")
    assert result is not None and result[0].decode("shift_jis") == "\u79c1\u306e [redacted:ssn]"


def test_scan_bytes_finds_secrets_among_undecodable_bytes() -> None:
    # The bytes that do not decode come back unchanged around the redaction.
    assert ALL.scan_bytes(b"\xff 123-45-6789", "utf-8") == (b"\xff [redacted:ssn]", ("ssn",))
    assert ALL.scan_bytes(b"\xff clean", "utf-8") is None


# --- bounded cost ---------------------------------------------------------------------------


def test_oversize_values_with_a_hint_are_redacted_whole() -> None:
    scanner = ContentScanner(DETECTOR_NAMES, max_scan_bytes=64)
    text = "x" * 100 + " 123-45-6789"
    # Nine digits can be an SSN, not a card number (13 or more): only ssn is hinted.
    assert scanner.scan(text) == (f"[redacted:{OVERSIZE}]", ("ssn",))
    assert scanner.scan_bytes(text.encode(), "utf-8") == (b"[redacted:oversize]", ("ssn",))
    card = "x" * 100 + " 4111 1111 1111 1111"
    assert scanner.scan(card) == (f"[redacted:{OVERSIZE}]", ("ssn", "credit_card"))
    # Even if what the hint points at is not a match: the tail is never passed unscanned.
    assert scanner.scan("y" * 100 + " @ ") == ("[redacted:oversize]", ("email",))
    # Undecodable oversize bytes with a hint are still redacted.
    assert scanner.scan_bytes(b"\xff" * 100 + b"@", "utf-8") == (b"[redacted:oversize]", ("email",))


def test_oversize_values_without_a_hint_pass() -> None:
    scanner = ContentScanner(DETECTOR_NAMES, max_scan_bytes=64)
    assert scanner.scan("plain words " * 20) is None
    assert scanner.scan_bytes(b"plain words " * 20, "utf-8") is None


def test_the_bound_counts_bytes_for_wire_values() -> None:
    scanner = ContentScanner(["email"], max_scan_bytes=64)
    text = "\u00e9" * 40 + " bob@example.com"  # 56 characters, 96 bytes
    assert scanner.scan(text) == ("\u00e9" * 40 + " [redacted:email]", ("email",))
    assert scanner.scan_bytes(text.encode(), "utf-8") == (b"[redacted:oversize]", ("email",))


ONE_MB = 1_000_000

ADVERSARIAL = {
    "digits": "7" * ONE_MB,
    "digit groups": "1234-" * (ONE_MB // 5),
    "digits and dashes": "1-" * (ONE_MB // 2),
    "digits and spaces": "1 2-3 " * (ONE_MB // 6),
    "ssn prefixes": "123-45-" * (ONE_MB // 7),
    "card groups": "4111 " * (ONE_MB // 5),
    "eyJ": "eyJ" * (ONE_MB // 3),
    "eyJ segments": "eyJxxxxx." * (ONE_MB // 9),
    "eyJ one dot": "eyJabcdef." + "a" * ONE_MB,
    "at signs": "a@" * (ONE_MB // 2),
    "dotted": "a." * (ONE_MB // 2),
    "local parts": "a@a.a@" * (ONE_MB // 6),
    "begin": "-----BEGIN PRIVATE KEY-----" * (ONE_MB // 27),
    "begin words": "-----BEGIN " + "A " * (ONE_MB // 2),
    "github_pat": "github_pat_" * (ONE_MB // 11),
    "sk-": "sk-" * (ONE_MB // 3),
    "AIza": "AIza" * (ONE_MB // 4),
    "xoxb": "xoxb-" * (ONE_MB // 5),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_input_finishes(name: str) -> None:
    # Linear-time patterns finish in well under a second here; a backtracking one would
    # not finish at all. No timing is asserted: the test finishing is the assertion.
    text = ADVERSARIAL[name]
    assert len(text) <= MAX_SCAN_BYTES
    result = ALL.scan(text)
    if result is not None:
        assert len(result[0]) <= len(text) + 64
