"""The read side of the run store: run summaries (ε derived from recorded events) and the
dashboard's queries and exports. Nothing here writes round data."""
