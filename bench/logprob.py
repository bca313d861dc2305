"""Token log-probs with their backward: ``TokenLogProb`` vs autograd's graph of the same formula, and
``TokenLogProb`` with its CPU row chunks vs one whole-block pass.

    python bench/logprob.py                   # SmolLM2-135M's LM head: 4 rows × 128 response positions, 49k vocabulary
    python bench/logprob.py --rows 4 --positions 128 --vocab 49152 --hidden 576 --rounds 10

The part of the update pass it replaces: hidden states → LM head → log π(y) → a weighted sum → backward into the
hidden states and the LM head's weight; and the forward alone (LM head → log π(y)), as the reference and
post-update passes run it. The variants run in one process, taking turns (the order reversed every other round):
``autograd`` (gather − logsumexp), ``whole`` (``TokenLogProb`` over the whole block at once, as before the row
chunks) and ``fused`` (``TokenLogProb`` as it is). Prints ``name: value`` lines: median seconds, ratios, and the
largest difference of the gradients relative to the largest gradient entry.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report, set_threads, time_alternately  # noqa: E402

import moalign.engine.rollout as rollout  # noqa: E402
from moalign.engine.rollout import TokenLogProb  # noqa: E402


def autograd_graph(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--positions", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    hidden = torch.randn(args.rows, args.positions, args.hidden)
    weight = torch.randn(args.vocab, args.hidden) * args.hidden ** -0.5 * 4
    targets = torch.randint(0, args.vocab, (args.rows, args.positions))
    scale = torch.randn(args.rows, args.positions)

    def whole_block(logits, targets):
        chunk = rollout.CPU_ROWS_PER_CHUNK
        rollout.CPU_ROWS_PER_CHUNK = logits.numel()  # one chunk holding every row
        try:
            return TokenLogProb.apply(logits, targets)
        finally:
            rollout.CPU_ROWS_PER_CHUNK = chunk

    variants = {"autograd": autograd_graph, "whole": whole_block, "fused": TokenLogProb.apply}

    def with_backward(fn):
        def once(_round: int):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            (fn(h @ w.T, targets) * scale).sum().backward()
            return h.grad, w.grad
        return once

    def forward_only(fn):
        def once(_round: int):
            with torch.no_grad():
                return fn(hidden @ weight.T, targets)
        return once

    runs = time_alternately({name: with_backward(fn) for name, fn in variants.items()}, args.rounds)
    seconds = {name: statistics.median(t for _, t in r) for name, r in runs.items()}
    h_ref, w_ref = runs["autograd"][0][0]
    for name in variants:
        report(f"logprob_backward_s_{name}", seconds[name])
    report("logprob_backward_speedup", seconds["autograd"] / seconds["fused"])
    report("logprob_backward_chunk_speedup", seconds["whole"] / seconds["fused"])
    for name in ("whole", "fused"):
        h_new, w_new = runs[name][0][0]
        report(f"logprob_grad_max_rel_diff_{name}", float(max((h_new - h_ref).abs().max() / h_ref.abs().max(),
                                                              (w_new - w_ref).abs().max() / w_ref.abs().max())))
    runs = time_alternately({name: forward_only(fn) for name, fn in variants.items()}, args.rounds)
    seconds = {name: statistics.median(t for _, t in r) for name, r in runs.items()}
    for name in variants:
        report(f"logprob_forward_s_{name}", seconds[name])
    report("logprob_forward_chunk_speedup", seconds["whole"] / seconds["fused"])
    report("logprob_forward_identical", bool(torch.equal(runs["whole"][0][0], runs["fused"][0][0])))


if __name__ == "__main__":
    main()
