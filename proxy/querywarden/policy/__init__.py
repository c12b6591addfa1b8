"""The policy document: who may connect, and (in later stages) what they may do."""

from querywarden.policy.model import PolicyDocument, load_policy

__all__ = ["PolicyDocument", "load_policy"]
