"""NotificationResponse framing."""

from __future__ import annotations

import pytest

from querywarden import codec


def test_notification_response_round_trip() -> None:
    frame = codec.notification_response(4242, b"orders", "payload \u00e9")
    assert frame[:1] == b"A"
    assert codec.decode_notification(frame) == (4242, b"orders", "payload \u00e9".encode())
    with pytest.raises(codec.ProtocolViolation):
        codec.decode_notification(frame[:-1])
