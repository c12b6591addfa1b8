"""A renewed serving certificate reaches the running gateway without a restart.

The operator renews the certificate in its Secret; the kubelet swaps the Secret volume's
``..data`` symlink, and the gateway (polling the files as it polls its policy file) loads
the new pair: new connections verify against it, and sessions opened before keep going.
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg

from gateway_harness import RunningGateway
from querywarden.tlsutil import write_self_signed
from raw_client import assert_alive, connect, wait_until
from robustness_fixtures import MakeGateway, make_gateway  # noqa: F401


def _secret_volume(root: Path, version: str) -> Path:
    """Write a new version of the pair and swap ``..data`` to it, as the kubelet does."""
    write_self_signed(root / version, "tls", hostname="localhost")
    link = root / "..data_tmp"
    link.symlink_to(version)
    os.replace(link, root / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")
    return root / version / "tls.crt"


def _verifies(gw: RunningGateway, ca: Path) -> bool:
    try:
        with connect(gw, sslmode="verify-full", sslrootcert=str(ca)) as conn:
            assert_alive(conn)
    except psycopg.OperationalError:
        return False
    return True


def test_a_renewed_certificate_is_served_and_open_sessions_stay(
    make_gateway: MakeGateway,
    tmp_path: Path,
) -> None:
    volume = tmp_path / "tls"
    volume.mkdir()
    first = _secret_volume(volume, "..v1")
    gw = make_gateway(
        tls={"certFile": str(volume / "tls.crt"), "keyFile": str(volume / "tls.key")},
        policyReloadInterval="PT0.1S",
    )
    held = [connect(gw, sslmode="verify-full", sslrootcert=str(first)) for _ in range(2)]
    try:
        for conn in held:
            assert conn.pgconn.ssl_in_use is True
            assert_alive(conn)
        second = _secret_volume(volume, "..v2")
        wait_until(lambda: _verifies(gw, second), timeout=10, what="the renewed certificate")
        # The old certificate is no longer served to new clients...
        assert not _verifies(gw, first)
        # ...and the sessions that negotiated it are still served.
        for conn in held:
            assert_alive(conn)
            assert conn.execute("SELECT 6 * 7").fetchone() == (42,)
    finally:
        for conn in held:
            conn.close()


def test_a_broken_pair_keeps_the_last_good_certificate(
    make_gateway: MakeGateway,
    tmp_path: Path,
) -> None:
    volume = tmp_path / "tls"
    volume.mkdir()
    first = _secret_volume(volume, "..v1")
    gw = make_gateway(
        tls={"certFile": str(volume / "tls.crt"), "keyFile": str(volume / "tls.key")},
        policyReloadInterval="PT0.1S",
    )
    broken = volume / "..v2"
    broken.mkdir()
    (broken / "tls.crt").write_text("not a certificate")
    (broken / "tls.key").write_text("not a key")
    link = volume / "..data_tmp"
    link.symlink_to("..v2")
    os.replace(link, volume / "..data")

    async def reload() -> bool:
        return gw.gateway.reload_tls()

    assert gw.call(reload()) is False
    assert _verifies(gw, first)
