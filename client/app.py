"""The site's Flower ClientApp: local DP-SGD training and evaluation.

``build_client_app(resolve_site)`` makes the app; ``app`` (module level) is what
``flwr run .`` loads, resolving sites from the run config's scenario.

Accounting across rounds: the site keeps every DP-SGD event it ran in ``Context.state``
(which Flower persists per node for the whole run) and reports ε over that whole history
with the task's accountant. A fresh Opacus engine each round therefore cannot under-report.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import Site, SiteResolver
from client.training import evaluate, poisson_plan, train_dp_sgd
from privacy import DpSgdEvent, accountant_version, calibrate_noise_multiplier, default_delta, epsilon
from veil import protocol as P
from veil.logs import get_logger
from veil.models import build_model

log = get_logger("client")
_HISTORY = "veil.privacy-history"


def _history(context: Context) -> list[DpSgdEvent]:
    rec = context.state.get(_HISTORY)
    if not isinstance(rec, ConfigRecord):
        return []
    cols = [rec[k] for k in ("sigma", "q", "steps", "clip")]
    return [DpSgdEvent(float(s), float(q), int(n), float(c)) for s, q, n, c in zip(*cols, strict=True)]


def _append_history(context: Context, event: DpSgdEvent, sigma_planned: float) -> None:
    old = _history(context)
    rows = [*old, event]
    context.state[_HISTORY] = ConfigRecord(
        {
            "sigma": [e.noise_multiplier for e in rows],
            "q": [e.sample_rate for e in rows],
            "steps": [e.steps for e in rows],
            "clip": [e.max_grad_norm for e in rows],
            "sigma-planned": sigma_planned,
        }
    )


def _noise_multiplier(task: P.TrainTask, context: Context, n: int, delta: float) -> float:
    """The task's σ, or σ calibrated once per run so ε over all planned rounds ≤ target."""
    if task.noise_multiplier > 0:
        return task.noise_multiplier
    rec = context.state.get(_HISTORY)
    if isinstance(rec, ConfigRecord) and "sigma-planned" in rec:
        return float(rec["sigma-planned"])  # type: ignore[arg-type]
    q, steps = poisson_plan(n, task.batch_size, task.local_epochs)
    return calibrate_noise_multiplier(
        task.target_epsilon, delta, q, steps * task.planned_rounds, task.accountant_name
    )


def _task_config(msg: Message) -> ConfigRecord:
    config = msg.content.get(P.TASK)
    if not isinstance(config, ConfigRecord):
        raise ValueError(f"message has no {P.TASK!r} config record")
    return config


def _model_from(msg: Message, arch: str) -> torch.nn.Module:
    """The coordinator's model; arrays that do not fit the architecture are refused."""
    model = build_model(arch)
    arrays = msg.content.get(P.ARRAYS)
    if not isinstance(arrays, ArrayRecord):
        raise ValueError(f"message has no {P.ARRAYS!r} array record")
    try:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(f"arrays do not fit model {arch!r}: {err}") from None
    return model


def _seed(task_seed: int, site_id: str, server_round: int) -> int:
    import zlib

    return (task_seed * 1_000_003 + zlib.crc32(site_id.encode()) * 7919 + server_round) % 2**62


def build_client_app(resolve_site: SiteResolver) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site: Site = resolve_site(context)
        config = _task_config(msg)
        task = P.TrainTask.from_config(config)
        server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
        n = len(site.train)
        delta = task.delta or default_delta(n)
        if delta >= 1.0 / n:
            raise ValueError(f"{site.site_id}: δ={delta} is not below 1/n = {1.0 / n:.3g}")
        sigma = _noise_multiplier(task, context, n, delta)
        model = _model_from(msg, task.arch)
        outcome = train_dp_sgd(
            model,
            site.train,
            noise_multiplier=sigma,
            max_grad_norm=task.max_grad_norm,
            batch_size=task.batch_size,
            local_epochs=task.local_epochs,
            learning_rate=task.learning_rate,
            momentum=task.momentum,
            device=site.device,
            seed=_seed(task.seed, site.site_id, server_round),
        )
        _append_history(context, outcome.event, sigma)
        eps = epsilon(_history(context), delta, task.accountant_name)
        report = P.PrivacyReport(
            outcome.event, delta, task.accountant, accountant_version(task.accountant_name), eps
        )
        content = RecordDict(
            {
                P.ARRAYS: ArrayRecord(model.cpu().state_dict()),
                P.METRICS: MetricRecord(
                    {P.NUM_EXAMPLES: n, P.TRAIN_LOSS: outcome.mean_loss, P.EPSILON: eps}
                ),
                P.PRIVACY: report.to_config(),
                P.SITE: P.SiteInfo(site.site_id, site.device.type, outcome.seconds, len(site.test)).to_config(),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        import time

        start = time.perf_counter()
        site = resolve_site(context)
        model = _model_from(msg, str(_task_config(msg).get("arch", "")))
        out = evaluate(model, site.test, site.device)
        content = RecordDict(
            {
                P.METRICS: MetricRecord(
                    {P.NUM_EXAMPLES: out.num_examples, P.EVAL_LOSS: out.loss, P.EVAL_ACC: out.accuracy}
                ),
                P.SITE: P.SiteInfo(
                    site.site_id, site.device.type, time.perf_counter() - start, out.num_examples
                ).to_config(),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _resolve_from_run_config(context: Context) -> Site:
    """For ``flwr run .``: the scenario file named in the run config decides the data."""
    from simulations.federation import SimulatedSites
    from veil.spec import load_scenario

    scenario = load_scenario(str(context.run_config["scenario"]))
    return SimulatedSites(scenario)(context)


app = build_client_app(_resolve_from_run_config)
