"""``run_operator``: the ``querywarden operator`` entry point."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading

import kopf

from querywarden_operator.config import OperatorConfig
from querywarden_operator.handlers import build_registry, build_settings
from querywarden_operator.kube import KubeClient, load_configuration
from querywarden_operator.reconcile import Context

log = logging.getLogger(__name__)


def run_operator(
    config: OperatorConfig | None = None,
    *,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> int:
    """Run the operator and its admission webhook until SIGINT/SIGTERM or ``stop_flag``.

    ``config`` defaults to :class:`OperatorConfig` read from the ``QUERYWARDEN_OPERATOR_*``
    environment. Blocks; returns the exit status. ``ready_flag`` is set once the
    operator has started (handlers registered, webhook server starting).
    """
    config = config if config is not None else OperatorConfig()
    kube = KubeClient(load_configuration(config.kubeconfig))
    try:
        ctx = Context.connect(kube, config)
        log.info(
            "querywarden operator: native sidecars %s, webhook on %s:%s",
            "supported" if ctx.native_supported else "not supported",
            config.webhook_host,
            config.webhook_port,
        )
        # Replicas must not tie: kopf pauses every operator of the highest priority
        # when there are two.
        priority = (
            config.priority if config.priority is not None else 1 + secrets.randbelow(1 << 30)
        )
        asyncio.run(
            kopf.operator(
                registry=build_registry(ctx),
                settings=build_settings(ctx),
                clusterwide=True,
                priority=priority,
                peering_name=config.peering_name,
                standalone=config.peering_name is None,
                liveness_endpoint=config.liveness_endpoint,
                stop_flag=stop_flag,
                ready_flag=ready_flag,
            )
        )
    finally:
        kube.close()
    return 0
