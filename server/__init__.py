"""The coordinator: Flower ServerApp, round recording, the run store."""
