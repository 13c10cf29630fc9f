"""The token store: what an indexing job commits and every reader reads (above ``core``)."""
