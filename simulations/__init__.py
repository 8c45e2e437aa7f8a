"""Laptop federations: partitioning, scenario files, the simulate command."""
