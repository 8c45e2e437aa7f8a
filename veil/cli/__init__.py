"""The ``veil`` command line: the shell over the core. Nothing imports it.

``main`` is typer wiring only; each command group lives in its own module beside the
rendering, report, plotting, certificate and Flower-process helpers the commands use.
"""
