"""ray-vlm: make video archives searchable by time on Ray."""

__version__ = "0.1.0"
