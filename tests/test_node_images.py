"""The test node's images (scripts/build-node-images.sh), run with podman as a pod runs them.

The fixture builds them (a no-op when nothing they are made of changed) and fails, never
skips, when one cannot be built; a missing Collector or CoreDNS binary says to run
scripts/build-tools.sh. PostgreSQL listens on a free loopback port of the host network, and
its client is psql in a second container of the same image. CoreDNS answers on port 53 in a
network namespace of its own, to glibc's resolver in a container that shares it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from image_harness import REPO, Container, container, podman, wait_until_serving
from querywarden.devcluster import free_port

PAUSE = "localhost/querywarden-pause:3.10"
POSTGRES = "localhost/querywarden-postgres:15"
OTELCOL = "localhost/querywarden-otelcol:dev"
COREDNS = "localhost/querywarden-coredns:dev"
#: The PostgreSQL image's postgres user and group, as in the official image.
POSTGRES_UID = 999
PASSWORD = "n0de-images"
PGDATA = "/var/lib/postgresql/data"


def _pin(name: str) -> str:
    """A pin of tools/versions.env, without its "v"."""
    for line in (REPO / "tools" / "versions.env").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == name:
            return value.strip().removeprefix("v")
    raise AssertionError(f"{name} is not pinned in tools/versions.env")


@pytest.fixture(scope="module", autouse=True)
def node_images() -> None:
    build = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-node-images.sh")],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=REPO,
        check=False,
    )
    if build.returncode != 0:
        pytest.fail(f"scripts/build-node-images.sh failed:\n{build.stderr}{build.stdout}")


def _config(image: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    return config


def _users(running: Container) -> set[str]:
    """Who the container's processes run as (names from the image's /etc/passwd, else uids)."""
    top = podman("top", running.name, "user").stdout.split()
    assert top[0] == "USER", top
    return set(top[1:])


def _stop(running: Container, signal: str | None, within: float) -> int:
    """Stop the container with ``signal`` (None: podman stop, the image's STOPSIGNAL).

    Its exit code, once stopped; fails if that takes longer than ``within`` seconds.
    """
    start = time.monotonic()
    if signal is None:
        podman("stop", "--time", str(int(within) + 5), running.name)
    else:
        podman("kill", "--signal", signal, running.name)
    while running.running():
        assert time.monotonic() - start < within, f"still running after {signal}:\n{running.logs()}"
        time.sleep(0.1)
    assert time.monotonic() - start < within, f"stopping took longer than {within}s"
    code = running.exit_code()
    assert code is not None
    return code


# --- pause ----------------------------------------------------------------------------------


def test_pause_is_catatonit_alone_as_65535() -> None:
    config = _config(PAUSE)
    assert config["Entrypoint"] == ["/catatonit", "-P"]
    assert config["User"] == "65535:65535"
    # FROM scratch and one static binary.
    assert int(podman("image", "inspect", "--format", "{{.Size}}", PAUSE).stdout) < 2_000_000


def test_pause_stays_up_until_sigterm() -> None:
    with container(PAUSE, [], network="none", tmpfs=()) as running:
        time.sleep(1.5)
        assert running.running(), running.logs()
        assert _users(running) == {"65535"}
        assert _stop(running, "TERM", within=3) == 0


# --- postgres -------------------------------------------------------------------------------


def _postgres_args(port: int) -> list[str]:
    # On the host's network: loopback only; log_connections shows how each client
    # authenticated.
    return ["-c", f"port={port}", "-c", "listen_addresses=127.0.0.1", "-c", "log_connections=on"]


def _wait_for_postgres(running: Container, port: int) -> None:
    # pg_isready succeeds only once the final server listens on TCP: the server initdb's
    # scripts run against listens on its Unix socket only.
    def ready() -> bool:
        probe = ["exec", running.name, "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]
        return podman(*probe, check=False).returncode == 0

    wait_until_serving(running, ready)


def _psql(
    port: int, sql: str, *, user: str = "app", dbname: str = "appdb", password: str = PASSWORD
) -> subprocess.CompletedProcess[str]:
    """psql from a second container of the image, over TCP, with a password."""
    dsn = f"host=127.0.0.1 port={port} user={user} dbname={dbname} connect_timeout=5"
    return podman(
        *("run", "--rm", "--network", "host", "--env", f"PGPASSWORD={password}", POSTGRES),
        *("psql", dsn, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql),
        check=False,
    )


def _init_scripts(tmp_path: Path) -> Path:
    scripts = tmp_path / "initdb.d"
    scripts.mkdir()
    (scripts / "01-schema.sql").write_text("CREATE TABLE t (x int);\nINSERT INTO t VALUES (1);\n")
    (scripts / "02-more.sh").write_text(
        'psql -X -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB"'
        ' -c "INSERT INTO t VALUES (2)"\n'
    )
    scripts.chmod(0o755)
    for script in scripts.iterdir():
        script.chmod(0o644)
    return scripts


def test_postgres_runs_as_the_numeric_postgres_user() -> None:
    assert _config(POSTGRES)["User"] == f"{POSTGRES_UID}:{POSTGRES_UID}"  # for runAsNonRoot
    result = podman("run", "--rm", "--network", "none", POSTGRES, "id")
    assert result.stdout.startswith(f"uid={POSTGRES_UID}(postgres) gid={POSTGRES_UID}(postgres)")


def test_postgres_initialises_an_empty_dir_and_serves_scram_over_tcp(tmp_path: Path) -> None:
    # An emptyDir at PGDATA, as a pod mounts one: root's, mode 0777.
    volume = tmp_path / "emptydir"
    volume.mkdir()
    volume.chmod(0o777)
    port = free_port()
    env = {"POSTGRES_PASSWORD": PASSWORD, "POSTGRES_USER": "app", "POSTGRES_DB": "appdb"}
    volumes = [
        (volume, PGDATA, "rw"),
        (_init_scripts(tmp_path), "/docker-entrypoint-initdb.d", "ro"),
    ]
    with container(
        POSTGRES, _postgres_args(port), volumes=volumes, env=env, read_only=False, tmpfs=()
    ) as running:
        _wait_for_postgres(running, port)
        facts = _psql(
            port,
            "SELECT (SELECT string_agg(x::text, ',' ORDER BY x) FROM t),"
            " current_user, current_database(),"
            " (SELECT string_agg(type || ' ' || address || ' ' || auth_method, ';')"
            "  FROM pg_hba_file_rules WHERE address = 'all'),"
            " (SELECT setting FROM pg_file_settings WHERE name = 'listen_addresses'"
            "  ORDER BY seqno DESC LIMIT 1),"
            " (SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'app')",
        )
        assert facts.returncode == 0, facts.stderr
        # Both init scripts ran, in order; any address may connect with SCRAM; the server
        # listens on every address unless told otherwise (here: -c listen_addresses).
        assert facts.stdout.strip() == "1,2|app|appdb|host all scram-sha-256|*|t"
        assert 'connection authenticated: identity="app" method=scram-sha-256' in running.logs()

        wrong = _psql(port, "SELECT 1", password="not-the-password")
        assert wrong.returncode != 0
        assert 'password authentication failed for user "app"' in wrong.stderr

        # Not root, the postgres user cannot own the volume's root: the cluster is in a
        # directory of its own inside.
        assert _users(running) == {"postgres"}
        assert f"the cluster goes into {PGDATA}/pgdata" in running.logs()
        assert (volume / "pgdata" / "PG_VERSION").stat().st_uid == POSTGRES_UID

        # podman stop sends the image's STOPSIGNAL, SIGINT: a fast shutdown.
        assert _stop(running, None, within=5) == 0
        assert "received fast shutdown request" in running.logs()

        # A second start finds the cluster and initialises nothing; SIGTERM (no client
        # connected) stops it as fast.
        podman("start", running.name)
        _wait_for_postgres(running, port)
        again = _psql(port, "SELECT count(*) FROM t")
        assert again.stdout.strip() == "2", again.stderr
        assert running.logs().count("initialising") == 1
        assert _stop(running, "TERM", within=5) == 0
        assert "received smart shutdown request" in running.logs()


def test_postgres_started_as_root_takes_over_a_root_owned_volume(tmp_path: Path) -> None:
    # A fresh PersistentVolume: root's, mode 0755, mounted at PGDATA itself.
    volume = tmp_path / "volume"
    volume.mkdir()
    volume.chmod(0o755)
    port = free_port()
    with container(
        POSTGRES,
        _postgres_args(port),
        volumes=[(volume, PGDATA, "rw")],
        env={"POSTGRES_PASSWORD": PASSWORD},
        read_only=False,
        tmpfs=(),
        extra_args=("--user", "0"),
    ) as running:
        _wait_for_postgres(running, port)
        result = _psql(port, "SELECT current_user", user="postgres", dbname="postgres")
        assert result.stdout.strip() == "postgres", result.stderr
        # The entrypoint chowned the volume and gave up root before starting the server.
        assert _users(running) == {"postgres"}
    stat = volume.stat()
    assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o777) == (POSTGRES_UID, POSTGRES_UID, 0o700)


def test_postgres_as_non_root_uses_a_volume_its_group_may_write(tmp_path: Path) -> None:
    # A PersistentVolume with fsGroup: 999: root's, group 999, setgid, group-writable.
    volume = tmp_path / "volume"
    volume.mkdir()
    os.chown(volume, 0, POSTGRES_UID)
    volume.chmod(0o2775)
    port = free_port()
    with container(
        POSTGRES,
        _postgres_args(port),
        volumes=[(volume, PGDATA, "rw")],
        env={"POSTGRES_PASSWORD": PASSWORD},
        read_only=False,
        tmpfs=(),
    ) as running:
        _wait_for_postgres(running, port)
        assert (volume / "pgdata" / "PG_VERSION").stat().st_uid == POSTGRES_UID


def test_postgres_as_non_root_says_why_it_cannot_use_a_volume(tmp_path: Path) -> None:
    # A fresh PersistentVolume without fsGroup: root's, mode 0755.
    volume = tmp_path / "volume"
    volume.mkdir()
    volume.chmod(0o755)
    result = podman(
        *("run", "--rm", "--network", "none", "--volume", f"{volume}:{PGDATA}:rw"),
        *("--env", f"POSTGRES_PASSWORD={PASSWORD}", POSTGRES),
        check=False,
    )
    assert result.returncode == 1
    assert f"give the pod fsGroup: {POSTGRES_UID}, or start the container as root" in result.stderr
    assert list(volume.iterdir()) == []


# --- otelcol --------------------------------------------------------------------------------

OTELCOL_CONFIG = """\
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:4318
processors:
  batch: {}
exporters:
  debug: {}
service:
  pipelines:
    traces: {receivers: [otlp], processors: [batch], exporters: [debug]}
"""


def test_otelcol_is_the_pinned_collector_as_65532() -> None:
    config = _config(OTELCOL)
    assert (config["Entrypoint"], config["User"]) == (["/otelcol"], "65532:65532")
    result = podman("run", "--rm", "--network", "none", OTELCOL, "--version")
    assert result.stdout.strip() == f"otelcol version {_pin('OTELCOL_BUILDER_VERSION')}"


def test_otelcol_runs_the_configuration_at_its_default_path(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(OTELCOL_CONFIG)
    config.chmod(0o644)
    with container(
        OTELCOL, [], volumes=[(config, "/etc/otelcol/config.yaml", "ro")], network="none", tmpfs=()
    ) as running:
        wait_until_serving(running, lambda: "Everything is ready" in running.logs())
        assert _users(running) == {"65532"}


# --- coredns --------------------------------------------------------------------------------

COREFILE = """\
.:53 {
    errors
    health :8080
    ready :8181
    log
    hosts {
        10.9.9.9 db.node.test
    }
    cache 30
    reload
    loadbalance
}
"""


def test_coredns_is_the_pinned_release_as_65532() -> None:
    config = _config(COREDNS)
    assert (config["Entrypoint"], config["User"]) == (["/coredns"], "65532:65532")
    result = podman("run", "--rm", "--network", "none", COREDNS, "-version")
    assert result.stdout.splitlines()[0] == f"CoreDNS-{_pin('COREDNS_VERSION')}"


def test_coredns_answers_on_port_53_as_non_root(tmp_path: Path) -> None:
    conf = tmp_path / "coredns"
    conf.mkdir()
    (conf / "Corefile").write_text(COREFILE)
    (conf / "Corefile").chmod(0o644)
    conf.chmod(0o755)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
    resolv.chmod(0o644)
    with container(
        COREDNS,
        ["-conf", "/etc/coredns/Corefile"],
        volumes=[(conf, "/etc/coredns", "ro")],
        network="none",
        tmpfs=(),
    ) as running:
        # CoreDNS prints its version once every server listens.
        wait_until_serving(running, lambda: "CoreDNS-" in running.logs())
        assert _users(running) == {"65532"}
        answer = podman(
            *("run", "--rm", "--network", f"container:{running.name}"),
            *("--volume", f"{resolv}:/etc/resolv.conf:ro", POSTGRES, "getent", "hosts"),
            "db.node.test",
        )
        assert answer.stdout.split() == ["10.9.9.9", "db.node.test"]
        assert "db.node.test. udp" in running.logs()


def test_coredns_binary_carries_net_bind_service(tmp_path: Path) -> None:
    # As in the official image, the capability is the binary's (a file capability):
    # without NET_BIND_SERVICE in the bounding set the kernel refuses to run it at all.
    result = podman(
        *("run", "--rm", "--network", "none", "--cap-drop", "NET_BIND_SERVICE", COREDNS),
        "-version",
        check=False,
    )
    assert result.returncode != 0
    assert "operation not permitted" in result.stderr.lower()
