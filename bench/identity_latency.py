#!/usr/bin/env python3
"""Connection-setup cost of token verification, with a warm JWKS cache.

Measures ``await TokenAuthenticator.authenticate(Credentials(...))``, the call the gateway
makes once per connection after the client sent its password, for

* an RS256 access token from a real OpenID Connect provider (panva's oidc-provider, the
  test suite's ``tests/oidc``; node and ``npm ci`` are needed), keys already cached;
* an ES256 token of the development issuer (a local key file).

The JWKS is fetched once before timing starts, so no iteration touches the network: this
is the per-connection CPU cost (parse, key lookup, signature, claims). The project's
target is under 1 ms per connection. Run ``.venv/bin/python bench/identity_latency.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the OIDC provider harness
try:
    import querywarden  # noqa: F401
except ImportError:  # not installed in this interpreter: use the source tree
    sys.path.insert(0, str(REPO / "proxy"))

from oidc_provider import OidcProvider  # noqa: E402
from querywarden.identity import Credentials  # noqa: E402
from querywarden.identity.authenticator import TokenAuthenticator  # noqa: E402
from querywarden.identity.dev import mint_token  # noqa: E402
from querywarden.policy import PolicyDocument  # noqa: E402

TARGET_US = 1000.0


async def measure(auth: TokenAuthenticator, token: str, iterations: int) -> list[float]:
    """Microseconds per authenticate() call, after one untimed warm-up call."""
    secret = token.encode()
    await auth.authenticate(Credentials("bench", secret, "127.0.0.1:50000"))  # warm
    samples: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        started = clock()
        await auth.authenticate(Credentials("bench", secret, "127.0.0.1:50000"))
        samples.append((clock() - started) / 1000)
    return samples


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def run(iterations: int, use_uvloop: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="qw-identity-bench-") as tmp:
        directory = Path(tmp)
        dev_key = directory / "dev-issuer.pem"
        provider = OidcProvider(ttl=3600).start(directory / "oidc", {"bench-agent": ["ai-agents"]})
        try:
            policy = PolicyDocument.model_validate(
                {
                    "identity": {
                        "issuers": [
                            {
                                "name": "oidc",
                                "issuer": provider.issuer,
                                "audiences": ["querywarden"],
                                "caFile": str(provider.ca_file),
                            },
                            {"name": "dev", "kind": "dev", "keyFile": str(dev_key)},
                        ]
                    }
                }
            )
            auth = TokenAuthenticator(policy.identity)
            cases = {
                "oidc-provider RS256": provider.token("bench-agent"),
                "dev issuer ES256": mint_token("bench", groups=["ai-agents"], key_file=dev_key),
            }

            async def main() -> dict[str, list[float]]:
                return {name: await measure(auth, tok, iterations) for name, tok in cases.items()}

            if use_uvloop:
                import uvloop

                results = uvloop.run(main())
            else:
                results = asyncio.run(main())
        finally:
            provider.stop()

    loop = "uvloop" if use_uvloop else "asyncio"
    print(f"TokenAuthenticator.authenticate(), warm key cache, N={iterations}, {loop}")
    print(f"{'token':<22} {'median us':>10} {'p99 us':>10} {'mean us':>10} {'max us':>10}")
    worst = 0.0
    for name, samples in results.items():
        median = statistics.median(samples)
        tail = p99(samples)
        worst = max(worst, tail)
        print(
            f"{name:<22} {median:>10.1f} {tail:>10.1f} "
            f"{statistics.fmean(samples):>10.1f} {max(samples):>10.1f}"
        )
    verdict = "met" if worst < TARGET_US else "NOT met"
    print(f"target: p99 under {TARGET_US:.0f} us per connection: {verdict}")
    return 0 if worst < TARGET_US else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--iterations", type=int, default=2000)
    parser.add_argument(
        "--asyncio", action="store_true", help="plain asyncio instead of uvloop (the gateway's)"
    )
    args = parser.parse_args()
    return run(args.iterations, use_uvloop=not args.asyncio)


if __name__ == "__main__":
    sys.exit(main())
