"""The bottom layer: column names and schemas, errors, typed configs, the URI resolver and URL policy.

Imports nothing else of ray-vlm; every other layer may import it."""
