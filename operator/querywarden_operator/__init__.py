"""The querywarden Kubernetes operator (kopf).

It watches ``DatabaseAccessPolicy`` resources, renders each one's ConfigMap (the policy
the sidecar loads, and its gateway settings) and NetworkPolicy, and injects the gateway
as a sidecar into the pods a policy selects, through a mutating admission webhook. See
docs/operator.md.

Public API: :func:`run_operator` and :class:`OperatorConfig`; the pure rendering
functions are in :mod:`querywarden_operator.render`.
"""

from querywarden_operator.config import OperatorConfig
from querywarden_operator.run import run_operator

__all__ = ["OperatorConfig", "run_operator"]
