"""Containers opened under the URL and demuxer policy; frames at times, thumbnails, byte ranges (above ``core``)."""
