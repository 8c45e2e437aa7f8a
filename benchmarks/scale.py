"""Does a round cost the sites sampled, or the sites that exist? 10 sites against 1,000.

Each case is one `veil simulate` (3 rounds, 10 sites sampled per round, σ calibrated per site,
on_budget_exhausted: refuse) in its own process session; the benchmark samples the resident
memory (RSS) of every process in that session (the driver, Ray's raylet, GCS and workers) from
/proc every 0.25 s and keeps the peak. Per-round time is the mean of the rounds' own seconds
from the run record; the ratio compares each 1,000-site case with the 10-site case of the same
split, measured in the same run of this script. Run from the repo root:

    .venv/bin/python benchmarks/scale.py [--rounds 3] [--big 1000] [--splits iid dirichlet]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def session_rss(sid: int) -> int:
    """Resident bytes of every process in session ``sid`` (Ray's processes stay in the session)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # field 6 of stat: the session id
                total += int(fields[21]) * PAGE  # field 24: rss in pages
        except (OSError, IndexError, ValueError):
            continue
    return total


def scenario(sites: int, rounds: int, split: str) -> str:
    """The case's scenario YAML: ``split`` is iid or dirichlet (α 0.5, at least 4 records a site)."""
    data = "partitioner: iid" if split == "iid" else "partitioner: dirichlet\n  alpha: 0.5\n  min_site_examples: 4"
    return f"""name: scale-{split}-{sites}
seed: 0
device: cpu
federation:
  sites: {sites}
  rounds: {rounds}
  sites_per_round: 10
  min_sites: 2
  on_budget_exhausted: refuse
data:
  {data}
model:
  arch: mlp
training:
  batch_size: 32
privacy:
  target_epsilon: 8.0
"""


def run_case(sites: int, rounds: int, split: str) -> dict[str, float]:
    veil = Path(sys.executable).with_name("veil")
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp, "scenario.yaml")
        spec.write_text(scenario(sites, rounds, split))
        cmd = [str(veil), "simulate", str(spec), "--store", f"sqlite:///{tmp}/veil.db",
               "--artifacts-dir", f"{tmp}/a", "--ledger-dir", f"{tmp}/ledgers", "--format", "json"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp,
                                start_new_session=True)
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], session_rss(proc.pid))
                done.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, err = proc.communicate()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"veil simulate ({sites} sites, {split}) failed:\n{err[-3000:]}")
    summary = json.loads(out)
    seconds = [float(r["seconds"]) for r in summary["rounds"]]
    return {"per_round": sum(seconds) / len(seconds), "first": seconds[0],
            "steady": sum(seconds[1:]) / max(1, len(seconds) - 1), "total": wall, "peak_gb": peak[0] / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--small", type=int, default=10)
    ap.add_argument("--big", type=int, default=1000)
    ap.add_argument("--splits", nargs="+", default=["iid", "dirichlet"], choices=["iid", "dirichlet"])
    args = ap.parse_args()
    rows = []
    for split in args.splits:
        small = run_case(args.small, args.rounds, split)
        big = run_case(args.big, args.rounds, split)
        rows.append((split, small, big))
    print(f"{args.rounds} rounds, 10 sites sampled per round; seconds, peak RSS of the whole process tree")
    print("| split | sites | per round (mean) | round 1 | rounds 2+ | total | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for split, small, big in rows:
        for n, r in ((args.small, small), (args.big, big)):
            print(f"| {split} | {n:,} | {r['per_round']:.1f} | {r['first']:.1f} | {r['steady']:.1f} | "
                  f"{r['total']:.1f} | {r['peak_gb']:.2f} |")
    print()
    for split, small, big in rows:
        ratio = big["per_round"] / small["per_round"]
        print(f"{split}: {args.big:,} / {args.small} sites: per round x{ratio:.2f}, "
              f"rounds 2+ x{big['steady'] / small['steady']:.2f}, total x{big['total'] / small['total']:.2f}, "
              f"peak memory x{big['peak_gb'] / small['peak_gb']:.2f}")


if __name__ == "__main__":
    main()
