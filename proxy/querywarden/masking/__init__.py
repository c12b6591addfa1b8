"""Inline masking of sensitive values."""
