"""Answering "when does X happen?": window index and ANN, grounding, the Searcher, QA (above store, media, models)."""
