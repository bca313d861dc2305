"""Token log-probs with their backward: ``TokenLogProb`` vs autograd's graph of the same formula.

    python bench/logprob.py                   # SmolLM2-135M's LM head: 4 rows × 128 response positions, 49k vocabulary
    python bench/logprob.py --rows 4 --positions 128 --vocab 49152 --hidden 576 --rounds 10

The part of the update pass it replaces: hidden states → LM head → log π(y) → a weighted sum → backward into the
hidden states and the LM head's weight. Both variants run in one process, taking turns (the order reversed every
other round). Prints ``name: value`` lines: the median seconds of each, their ratio, and the largest difference of
their gradients relative to the largest gradient entry.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import report, set_threads, time_alternately  # noqa: E402

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

    def run(fn):
        def once(_round: int):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            (fn(h @ w.T, targets) * scale).sum().backward()
            return h.grad, w.grad
        return once

    runs = time_alternately({"autograd": run(autograd_graph), "fused": run(TokenLogProb.apply)}, args.rounds)
    seconds = {name: statistics.median(t for _, t in r) for name, r in runs.items()}
    (h_ref, w_ref), (h_new, w_new) = runs["autograd"][0][0], runs["fused"][0][0]
    report("logprob_backward_s_autograd", seconds["autograd"])
    report("logprob_backward_s_fused", seconds["fused"])
    report("logprob_backward_speedup", seconds["autograd"] / seconds["fused"])
    report("logprob_grad_max_rel_diff", float(max((h_new - h_ref).abs().max() / h_ref.abs().max(),
                                                  (w_new - w_ref).abs().max() / w_ref.abs().max())))


if __name__ == "__main__":
    main()
