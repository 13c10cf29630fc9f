"""Fixtures of the Serve tests: a token store indexed from two real sample clips (once per session). The third
clip (carphone) is indexed into the same store by a test, to show that new videos appear without a restart."""

from __future__ import annotations

import pytest
from serve_helpers import FIRST_CLIPS, index_clips


@pytest.fixture(scope="session")
def serve_store(ray_local, tmp_path_factory):
    """A committed token store of bigbuckbunny.mp4 and bikes.mp4 (indexed by the real job)."""
    store = tmp_path_factory.mktemp("serve") / "store"
    index_clips(store, FIRST_CLIPS)
    return store
