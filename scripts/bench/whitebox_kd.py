#!/usr/bin/env python
"""Tokens/s and peak memory of the white-box distillation step: whole logits, chunked divergence,
and logits computed chunk by chunk from the hidden states.

The step is what a white-box KD update does at the student's output layer, three ways:
  whole    student logits `hidden[B, T, d] @ W[d, V]` (W requires grad), the masked token-mean
           divergence against teacher logits (`hidden_t @ W_t`, computed beforehand under no_grad and
           counted as an input), and the backward pass down to `W.grad`;
  chunked  the same with `distillation_loss(chunk_size=...)`: the divergence's intermediates a chunk
           at a time, the logits and their gradient still whole;
  hidden   `distillation_loss_from_hidden`: both models' logits computed `chunk_size` positions at a
           time from `hidden`, `hidden_t` and the weights (what `sft.kd.chunk_size` runs), so no
           `[B*T, V]` tensor is ever whole; the teacher's logits are not an input.
The mask is 0 on the first quarter of each sequence (the prompt) and 1 on the rest.

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

from pbkd_cli.objectives.divergences import DIVERGENCES, distillation_loss, distillation_loss_from_hidden


MODES = ("whole", "chunked", "hidden")


def step(mode: str, divergence: str, hidden: torch.Tensor, weight: torch.Tensor, teacher, mask: torch.Tensor,
         chunk_size: int) -> torch.Tensor:
    """One step; `teacher` is the teacher's logits, or for `hidden` its (hidden states, weight)."""
    weight.grad = None
    if mode == "hidden":
        teacher_hidden, teacher_weight = teacher
        targets = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
        loss, _, _ = distillation_loss_from_hidden(divergence, hidden, weight.T, teacher_hidden, teacher_weight.T,
                                                   targets, mask, chunk_size=chunk_size)
    else:
        loss = distillation_loss(divergence, hidden @ weight, teacher, mask,
                                 chunk_size=chunk_size if mode == "chunked" else None)
    loss.backward()
    return loss


def measure(vocab: int, divergence: str, mode: str, opts: argparse.Namespace) -> dict:
    """One configuration, run inside its own child process."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    cuda = device.type == "cuda"
    # Both code paths once on tiny tensors: thread pools, kernels and the autograd engine allocate
    # tens of MiB on first use, which would otherwise land in one configuration's figure.
    for warm in MODES:
        tiny = torch.ones(1, 8, device=device)
        teacher = ((torch.randn(1, 8, 4, device=device), torch.randn(4, 16, device=device)) if warm == "hidden"
                   else torch.randn(1, 8, 16, device=device))
        step(warm, divergence, torch.randn(1, 8, 4, device=device), torch.randn(4, 16, device=device).requires_grad_(),
             teacher, tiny, 2)
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
    if mode == "hidden":
        teacher = hidden_t, teacher_weight
    else:
        with torch.no_grad():
            teacher = hidden_t @ teacher_weight
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
        loss = step(mode, divergence, hidden, weight, teacher, mask, opts.chunk_size)
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
            for mode in MODES:
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:  # a fresh process per configuration
                    results[mode] = pool.submit(measure, vocab, divergence, mode, opts).result()
                r = results[mode]
                rows.append(f"| {vocab} | {divergence} | {mode} | {r['tokens_per_s']:,.0f} | {r['peak_mib']:,.0f} |")
            full = results["whole"]
            for mode in MODES[1:]:
                other = results[mode]
                grad_diff = (full["grad"] - other["grad"]).abs().max().item()
                checks.append(f"| {vocab} | {divergence} | {mode} | {positions * vocab * 4 / 2**20:,.0f} "
                              f"| {full['peak_mib'] / max(other['peak_mib'], 1e-9):.1f}x | {full['loss']:.4f} "
                              f"| {abs(full['loss'] - other['loss']):.1e} | {grad_diff:.1e} "
                              f"| {full['grad'].abs().max().item():.1e} |")

    memory = "peak CUDA memory" if opts.device == "cuda" else "peak RSS increase"
    masked = opts.batch * (opts.seq_len - opts.seq_len // 4)
    print(f"White-box KD step on {opts.device}: B={opts.batch}, T={opts.seq_len} ({positions} positions, "
          f"{masked} masked), d={opts.hidden}, threads={opts.threads or torch.get_num_threads()}, "
          f"median of {opts.repeats} after a warm-up\n")
    if masked <= opts.chunk_size:
        print(f"note: {masked} masked positions <= chunk size {opts.chunk_size}, so the loss takes the "
              "unchunked path in both runs\n")
    print(f"| vocab | divergence | logits (chunk_size {opts.chunk_size}) | tokens/s | {memory} (MiB) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| vocab | divergence | against whole | one [B*T, V] fp32 (MiB) | peak whole/this | loss "
          "| abs loss diff | max abs dW diff | max abs dW |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(checks))


if __name__ == "__main__":
    main()
