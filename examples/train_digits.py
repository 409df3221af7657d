"""Train the shipped example models on scikit-learn's ``digits`` and save them.

Produces six model directories under ``--out`` (default: this folder)::

    digits-mlp-a  digits-mlp-b   (digits.py:mlp, seeds 1 and 2)
    digits-vit-a  digits-vit-b   (digits.py:vit, seeds 1 and 2)
    digits-mlp-wide              (h1 256, h2 128, seed 3: twice as wide)
    digits-vit-deep              (depth 4, seed 3: twice as deep)

each holding ``model.safetensors`` (the state dict) and ``fxfuse.json``
(``{"factory": "../digits.py:mlp", "kwargs": ..., "weights": "model.safetensors"}``,
the factory's file named relative to the directory under this folder, absolute
elsewhere, so that a model loads from any working directory). A
directory is written into a temporary sibling folder and moved into place with
``os.replace``, so a reader never sees a half-written model.

    python examples/train_digits.py [--out examples] [--epochs-mlp N] [--epochs-vit N] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import digits  # examples/digits.py: this script's directory is on sys.path

MODELS = [
    # (directory, kind: the factory in digits.py, seed, kwargs)
    ("digits-mlp-a", "mlp", 1, {"h1": 128, "h2": 64}),
    ("digits-mlp-b", "mlp", 2, {"h1": 128, "h2": 64}),
    ("digits-vit-a", "vit", 1, {"dim": 64, "heads": 4, "mlp": 128, "depth": 2}),
    ("digits-vit-b", "vit", 2, {"dim": 64, "heads": 4, "mlp": 128, "depth": 2}),
    # heterogeneous partners: a wider MLP, a deeper ViT
    ("digits-mlp-wide", "mlp", 3, {"h1": 256, "h2": 128}),
    ("digits-vit-deep", "vit", 3, {"dim": 64, "heads": 4, "mlp": 128, "depth": 4}),
]


def save_model_dir(path: Path, model: torch.nn.Module, factory: str, kwargs: dict) -> None:
    """Write ``model.safetensors`` + ``fxfuse.json`` into ``path`` atomically (replacing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        meta = {"factory": factory, "kwargs": kwargs, "weights": "model.safetensors"}
        (tmp / "fxfuse.json").write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.iterdir():                   # safetensors writes 0600, mkdtemp makes 0700
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        old = None
        if path.exists():                         # os.replace cannot overwrite a non-empty directory
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def factory_spec(folder: Path, kind: str) -> str:
    """``digits.py:kind`` for the manifest in ``folder``: the file relative to ``folder`` where ``folder`` lies under
    this directory (the examples move together), else its absolute path."""
    source, folder = Path(digits.__file__).resolve(), Path(folder).resolve()
    file = os.path.relpath(source, folder) if folder.is_relative_to(source.parent) else str(source)
    return f"{file}:{kind}"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="where to write (default: examples/)")
    ap.add_argument("--epochs-mlp", type=int, default=digits.HYPERPARAMS["mlp"]["epochs"])
    ap.add_argument("--epochs-vit", type=int, default=digits.HYPERPARAMS["vit"]["epochs"])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--only", action="append", choices=[m[0] for m in MODELS], metavar="NAME",
                    help="train only this model (repeatable; default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    epochs = {"mlp": args.epochs_mlp, "vit": args.epochs_vit}
    factories = {"mlp": digits.mlp, "vit": digits.vit}
    _, _, x_test, y_test = digits.load_split()
    out = Path(args.out)
    for name, kind, seed, kwargs in MODELS:
        if args.only and name not in args.only:
            continue
        hp = digits.HYPERPARAMS[kind]
        model, _ = factories[kind](seed=seed, **kwargs)
        t0, c0 = time.perf_counter(), time.process_time()
        digits.train(model, epochs[kind], seed, lr=hp["lr"], batch_size=hp["batch_size"])
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        acc = digits.accuracy(model, x_test, y_test)
        save_model_dir(out / name, model, factory_spec(out / name, kind), kwargs)
        print(f"{name}: test accuracy {acc:.4f} ({round(acc * len(y_test))}/{len(y_test)}), "
              f"{epochs[kind]} epochs in {seconds:.1f} s ({cpu:.1f} s CPU), {dir_size(out / name) / 1024:.0f} KiB", flush=True)


if __name__ == "__main__":
    main()
