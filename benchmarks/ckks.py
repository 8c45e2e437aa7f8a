"""What CKKS aggregation costs: bytes on the wire, CPU seconds, and a whole round's wall time.

Three parts, all measured in this one run:

1. **1M parameters, 10 sites** with Veil's own code path (``privacy/ckks.py``, default key
   set N = 4096, moduli (60, 49), scale 2^52): bytes per parameter up (one site's stream) and
   down (the aggregate), seconds to encrypt one site's stream, to parse and add ten streams
   (the coordinator), and to decrypt and release the sum (a site), plus the largest error
   against the plaintext weighted average.
2. **Encrypted round / plaintext round** for the default scenario's model: the same short
   simulation through Flower's engine twice, plaintext and CKKS (aggregation + evaluation),
   comparing the mean wall time of rounds after the first (round 1 carries Ray's start-up).
3. **The path below 32 B/param** (a prototype, not wired into runs): quantize each value to
   8 bits (stochastic rounding, with carry room for the sum of all sites) and pack two per
   BFV slot (BFV has N integer slots, CKKS N/2 real ones), BatchCrypt-style. Reports bytes
   per parameter and the quantization error of the decoded average.

    python benchmarks/ckks.py [--params 1000000] [--sites 10] [--rounds 3] [--skip-rounds]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privacy.ckks import CoordinatorContext, ReplyBinding, SecretKey, create_keyset


def ckks_costs(params: int, sites: int, work: Path) -> dict[str, float]:
    made = create_keyset(work / "keys")
    secret, coord = SecretKey.load(made.secret), CoordinatorContext.load(made.coordinator)
    rng = np.random.default_rng(0)
    counts = rng.integers(100, 5000, size=sites).astype(float)
    norm = counts.sum()
    updates = [rng.normal(0, 0.1, params) for _ in range(sites)]
    t = time.perf_counter()
    first = secret.encrypt(np.append(updates[0] * counts[0] / norm, counts[0] / norm))
    encrypt_s = time.perf_counter() - t
    streams = [first] + [secret.encrypt(np.append(u * n / norm, n / norm))
                         for u, n in zip(updates[1:], counts[1:], strict=True)]
    bindings = [ReplyBinding("bench", 1, f"site-{i}", "update") for i in range(sites)]
    tags = [secret.tag(s, b) for s, b in zip(streams, bindings, strict=True)]  # each site's reply tag
    t = time.perf_counter()  # the coordinator: check each tag, parse, add
    total = coord.add([coord.parse(s, params + 1, tag=g, binding=b)
                       for s, g, b in zip(streams, tags, bindings, strict=True)])
    aggregate_s = time.perf_counter() - t
    t = time.perf_counter()
    mean, _ = secret.decrypt_mean(total)
    decrypt_s = time.perf_counter() - t
    reference = sum(u * n for u, n in zip(updates, counts, strict=True)) / counts.sum()
    plain_add = time.perf_counter()
    _ = np.sum(np.stack(updates) * (counts / norm)[:, None], axis=0)
    plain_add_s = time.perf_counter() - plain_add
    return {"up": first.nbytes / params, "down": total.nbytes / params, "encrypt": encrypt_s,
            "aggregate": aggregate_s, "decrypt": decrypt_s, "error": float(np.max(np.abs(mean - reference))),
            "plain_aggregate": plain_add_s}


def round_ratio(rounds: int, work: Path) -> tuple[float, float, int]:
    """Mean wall time of rounds 2.. of the default scenario (5 sites), plaintext vs CKKS."""
    import logging

    logging.getLogger("veil").setLevel(logging.WARNING)
    from server.store import RunStore
    from simulations.simulate import simulate
    from veil.models import build_model, count_parameters
    from veil.spec import load_scenario

    base = load_scenario().with_overrides(**{"federation.rounds": rounds, "device": "cpu"})
    base = base.model_copy(update={"site_policy": base.site_policy.model_copy(update={"epsilon_cap": None})})
    store = RunStore(f"sqlite:///{work / 'rounds.db'}")
    means = []
    for mode in ("none", "ckks"):
        spec = base.with_overrides(**{"encryption.aggregation": mode, "encryption.evaluation": mode})
        result = simulate(spec, store, work / "art", progress=False, ledger_dir=work / f"ledgers-{mode}")
        later = [float(r["seconds"] or 0) for r in result.rounds[1:]]
        means.append(statistics.mean(later))
    return means[0], means[1], count_parameters(build_model(base.model.key))


def packed_path(params: int, sites: int, bits: int = 8, per_slot: int = 2) -> dict[str, float]:
    """BFV prototype: ``bits``-bit stochastic quantization, ``per_slot`` values per integer slot."""
    import tenseal as ts

    carry = math.ceil(math.log2(sites))
    lane = bits + carry  # room for the sum of all sites without overflowing into the next value
    plain_modulus_bits = lane * per_slot + 1
    ctx = ts.context(ts.SCHEME_TYPE.BFV, 4096, plain_modulus=_bfv_prime(plain_modulus_bits, 4096),
                     coeff_mod_bit_sizes=[60, 49], encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    rng = np.random.default_rng(1)
    updates = [rng.normal(0, 0.1, params) for _ in range(sites)]
    clip = 0.5  # values are clipped to ±clip before quantizing (DP-SGD updates are bounded anyway)
    levels = 2 ** bits - 1
    quantized = []
    for u in updates:
        x = (np.clip(u, -clip, clip) + clip) / (2 * clip) * levels
        q = np.floor(x + rng.random(x.size)).astype(np.int64)  # unbiased stochastic rounding
        pad = (-q.size) % per_slot
        q = np.concatenate([q, np.zeros(pad, dtype=np.int64)]).reshape(-1, per_slot)
        quantized.append(sum(q[:, j] << (lane * j) for j in range(per_slot)))
    slots = 4096
    t = time.perf_counter()
    first = [ts.bfv_vector(ctx, quantized[0][i:i + slots].tolist()).serialize()
             for i in range(0, quantized[0].size, slots)]
    encrypt_s = time.perf_counter() - t
    encs = [[ts.bfv_vector(ctx, q[i:i + slots].tolist()) for i in range(0, q.size, slots)] for q in quantized]
    total = encs[0]
    for other in encs[1:]:
        for a, b in zip(total, other, strict=True):
            a.add_(b)
    packed = np.concatenate([np.array(v.decrypt(), dtype=np.int64) for v in total])
    mask = (1 << lane) - 1
    summed = np.stack([(packed >> (lane * j)) & mask for j in range(per_slot)], axis=1).ravel()[:params]
    mean = summed / sites / levels * (2 * clip) - clip
    reference = np.mean([np.clip(u, -clip, clip) for u in updates], axis=0)
    return {"up": sum(len(b) for b in first) / params, "encrypt": encrypt_s,
            "error": float(np.max(np.abs(mean - reference))), "step": 2 * clip / levels}


def _bfv_prime(bits: int, n: int) -> int:
    """Smallest prime p ≡ 1 (mod 2n) with at least ``bits`` bits (BFV batching needs it)."""
    p = (1 << (bits - 1)) // (2 * n) * (2 * n) + 1
    while not all(p % d for d in range(3, int(p ** 0.5) + 1, 2)):
        p += 2 * n
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per simulation in part 2")
    ap.add_argument("--skip-rounds", action="store_true", help="skip part 2 (two simulations)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        c = ckks_costs(args.params, args.sites, work)
        print(f"CKKS, {args.params:,} parameters, {args.sites} sites, one core "
              "(N=4096, moduli 60+49 bits, scale 2^52, one data prime)")
        print("| measure | value |")
        print("|---|---|")
        print(f"| upload, one site | {c['up']:.1f} B/param |")
        print(f"| download, the aggregate | {c['down']:.1f} B/param |")
        print(f"| encrypt one site's stream | {c['encrypt']:.2f} s |")
        print(f"| coordinator: check + add {args.sites} streams | {c['aggregate']:.2f} s "
              f"(plaintext numpy: {c['plain_aggregate'] * 1000:.0f} ms) |")
        print(f"| decrypt + release the sum | {c['decrypt']:.2f} s |")
        print(f"| max error vs plaintext weighted mean | {c['error']:.1e} |")
        if not args.skip_rounds:
            plain, enc, model_params = round_ratio(args.rounds, work)
            print(f"\nDefault scenario model ({model_params:,} parameters), 10 sites, rounds 2..{args.rounds} "
                  "(round 1 holds Ray's start-up)")
            print("| round | mean wall time |")
            print("|---|---|")
            print(f"| plaintext | {plain:.2f} s |")
            print(f"| CKKS aggregation + evaluation | {enc:.2f} s |")
            print(f"| ratio | {enc / plain:.2f}x |")
        p = packed_path(args.params, args.sites)
        print(f"\nPath below 32 B/param (prototype): 8-bit stochastic quantization, 2 values per BFV slot, "
              f"{args.sites} sites")
        print("| measure | value |")
        print("|---|---|")
        print(f"| upload, one site | {p['up']:.1f} B/param |")
        print(f"| encrypt one site's stream | {p['encrypt']:.2f} s |")
        print(f"| max error of the decoded mean (clip ±0.5) | {p['error']:.1e} (one step = {p['step']:.1e}) |")


if __name__ == "__main__":
    main()
