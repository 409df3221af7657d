"""What a user gets from ``fxfuse compile A B --sample N --untie`` on the GPT-2 pairs of ``text.py``.

    python benchmarks/text_sample_cli.py [--pairs 1] [--sample 2048] [--steps 1200] [--threads 1]

Each pair of ``benchmarks/text.py`` (trained and cached there, ``--steps``) is
written as two Hugging Face directories and fused by the command line with no
dataset: ``--sample N`` draws the data from the parents, ``--quality best``
follows (no mode option is given) and chooses the stages on held-out sampled
sequences. The fused model is then scored on ``text.py``'s held-out text and
compared with the parents and with plain averaging at the same point: the excess
over the parents' mean loss at fusion weight ½, and its cut against vanilla's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import text as T  # noqa: E402  (the corpus, the cached pairs and the held-out windows)

import fxfuse  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--sample", type=int, default=2048, help="--sample N of the command")
    ap.add_argument("--steps", type=int, default=1200, help="training steps of the parents (text.py --steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and in the command")
    args = ap.parse_args(argv)
    from transformers import GPT2LMHeadModel

    from fxfuse.models.heads import evaluate

    torch.set_num_threads(args.threads)
    T.TRAIN["steps"] = args.steps
    corpus = T.load_corpus()
    data = T.eval_data("gpt2", corpus, 512, 256)
    x, y = data["inputs"], data["labels"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    fxfuse_cli = str(Path(sys.executable).with_name("fxfuse"))
    rows = []
    for i in range(args.pairs):
        seeds = (2 * i + 1, 2 * i + 2)
        a, _ = T.trained("gpt2", seeds[0], corpus, False)
        b, _ = T.trained("gpt2", seeds[1], corpus, False)
        with tempfile.TemporaryDirectory() as tmp:
            a.save_pretrained(f"{tmp}/a")
            b.save_pretrained(f"{tmp}/b")
            t0 = time.perf_counter()
            run = subprocess.run([fxfuse_cli, "compile", f"{tmp}/a", f"{tmp}/b", "-o", f"{tmp}/out", "--sample",
                                  str(args.sample), "--untie", "-q"], capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            if run.returncode != 0:
                raise SystemExit(f"fxfuse compile failed on pair {seeds}: {run.stderr.strip()}")
            report = json.loads(Path(f"{tmp}/out/report.json").read_text())
            fused = GPT2LMHeadModel.from_pretrained(f"{tmp}/out").eval()
            losses = [evaluate(m, x, y, "causal")[0] for m in (a, b, fused)]
        vanilla = fxfuse.compile([a, b], data["example"], method="vanilla").module.eval()
        van = evaluate(vanilla, x, y, "causal")[0]
        mean = (losses[0] + losses[1]) / 2
        cut = (van - losses[2]) / (van - mean)
        rows.append(cut)
        print(f"pair {seeds}: parents {losses[0]:.4f} / {losses[1]:.4f}; vanilla at ½ {van:.4f} "
              f"(excess {van - mean:.4f}); fxfuse --sample {args.sample} {losses[2]:.4f} (excess {losses[2] - mean:.4f}, "
              f"cut {100 * cut:.1f}% against vanilla); chose {report['quality']['chosen']}; sampled in "
              f"{report['sample']['seconds']:.0f} s; {wall:.0f} s in all")
    print(f"mean cut at ½: {100 * sum(rows) / len(rows):.1f}% over {len(rows)} pair(s)")


if __name__ == "__main__":
    main()
