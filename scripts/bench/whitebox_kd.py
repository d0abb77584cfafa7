#!/usr/bin/env python
"""Tokens/s and peak memory of the white-box distillation step, with and without chunking.

The step is what a white-box KD update does at the student's output layer: student logits
`hidden[B, T, d] @ W[d, V]` (W requires grad), the masked token-mean divergence against teacher
logits (`hidden_t @ W_t`, computed beforehand under no_grad and counted as an input), and the backward
pass down to `W.grad`. The mask is 0 on the first quarter of each sequence (the prompt) and 1 on the rest.

Each (vocab, divergence, chunked?) configuration runs in a fresh spawned process, so that its peak
memory is its own: on the CPU, the growth of the process's peak RSS (`ru_maxrss`) over its peak
right after the inputs are allocated; on CUDA, `torch.cuda.max_memory_allocated` over the same
baseline. The children run with glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_, unless
already set): otherwise glibc keeps freed blocks of tens of MiB and the RSS peak drifts with allocator
history and the number of repeats instead of tracking the tensors alive at once.

tokens/s counts masked tokens, median over --repeats steps after one warm-up step. The chunked and
unchunked runs use the same seed, and their losses and W gradients are compared so the figures
measure the same computation.

    python scripts/bench/whitebox_kd.py [--vocab 32000 151936] [--divergence fkl jsd] [--chunk-size 64]
                                        [--batch 4] [--seq-len 128] [--hidden 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from pbkd_cli.objectives.divergences import DIVERGENCES, distillation_loss


def step(divergence: str, hidden: torch.Tensor, weight: torch.Tensor, teacher_logits: torch.Tensor,
         mask: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    weight.grad = None
    loss = distillation_loss(divergence, hidden @ weight, teacher_logits, mask, chunk_size=chunk_size)
    loss.backward()
    return loss


def measure(vocab: int, divergence: str, chunk_size: int | None, opts: argparse.Namespace) -> dict:
    """One configuration, run inside its own child process."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    cuda = device.type == "cuda"
    # Both code paths once on tiny tensors: thread pools, kernels and the autograd engine allocate
    # tens of MiB on first use, which would otherwise land in one configuration's figure.
    for chunk in (None, 2):
        tiny = torch.ones(1, 8, device=device)
        step(divergence, torch.randn(1, 8, 4, device=device), torch.randn(4, 16, device=device).requires_grad_(),
             torch.randn(1, 8, 16, device=device), tiny, chunk)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    # Inputs are built without temporaries (in-place scaling, teacher weight kept), so that the RSS
    # high-water mark taken as the baseline below is the RSS itself.
    b, t, d = opts.batch, opts.seq_len, opts.hidden
    hidden, hidden_t = randn(b, t, d), randn(b, t, d)
    # Scaled so that logits are roughly standard normal, as for a trained output layer.
    weight = randn(d, vocab).div_(d ** 0.5).requires_grad_()
    teacher_weight = randn(d, vocab).div_(d ** 0.5)
    with torch.no_grad():
        teacher_logits = hidden_t @ teacher_weight
    mask = torch.zeros(b, t, device=device)
    mask[:, t // 4:] = 1
    tokens = int(mask.sum())

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        if baseline - rss > 16 * 2**20:
            raise RuntimeError(f"RSS high-water mark {baseline / 2**20:.0f} MiB is above the RSS "
                               f"{rss / 2**20:.0f} MiB before the step; the peak would be under-reported")
    times = []
    for _ in range(opts.repeats + 1):
        start = time.perf_counter()
        loss = step(divergence, hidden, weight, teacher_logits, mask, chunk_size)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": tokens / statistics.median(times[1:]), "peak_mib": (peak - baseline) / 2**20,
            "loss": loss.item(), "grad": weight.grad.cpu()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--divergence", nargs="+", default=["fkl"], choices=sorted(DIVERGENCES))
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    opts = parser.parse_args()
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available")

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**20))  # read by glibc when each child starts
    spawn = multiprocessing.get_context("spawn")
    positions = opts.batch * opts.seq_len
    rows, checks = [], []
    for vocab in opts.vocab:
        for divergence in opts.divergence:
            results = {}
            for chunk in (None, opts.chunk_size):
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:  # a fresh process per configuration
                    results[chunk] = pool.submit(measure, vocab, divergence, chunk, opts).result()
                r = results[chunk]
                rows.append(f"| {vocab} | {divergence} | {chunk or 'none'} | {r['tokens_per_s']:,.0f} "
                            f"| {r['peak_mib']:,.0f} |")
            full, chunked = results[None], results[opts.chunk_size]
            grad_diff = (full["grad"] - chunked["grad"]).abs().max().item()
            checks.append(f"| {vocab} | {divergence} | {positions * vocab * 4 / 2**20:,.0f} "
                          f"| {full['peak_mib'] / chunked['peak_mib']:.1f}x | {full['loss']:.4f} "
                          f"| {abs(full['loss'] - chunked['loss']):.1e} | {grad_diff:.1e} "
                          f"| {full['grad'].abs().max().item():.1e} |")

    memory = "peak CUDA memory" if opts.device == "cuda" else "peak RSS increase"
    masked = opts.batch * (opts.seq_len - opts.seq_len // 4)
    print(f"White-box KD step on {opts.device}: B={opts.batch}, T={opts.seq_len} ({positions} positions, "
          f"{masked} masked), d={opts.hidden}, threads={opts.threads or torch.get_num_threads()}, "
          f"median of {opts.repeats} after a warm-up\n")
    if masked <= opts.chunk_size:
        print(f"note: {masked} masked positions <= chunk size {opts.chunk_size}, so the loss takes the "
              "unchunked path in both runs\n")
    print(f"| vocab | divergence | chunk_size | tokens/s | {memory} (MiB) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| vocab | divergence | one [B*T, V] fp32 (MiB) | peak unchunked/chunked | loss "
          "| abs loss diff | max abs dW diff | max abs dW |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(checks))


if __name__ == "__main__":
    main()
