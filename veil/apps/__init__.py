"""The module-level Flower apps that ``flwr run`` loads (``[tool.flwr.app.components]``).

They sit above ``server/``, ``client/`` and ``simulations/`` so that nothing below needs to
know how a run was started; nothing imports them.
"""
