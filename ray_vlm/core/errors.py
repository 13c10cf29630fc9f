"""One error hierarchy: every error ray-vlm raises on purpose is a ``RayVlmError`` with a stable ``code``.

- ``code`` is a class attribute, a snake_case string that names the condition for programs: HTTP clients read it
  in error bodies (``{"detail": ..., "code": ...}``), scripts may switch on it. A code keeps its meaning across
  releases; the message (``str(e)``) is for people and may change.
- Each exception class keeps its standard base (``ValueError``, ``FileNotFoundError``, ``RuntimeError``...) beside
  ``RayVlmError``, so ``except ValueError:`` catches what it always caught, and ``except RayVlmError:`` catches
  every deliberate ray-vlm error.
- ``HTTP_STATUS`` is the one table from a code to the HTTP status the service answers with (``http_status``). A
  4xx only where the client can act on it: its query (400), a video the store names whose file cannot be read
  (404). Any other error that reaches the service is the server's problem: a 500 whose body says
  ``internal error`` with code ``internal`` (the message is logged, never sent).
- The HTTP service's own answers (auth, no such video, timeout, overload...) have codes in the same table, so a
  client meets one vocabulary.

This module imports nothing else of ray-vlm: it is the bottom layer, and every layer defines its errors on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar, Final

INTERNAL: Final = "internal"

HTTP_STATUS: Final[Mapping[str, int]] = MappingProxyType({
    # raised by ray-vlm: the class that carries the code is named after it
    "error": 500,  # RayVlmError (the base; a subclass names the condition)
    "schema_invalid": 500,  # core.schema.SchemaError
    "uri_refused": 500,  # core.fs.PolicyError
    "sources_unusable": 500,  # core.fs.SourceError
    "store_error": 500,  # store.token_store.StoreError
    "store_commit_conflict": 500,  # store.token_store.CommitConflictError
    "media_unavailable": 404,  # media.frames.MediaError
    "media_not_found": 404,  # media.frames.MediaNotFoundError
    "media_refused": 404,  # media.frames.MediaPolicyError
    "media_undecodable": 404,  # media.frames.MediaDecodeError
    "media_range_invalid": 404,  # media.frames.MediaRangeError
    "media_time_invalid": 404,  # media.frames.MediaTimeError
    "encoder_unavailable": 500,  # models.base.EncoderError
    "speech_model_invalid": 500,  # models.speech.SpeechError
    "ocr_model_invalid": 500,  # models.ocr.OcrError
    "window_index_error": 500,  # query.windows.WindowIndexError
    "store_empty": 500,  # query.windows.EmptyStoreError
    "space_mismatch": 500,  # query.windows.SpaceMismatchError
    "window_index_stale": 500,  # query.windows.StaleIndexError
    "grounding_invalid": 500,  # query.grounding.GroundingError
    "query_invalid": 400,  # query.searcher.QueryError
    "answerer_unavailable": 500,  # query.qa.AnswererError
    "plot_invalid": 500,  # query.plot.PlotError
    "eval_data_invalid": 500,  # eval.metrics.EvalDataError
    "index_job_failed": 500,  # pipelines.archive_index.IndexError_
    "video_undecodable": 500,  # operators.decode.VideoDecodeError (a row's error inside a job)
    "ground_batch_invalid": 500,  # pipelines.ground_batch.GroundBatchError
    # answered by the HTTP service itself (serve.guard before the app, serve.app)
    "content_length_invalid": 400,
    "unauthorized": 401,
    "client_refused": 403,  # no token: loopback clients only
    "video_not_found": 404,
    "video_ambiguous": 404,  # a file name stem that names several videos
    "timeout": 408,
    "body_too_large": 413,
    "host_refused": 421,
    "request_invalid": 422,  # the request does not match the schema
    "headers_too_large": 431,
    "overloaded": 503,
    "unavailable": 503,  # a replica is restarting
    "starting": 503,
    INTERNAL: 500,
})


class RayVlmError(Exception):
    """Base of every error ray-vlm raises on purpose; ``code`` names the condition (see the module docstring)."""

    code: ClassVar[str] = "error"


def http_status(code: str) -> int:
    """The HTTP status for ``code`` (``HTTP_STATUS``); 500 for a code the table does not know."""
    return HTTP_STATUS.get(code, 500)
