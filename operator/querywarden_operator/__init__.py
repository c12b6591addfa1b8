"""The querywarden Kubernetes operator (placeholder until the operator issue)."""
