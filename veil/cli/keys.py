"""``veil keys``: CKKS key sets (the coordinator gets parameters only) and decrypting checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from veil.cli.common import errors

app = typer.Typer(no_args_is_help=True, help="CKKS key sets: the coordinator gets parameters only.")


@app.command("create")
def keys_create(
    directory: Annotated[Path, typer.Argument(help="new directory for the key set")],
    poly_modulus_degree: Annotated[int, typer.Option(help="ring degree N")] = 4096,
    coeff_mod_bit_sizes: Annotated[str, typer.Option(help="modulus primes in bits, special prime last")] = "60,49",
    scale_bits: Annotated[int, typer.Option(help="encoding scale 2^scale_bits")] = 52,
    release_bits: Annotated[int, typer.Option(help="decrypted sums are noise-flooded and rounded to "
                                              "2^-release_bits")] = 28,
) -> None:
    """Make a CKKS key set: secret.ckks (sites, researchers), coordinator.ckks (no CKKS key); both mode 600."""
    from privacy.ckks import CkksParams, create_keyset

    try:
        bits = tuple(int(b) for b in coeff_mod_bit_sizes.split(","))
    except ValueError:
        raise typer.BadParameter(f"--coeff-mod-bit-sizes must be comma-separated integers, "
                                 f"got {coeff_mod_bit_sizes!r}") from None
    with errors():
        made = create_keyset(directory, CkksParams(poly_modulus_degree, bits, scale_bits, release_bits))
    p = made.info.params
    typer.echo(f"key set {made.info.key_id}: CKKS N={p.poly_modulus_degree}, moduli {list(p.coeff_mod_bit_sizes)} "
               f"bits, scale 2^{p.scale_bits}, {p.slots} values per ciphertext, "
               f"{p.ciphertext_bytes / p.slots:.0f} bytes per value")
    typer.echo(f"  {made.secret}  (secret key, mode 600): copy to every site and to researchers who may "
               "read results; never to the coordinator")
    typer.echo(f"  {made.coordinator}  (parameters and the reply-integrity key, no CKKS key; mode 600): "
               "for the coordinator")


@app.command("decrypt")
def keys_decrypt(
    checkpoint: Annotated[Path, typer.Argument(help="an encrypted checkpoint (round-NNNN.ckks)")],
    key: Annotated[Path, typer.Option("--key", help="the key set's secret.ckks")],
    out: Annotated[Path, typer.Option("--out", help="where to write the PyTorch state dict (.pt)")],
) -> None:
    """Decrypt an encrypted checkpoint into a PyTorch state dict (the released, rounded values)."""
    import torch

    from privacy.ckks import EncryptedVector, EncryptionError, SecretKey, unflatten
    from veil.protocol import server_optimizer_from
    from veil.server_opt import STATE_LAYOUT, decode_aggregate

    with errors():
        secret = SecretKey.load(key)
        enc, meta = EncryptedVector.from_file(checkpoint)
        mean, _ = secret.decrypt_mean(enc)
        layout = meta["layout"]
        like = [torch.empty(shape, dtype=getattr(torch, dtype)).numpy() for _, shape, dtype in layout]
        try:  # the server step every site applies to this aggregate (veil.server_opt)
            opt = server_optimizer_from(meta.get("server_optimizer") or {})
            if opt.stateful and meta.get("state_layout") != STATE_LAYOUT:
                raise ValueError(f"its {opt.rule} state was written in another layout (an older Veil's: "
                                 f"{meta.get('state_layout', 1)}, this Veil reads {STATE_LAYOUT}); decrypt it "
                                 "with the Veil that wrote it")
            model, _ = decode_aggregate(opt, mean, sum(int(a.size) for a in like))
        except ValueError as err:
            raise EncryptionError(f"{checkpoint}: {err}") from None
        values = unflatten(model, like)
    torch.save({name: torch.from_numpy(v) for (name, _, _), v in zip(layout, values, strict=True)}, out)
    typer.echo(f"decrypted {sum(int(v.size) for v in values)} parameters ({meta.get('arch')}) into {out}")
