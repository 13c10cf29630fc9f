"""Moment-retrieval metrics, bit for bit the reference evaluation's, and evaluation runs (above ``query``)."""
