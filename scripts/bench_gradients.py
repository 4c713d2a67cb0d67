"""What TATR's per-sample gradient statistics cost, against a plain training step.

On an open_clip ViT-B-32 image encoder with random weights, one batch of random images
and labels and a random zero-shot head, times in one run:

- batched: one forward and backward pass of the summed loss (a training step's cost);
- ours: Σ over the batch of |per-sample gradient| for every parameter
  (``mergelab.models.per_sample_gradients.accumulate_abs_gradients``);
- loop: one backward pass per sample through the batched graph (retain_graph), the
  |gradient| added after each — what FusionBench 0.2.33 does (REFERENCE §2, pitfall 4).

Each is repeated ``--repeat`` times (the loop ``--loop-repeat`` times) and the fastest
taken, since other processes may share the cores. The last line is
``RESULT ours_vs_batched=<ours ÷ batched> loop_vs_ours=<loop ÷ ours>
max_rel_err=<max |ours − loop| ÷ max |loop| over parameters>``
(targets on a 2-core CPU: ≤ 1.6, ≥ 10, ≤ 1e-5).
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F

from mergelab.models.logits import zero_shot_logits
from mergelab.models.per_sample_gradients import accumulate_abs_gradients

from harness import fastest, load_average, print_result
from synthetic_checkpoints import random_encoder


def loss_of(encoder, head, scale, images, labels):
    logits = zero_shot_logits(encoder(images), head, scale)
    return F.cross_entropy(logits, labels, reduction="none")


def batched(encoder, head, scale, images, labels) -> None:
    encoder.zero_grad(set_to_none=True)
    loss_of(encoder, head, scale, images, labels).sum().backward()


def loop(encoder, head, scale, images, labels, sums) -> None:
    """One backward pass per sample through the batched graph."""
    losses = loss_of(encoder, head, scale, images, labels)
    params = dict(encoder.named_parameters())
    for i in range(len(losses)):
        grads = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True)
        for name, grad in zip(params, grads, strict=True):
            sums[name].add_(grad.abs())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="images per batch (default: %(default)s)"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=8,
        help="samples whose per-sample gradients are formed at once (default: %(default)s)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed runs of the batched step and of ours; the fastest is kept "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--loop-repeat",
        type=int,
        default=1,
        help="timed runs of the per-sample backward loop (default: %(default)s)",
    )
    parser.add_argument(
        "--model", default="ViT-B-32", help="open_clip architecture (default: %(default)s)"
    )
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random weights
    device = torch.device(args.device)
    encoder = random_encoder(args.model, seed=0).to(device).eval()
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    classes = 10
    labels = torch.randint(0, classes, (args.batch_size,), device=device)
    head = F.normalize(torch.randn(classes, encoder.output_dim, device=device), dim=-1)
    scale = 100.0

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def zeros() -> dict[str, torch.Tensor]:
        return {n: torch.zeros_like(p) for n, p in encoder.named_parameters()}

    ours_sums, loop_sums = zeros(), zeros()

    def run_ours() -> None:
        for value in ours_sums.values():
            value.zero_()
        accumulate_abs_gradients(encoder, head, scale, images, labels, ours_sums, args.chunk_size)
        sync()

    def run_loop() -> None:
        for value in loop_sums.values():
            value.zero_()
        loop(encoder, head, scale, images, labels, loop_sums)
        sync()

    def run_batched() -> None:
        batched(encoder, head, scale, images, labels)
        sync()

    run_batched()  # warm-up
    run_ours()
    t_batched = fastest(args.repeat, run_batched)
    t_ours = fastest(args.repeat, run_ours)
    print(f"batched forward+backward: {t_batched:.3f} s", flush=True)
    print(f"ours (per-sample |grad| sums): {t_ours:.3f} s", flush=True)
    t_loop = fastest(args.loop_repeat, run_loop)
    print(f"loop (one backward per sample, retain_graph): {t_loop:.3f} s", flush=True)
    err = max(
        float((ours_sums[n] - loop_sums[n]).abs().max() / loop_sums[n].abs().max().clamp_min(1e-30))
        for n in loop_sums
    )
    load = load_average()
    print(
        f"device {device}, batch {args.batch_size}, chunk {args.chunk_size}, "
        f"{torch.get_num_threads()} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print_result(
        [
            ("ours_vs_batched", t_ours / t_batched, ".3f"),
            ("loop_vs_ours", t_loop / t_ours, ".2f"),
            ("max_rel_err", err, ".2e"),
        ]
    )


if __name__ == "__main__":
    main()
