"""The ways a query is answered, by name (light: the CLI's help text reads it without loading the query path)."""

from __future__ import annotations

GROUNDING_METHODS = ("fused", "content", "global", "context")  # channels of the score curves (see grounding)
BASELINES = ("random", "whole")  # what evaluation compares against: random windows, the whole video
METHODS = GROUNDING_METHODS + BASELINES
