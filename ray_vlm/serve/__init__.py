"""The online half: a Ray Serve application answering "when does X happen?" over HTTP, with a web page.

``build_app(args)`` (``ray_vlm.serve.app``) is the ``import_path`` target of a serve config YAML
(``clusters/serve-app.yaml``); ``ray-vlm serve`` (``ray_vlm.serve.cli``) starts it locally. Ray Serve is imported
only when the app is built (install the ``serve`` extra).
"""

from __future__ import annotations

__all__ = ["ServeArgs", "build_app"]


def __getattr__(name: str):
    if name in __all__:
        from ray_vlm.serve import app

        return getattr(app, name)
    raise AttributeError(name)
