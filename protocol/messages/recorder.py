"""Placeholder: filled in by the message catalogue work."""

from __future__ import annotations
