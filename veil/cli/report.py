"""`veil report`: a self-contained privacy report of one run (Markdown + HTML with the plots).

Everything in it is read from the run store; ε is recomputed there from the stored events.
Labels are exact: the guarantee is sample-level (ε, δ)-DP per site from DP-SGD; evaluation
metrics, example counts and train loss are *not* differentially private, and the report
says so.

Stored strings are made safe twice: ``clean`` (no control characters, bounded length) and then
escaped for the format: Markdown punctuation in paragraphs and table cells, HTML entities in the
page. A stored value that failed its check is written as "invalid" and listed with its reason.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privacy.accounting import ACCOUNTANTS, DESCRIPTIONS
from veil.cli.render import CELL, INVALID, LINE, checked, clean, eps, exp, fmt, mb

if TYPE_CHECKING:
    from server.read.dashboard import MetricSeries
    from server.read.summary import RunSummary, SiteMechanism, SiteRow

# what can start emphasis, code, a link, raw HTML, a table cell or an entity mid-line (values
# never start a line, so block markers like "#", "-" and "1." need no escape)
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&$])")
TABLE_CELL = 200
_CODE_SAFE = re.compile(r"[A-Za-z0-9._:/+@=-]{1,80}")


def md(value: object, limit: int = CELL) -> str:
    """A stored value for Markdown text: cleaned, then every Markdown punctuation mark escaped."""
    return _MD_SPECIAL.sub(r"\\\1", clean(value, limit))


def code(value: object) -> str:
    """A stored identifier as inline code when it is plainly one, else as escaped text."""
    shown = str(value)
    return f"`{shown}`" if _CODE_SAFE.fullmatch(shown) else md(value)

@dataclass
class Block:
    """One piece of the report (heading, paragraph, list, table or image), rendered alike to Markdown and HTML."""

    kind: str  # h1 | h2 | p | list | table | image
    text: str = ""
    items: list[str] | None = None
    header: list[str] | None = None
    rows: list[list[str]] | None = None


def _mechanism_cells(m: SiteMechanism | None, invalid: bool) -> list[str]:
    """σ, q, steps, C of a site's mechanism as table cells ("-" for a site that never trained)."""
    if invalid:
        return [INVALID] * 4
    if m is None:
        return [fmt(None)] * 4
    return [fmt(m.min_noise_multiplier), fmt(m.max_sample_rate, 4), fmt(m.steps), fmt(m.max_grad_norm, 2)]


def _site_cells(site: SiteRow, mechanism: SiteMechanism | None) -> list[str]:
    bad = site.problems
    return [site.site, checked(bad, "num_train", str(site.num_train or 0)), str(site.rounds_joined),
            *_mechanism_cells(mechanism, "epsilon" in bad),
            checked(bad, "epsilon", eps(site.epsilon)), checked(bad, "delta", exp(site.delta)),
            checked(bad, "lifetime_epsilon", eps(site.lifetime_epsilon) + (
                f" NOT PRIVATE (+{site.lifetime_without_dp} rounds without DP)"
                if site.lifetime_without_dp else "")),
            checked(bad, "epsilon_cap", f"{site.epsilon_cap:g}" if site.epsilon_cap is not None else "none"),
            INVALID if {"epsilon_cap", "lifetime_epsilon"} & set(bad) else eps(site.remaining)]


def _v(table: dict[str, Any], key: str) -> str:
    """A spec value for the report's text: escaped, short, ``?`` when missing."""
    return md(table.get(key, "?"), 40)


def build(summary: RunSummary, png_name: str, accountant_versions: dict[str, str],
          mechanisms: dict[str, SiteMechanism]) -> list[Block]:
    """The report's blocks for one run: what was trained, the DP mechanism and ε per site, encryption, caveats.

    A run without DP (``privacy: none``) gets no ε, δ, accountant or mechanism anywhere: it is said
    to be not private at the top, in its mechanism section and in its caveats."""
    from server.read.summary import section

    s, spec = summary, summary.spec
    data, train = section(spec, "data"), section(spec, "training")
    trained = [site for site in s.sites if site.rounds_joined > 0]
    final = s.final
    status = f"invalid ({md(s.status, 24)})" if "status" in s.problems else md(s.status, 24)
    blocks = [Block("h1", f"Privacy report: run {s.run_id} ({md(s.name)})")]
    blocks.append(Block("p", f"Status **{status}**; {md(s.mode, 24)}; created {s.created_at} (UTC); "
                             f"seed {s.seed}; spec sha256 {code(s.spec_hash)}; Veil {md(s.code_version, 64)}; "
                             f"requested by {md(s.researcher) if s.researcher else 'nobody recorded'}."))
    if s.without_dp:
        blocks.append(Block("p", "**This run is NOT private.** It trained without differential privacy (the "
                                 "non-private baseline): no ε or δ applies to it, and this report states none."))
    if s.error:
        blocks.append(Block("p", f"Error recorded: {md(s.error, LINE)}"))

    blocks.append(Block("h2", "What was trained"))
    acc = (INVALID if final and "accuracy" in final.problems
           else "encrypted (decrypt with `--key`)" if final and final.encrypted and final.accuracy is None
           else fmt(final.accuracy, 4) if final else "none")
    data_line = (
        "data: each site's own records (a deployed federation; the data never left the sites)."
        if s.mode == "deployment" else
        f"data: {code(data.get('source', '?'))} split across sites by {code(data.get('partitioner', '?'))}, "
        f"each site holding out {_v(data, 'test_fraction')} of its records for evaluation.")
    blocks.append(Block("list", items=[
        f"Model: {code(section(spec, 'model').get('arch', '?'))}; {data_line}",
        f"Sites: {len(trained)} trained of {s.planned_sites} planned; rounds: "
        f"{sum(1 for r in s.rounds if r.status == 'completed')} completed of {s.planned_rounds} planned.",
        f"Local training: {_v(train, 'local_epochs')} epoch(s) per round, "
        f"{'batch' if s.without_dp else 'expected batch'} {_v(train, 'batch_size')}, "
        f"SGD learning rate {_v(train, 'learning_rate')}.",
        f"Server optimiser: {_server_optimizer(s)}.",
        f"Final evaluation accuracy: {acc}; examples trained: {s.examples}; bytes moved: {mb(s.bytes_moved)}; "
        f"wall time {checked(s.problems, 'wall_seconds', f'{s.wall_seconds or 0:.1f}s')}.",
    ]))
    blocks.append(Block("image", text=png_name))

    blocks.append(Block("h2", "The privacy mechanism"))
    if s.without_dp:
        blocks.append(Block("p", "**None: this run is NOT private.** It trained without differential privacy "
                                 "(`privacy: none`, the non-private baseline a researcher compares against): "
                                 "plain SGD, no clipping, no noise, no ε; the sites that took part have no ε "
                                 "cap in their policy, and their ledgers record each round as a release "
                                 "without DP, charging no ε."))
        blocks.append(Block("table", header=["site", "train records", "rounds", "privacy"], rows=[
            [site.site, checked(site.problems, "num_train", str(site.num_train or 0)), str(site.rounds_joined),
             "none (not private)"] for site in s.sites]))
    else:
        blocks += _dp_blocks(s, trained, accountant_versions, mechanisms)
    if s.missed:
        blocks.append(Block("h2", "Sites that did not take part"))
        blocks.append(Block("table", header=["site", "where", "status", "reason"], rows=[
            [m.site, "pre-flight" if m.phase == "preflight" else f"round {m.round} ({m.phase})",
             checked(m.problems, "status", m.status), clean(m.reason or m.code or "-", 200)] for m in s.missed]))

    blocks.append(Block("h2", "Encryption"))
    if s.encryption:
        e = s.encryption
        params = e.get("params")
        p: dict[str, Any] = params if isinstance(params, dict) else {}
        on = " and ".join(k for k in ("aggregation", "evaluation") if e.get(k) == "ckks")
        blocks.append(Block("p",
            f"CKKS (TenSEAL) on {on}: key set {code(e.get('key_id', '?'))}, ring degree N = "
            f"{_v(p, 'poly_modulus_degree')}, moduli {_v(p, 'coeff_mod_bit_sizes')} bits, scale "
            f"2^{_v(p, 'scale_bits')}, released values rounded to 2^-{_v(p, 'release_bits')} after noise "
            "flooding. The coordinator held the parameters only, never a secret key, and only added ciphertexts."))
    else:
        update = "model update (plain SGD, no DP)" if s.without_dp else "DP-SGD model update"
        blocks.append(Block("p", f"None: the coordinator saw each site's {update} and evaluation metrics in "
                                 "plaintext."))
    if s.without_dp:
        blocks.append(Block("h2", "What this run does not protect"))
        blocks.append(Block("list", items=_no_dp_caveats(s)))
    else:
        blocks.append(Block("h2", "What this guarantee does and does not cover"))
        blocks.append(Block("list", items=_dp_caveats(s, trained)))
    if s.warnings:
        blocks.append(Block("h2", "Stored values that failed their checks"))
        blocks.append(Block("p", "These values in the run store are outside what Veil writes (an older "
                                 "version, a hand-edited database or another tool); they are shown above as "
                                 "*invalid* and were not used."))
        blocks.append(Block("list", items=[md(w, LINE) for w in s.warnings]))
    return blocks


def _server_optimizer(s: RunSummary) -> str:
    """The server optimiser as it ran (``ServerOptimizer.describe()``), and who applied its step."""
    if "server_optimizer" in s.problems:
        return INVALID
    if s.server_optimizer is None:
        return "not recorded"
    ckks = (s.encryption or {}).get("aggregation") == "ckks"
    how = ("the weighted mean of the sites' models is the new model" if s.server_optimizer == "fedavg"
           else "every site applied this step to the decrypted aggregate" if ckks
           else "the coordinator applied this step to each round's weighted mean")
    return f"{md(s.server_optimizer, 80)} ({how})"


def _dp_blocks(s: RunSummary, trained: list[SiteRow], accountant_versions: dict[str, str],
               mechanisms: dict[str, SiteMechanism]) -> list[Block]:
    """A DP run's mechanism: DP-SGD and its calibration, the randomness, accountants, ε per site, worst case."""
    from server.read.summary import section

    priv = section(s.spec, "privacy")
    cap = _v(priv, "target_epsilon")
    target = (f"calibrated per site so that its ε over all planned rounds is at most {cap}"
              if priv.get("noise_multiplier") is None else f"fixed at {_v(priv, 'noise_multiplier')}")
    blocks = [Block("p",
        "Each site trained with **DP-SGD** (Opacus): every example's gradient is clipped to L2 norm "
        f"C = {_v(priv, 'max_grad_norm')}, Gaussian noise of standard deviation σ·C is added to each "
        "batch's sum of clipped gradients, and batches are drawn by **Poisson sampling** (each record joins "
        f"each step independently with probability q). The noise multiplier σ was {target}. Each site "
        "recorded the mechanism it actually ran (σ, q, steps, C, δ) before its update left it, and ε below "
        "is recomputed from those recorded events.")]
    if s.not_private:
        blocks.append(Block("p", f"**Not private: {s.privacy_note.removeprefix('not private: ')}.** This run "
                                 "drew every site's DP noise and Poisson sampling from the scenario seed "
                                 "(`--reproducible-noise`, for simulation research): anyone who knows the seed "
                                 "can recompute the noise and remove it, so the ε below protects no one."))
    elif s.noise_rng:
        blocks.append(Block("p", f"Randomness: {s.privacy_note}; the seeds never left the sites."))
    used = sorted({site.accountant for site in trained if site.accountant in ACCOUNTANTS})
    blocks.append(Block("list", items=[
        f"Accountant `{a}`: {DESCRIPTIONS[a]}; version {md(accountant_versions.get(a, 'not recorded'), 64)}."
        for a in used] or ["No site trained, so no privacy was spent in this run."]))
    blocks.append(Block("table", header=[
        "site", "train records", "rounds", "noise σ", "sampling q", "steps", "C", "run ε", "δ",
        "lifetime ε (ledger)", "cap", "remaining"],
        rows=[_site_cells(site, mechanisms.get(site.site)) for site in s.sites]))
    if s.epsilon_invalid:
        blocks.append(Block("p", "Worst-case site: **invalid**. Some site's stored privacy events fail their "
                                 "checks (listed under *Stored values that failed their checks*), so no ε of "
                                 "this run can be stated."))
    elif s.max_epsilon is not None:
        blocks.append(Block("p", f"Worst-case site: **ε = {s.max_epsilon:.3f}** for this run, each site at "
                                 "its own δ. Lifetime ε is what each site's own ledger has composed for its "
                                 "data set across every run it joined."))
    return blocks


def _dp_caveats(s: RunSummary, trained: list[SiteRow]) -> list[str]:
    """What the (ε, δ) guarantee of a DP run covers, and what it does not."""
    caveats = [
        "ε is **sample-level** differential privacy for each site's training records: it bounds what the "
        "released model updates reveal about any one record. A person with many records at a site is "
        "protected only as a group, with a weaker ε.",
        "It is **not client-level DP**: it does not hide whether a whole site took part.",
        _delta_caveat(trained),
        "**Evaluation metrics, example counts and train loss are not differentially private.** They are "
        "computed on each site's data without noise"
        + (" (evaluation is CKKS-encrypted to the coordinator, but whoever holds the key reads exact sums)."
           if s.encryption and s.encryption.get("evaluation") == "ckks" else "."),
        "Privacy spent on tuning (earlier runs on the same data) counts only through each site's ledger, "
        "which composes every run it joined; ε of this run alone understates the total when there were "
        "other runs.",
    ]
    if s.not_private:
        caveats.insert(0, "**This run is not private: noise reproducible from the seed.** Its ε describes the "
                          "mechanism's shape only.")
    if s.encryption:
        caveats.append("CKKS release noise is a mitigation against known key-recovery attacks on "
                       "decryptions, not a differential-privacy mechanism, and is not counted in ε.")
    return caveats


def _no_dp_caveats(s: RunSummary) -> list[str]:
    """What a reader of a run without DP must know: nothing bounds what it reveals about any record."""
    caveats = [
        "**This run is not private: it trained without differential privacy.** No ε or δ applies to it: "
        "nothing bounds what its model, the sites' model updates, evaluation metrics, example counts or "
        "train loss reveal about any training record.",
        "It is the baseline that DP runs of the same scenario are compared against, not a model to release.",
        "Each site's ledger records every round of this run as a release without DP: a site that sets an ε "
        "cap on that data set afterwards is refused every further charge, since no finite lifetime ε holds.",
    ]
    if s.encryption:
        caveats.append("CKKS hides the sites' values from the coordinator only: whoever holds the key reads "
                       "exact aggregates, and CKKS release noise is not a differential-privacy mechanism.")
    return caveats


def _delta_caveat(trained: list[SiteRow]) -> str:
    ratios = [site.delta * site.num_train for site in trained if site.delta and site.num_train]
    if not ratios:
        return "Each site's ε holds at that site's δ."
    worst = max(ratios)
    if worst < 1:
        return (f"Each site's ε holds at that site's δ; δ·n is at most {worst:.2g} (δ well below one over "
                "the site's record count, as it must be for a meaningful guarantee).")
    return (f"**Warning:** at some site δ·n = {worst:.2g} ≥ 1: δ is not small against 1/n, so the (ε, δ) "
            "guarantee there is weak: a mechanism that leaks a whole record with probability δ would satisfy it.")


def to_markdown(blocks: list[Block]) -> str:
    """The blocks as Markdown; the image is linked by file name."""
    out: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            out += [f"# {b.text}", ""]
        elif b.kind == "h2":
            out += [f"## {b.text}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "list":
            out += [f"- {item}" for item in b.items or []] + [""]
        elif b.kind == "table":
            header = b.header or []
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(md(c, TABLE_CELL) for c in row) + " |" for row in b.rows or []] + [""]
        elif b.kind == "image":
            out += [f"![accuracy, loss and ε per site per round]({b.text})", ""]
    return "\n".join(out)


def _inline(text: str) -> str:
    """Markdown's **bold**, *emphasis*, `code` and backslash escapes as HTML, after escaping."""
    kept: list[str] = []

    def keep(match: re.Match[str]) -> str:
        kept.append(match.group(1))
        return f"\x00{len(kept) - 1}\x00"  # clean() leaves no NUL in the text, so this marks only ours

    t = re.sub(r"\\(.)", keep, text)
    t = html.escape(t)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    t = re.sub(r"\*(.+?)\*", r"<em>\1</em>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    return re.sub("\x00(\\d+)\x00", lambda m: html.escape(kept[int(m.group(1))]), t)


def to_html(blocks: list[Block], png: bytes) -> str:
    """The blocks as one self-contained HTML page, with ``png`` embedded as a data URI."""
    body: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            body.append(f"<{b.kind}>{_inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items or []) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header or [])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(clean(c, TABLE_CELL))}</td>" for c in row) + "</tr>"
                           for row in b.rows or [])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "image":
            data = base64.b64encode(png).decode()
            body.append(f'<img alt="accuracy, loss and ε per site per round" src="data:image/png;base64,{data}">')
    style = ("body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;line-height:1.45}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    title = html.escape(re.sub(r"\\(.)", r"\1", blocks[0].text) if blocks else "Veil report")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(summary: RunSummary, series: MetricSeries, out: Path, accountant_versions: dict[str, str],
                 mechanisms: dict[str, SiteMechanism]) -> list[Path]:
    """report.md + metrics.png + report.html (the image embedded: one file to send)."""
    from veil.cli.plots import png

    out.mkdir(parents=True, exist_ok=True)
    image = out / "metrics.png"
    png(series, image, without_dp=summary.without_dp)
    blocks = build(summary, image.name, accountant_versions, mechanisms)
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(blocks))
    page.write_text(to_html(blocks, image.read_bytes()))
    return [md, page, image]
