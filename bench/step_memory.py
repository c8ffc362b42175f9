"""Where a CPU training step's memory goes: what autograd saves for backward (by node type, each storage once) and
the process's resident peak over a few forward + backward passes of medgen's own training model (build_trainer:
the same loss, LoRA layers and activation savers as `medgen train`), each timed.

    python bench/step_memory.py --model smollm2-135m --batch 8 --max-length 1024
    MALLOC_MMAP_THRESHOLD_=1048576 python bench/step_memory.py --model smollm2-135m   # glibc returns freed blocks
    python bench/step_memory.py --model smollm2-135m --set train.release_memory=true
    git archive 665c78d --prefix=old/ | tar -x -C /tmp && python bench/step_memory.py --root /tmp/old  # another commit

The resident peak (VmHWM) is reset before each pass, so each line's peak is that pass's. Data: the real Medium
sample, prepared into a temporary folder.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_train import step_setup  # noqa: E402


def saved_bytes(loss: torch.Tensor) -> collections.Counter:
    """Bytes autograd keeps for backward under ``loss``, by (node type, dtype), each storage counted once."""
    seen, by, stack, visited = set(), collections.Counter(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors = []
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    v = getattr(node, name)
                except RuntimeError:  # already freed
                    continue
                tensors += v if isinstance(v, (tuple, list)) else [v]
        if hasattr(node, "saved_tensors"):  # custom autograd functions
            tensors += list(node.saved_tensors)
        for t in tensors:
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                by[(type(node).__name__, str(t.dtype).replace("torch.", ""))] += t.untyped_storage().nbytes()
        stack += [n for n, _ in node.next_functions]
    return by


def resident_peak_gb() -> float:
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=["gpt2-124m", "smollm2-135m"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="medgen config override")
    ap.add_argument("--root", type=Path, default=ROOT, help="the medgen checkout to measure (e.g. an older commit's "
                    "tree from `git archive`)")
    args = ap.parse_args()
    sys.path.insert(0, str(args.root))  # before medgen is first imported
    os.environ["HF_HUB_OFFLINE"] = "1"
    setup = step_setup(args.model, args.batch, args.max_length, 1, args.set, prefix="step-memory-")
    trainer, model = setup.trainer, setup.trainer.model
    model.train()
    batch = {k: v for k, v in next(iter(trainer.get_train_dataloader())).items() if torch.is_tensor(v)}
    bf16 = setup.precision == "bf16"
    print(f"{args.model}, {args.batch} x {args.max_length}, precision {setup.precision}, overrides {args.set}, "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', '')}")
    for i in range(args.passes):
        open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = trainer.compute_loss(model, batch)
        t1 = time.perf_counter()
        if i == 0:
            by = saved_bytes(loss)
            print(f"saved for backward: {sum(by.values()) / 1e9:.2f} GB")
            for (node, dtype), n in by.most_common(8):
                print(f"  {n / 1e9:6.2f} GB  {node} ({dtype})")
        loss.backward()
        del loss
        print(f"pass {i}: forward {t1 - t0:.1f} s, backward {time.perf_counter() - t1:.1f} s, "
              f"resident peak {resident_peak_gb():.2f} GB", flush=True)


if __name__ == "__main__":
    main()
