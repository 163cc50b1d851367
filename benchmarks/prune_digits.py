"""Magnitude pruning on digits vs torch.nn.utils.prune.global_unstructured, in one run.

For each seed: train one dense baseline; then for every method measure
  * one-shot accuracy (pruned at the target, no fine-tune),
  * 1-epoch accuracy (short budget: where criteria differ),
  * full-budget accuracy (``--epochs`` of fine-tuning),
with the same optimizer (Adam, cosine learning-rate decay), data order and epochs for slimkit and
the peer (the baseline trains with the same loop). slimkit prunes gradually
(cubic schedule over the first 60% of the budget) or once at step 0 ("one-shot" rows: a constant
schedule); "lamp" rows rank globally by LAMP scores instead of raw magnitude; the peer prunes
once, as its API is used. torch runs on ``--threads`` threads. Also
measured: training-step time with masks vs dense (interleaved, same run), and the packed checkpoint
size at 80% sparsity with fp16 values vs the dense fp32 checkpoint.

Run: python -m benchmarks.prune_digits [--seeds 0 1 2 3 4] [--epochs 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from benchmarks.common import environment, md_table, update_readme_section, write_result
from benchmarks.common import train as common_train
from slimkit import NM, Block, Compressor, MagnitudePruningConfig, PolynomialSchedule, save_packed
from slimkit.measure.latency import time_callable
from slimkit.measure.size import dense_checkpoint_bytes
from slimkit.tasks.digits import make_digits_task


def train(model: nn.Module, task, epochs: int, lr: float, seed: int, compressor=None) -> None:
    """Adam with cosine learning-rate decay over the whole budget (the same for every method)."""
    common_train(model, task, epochs, lr, seed, compressor=compressor)


def slimkit_method(
    name: str,
    sparsity: float,
    ranking: str,
    pattern=None,
    gradual: bool = True,
    importance: str = "magnitude",
) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "slimkit",
        "sparsity": sparsity,
        "ranking": ranking,
        "pattern": pattern,
        "gradual": gradual,
        "importance": importance,
    }


def methods(levels=(0.5, 0.8, 0.9, 0.95), patterns: bool = True) -> list[dict[str, Any]]:
    out = []
    for s in levels:
        out.append(slimkit_method(f"slimkit local {s:.0%}", s, "local"))
        out.append(slimkit_method(f"slimkit global {s:.0%}", s, "global"))
        out.append(slimkit_method(f"slimkit global lamp {s:.0%}", s, "global", importance="lamp"))
        out.append(
            slimkit_method(
                f"slimkit global lamp one-shot {s:.0%}",
                s,
                "global",
                gradual=False,
                importance="lamp",
            )
        )
        out.append({"name": f"torch global_unstructured {s:.0%}", "kind": "peer", "sparsity": s})
    if not patterns:
        return out
    out.append(slimkit_method("slimkit 2:4", 0.5, "local", NM(n=2, m=4)))
    out.append(slimkit_method("slimkit 1x16 blocks 50%", 0.5, "local", Block(shape=(1, 16))))
    out.append(slimkit_method("slimkit 1x16 blocks 80%", 0.8, "global", Block(shape=(1, 16))))
    return out


def slimkit_config(method: dict[str, Any], steps: int, one_shot: bool) -> MagnitudePruningConfig:
    pattern = method["pattern"]
    kwargs: dict[str, Any] = {"ranking": method["ranking"], "importance": method["importance"]}
    if pattern is not None:
        kwargs["pattern"] = pattern
    if one_shot or steps == 0 or not method["gradual"]:
        if not isinstance(pattern, NM):
            kwargs["sparsity"] = method["sparsity"]
        return MagnitudePruningConfig(**kwargs)
    end = max(1, int(steps * 0.6))
    kwargs["schedule"] = PolynomialSchedule(
        final=method["sparsity"], begin=0, end=end, frequency=max(1, end // 12)
    )
    return MagnitudePruningConfig(**kwargs)


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def run_method(method, baseline, task, epochs, lr, seed, steps_per_epoch) -> dict[str, float]:
    out = {}
    for label, n_epochs in (("one_shot", 0), ("one_epoch", 1), ("full", epochs)):
        model = copy.deepcopy(baseline)
        torch.manual_seed(seed)
        if method["kind"] == "peer":
            torch_prune.global_unstructured(
                prunable(model),
                pruning_method=torch_prune.L1Unstructured,
                amount=method["sparsity"],
            )
            train(model, task, n_epochs, lr, seed)
            for module, name in prunable(model):
                torch_prune.remove(module, name)
        else:
            cfg = slimkit_config(method, n_epochs * steps_per_epoch, one_shot=n_epochs == 0)
            compressor = Compressor([cfg]).apply(model)
            train(model, task, n_epochs, lr, seed, compressor)
            model = compressor.finalize()
        weights = [m.weight for m, _ in prunable(model)]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        out[label] = task.metric(model, task.test_loader)
        out[f"{label}_weight_sparsity"] = zeros
    return out


def step_time_ratio(task, repeats: int = 15) -> dict[str, float]:
    """Median dense vs masked training step (batch 64), measured interleaved in one process."""
    torch.manual_seed(0)
    dense = task.make_model()
    masked = copy.deepcopy(dense)
    compressor = Compressor([MagnitudePruningConfig(sparsity=0.8, ranking="global")]).apply(masked)
    x, y = next(iter(task.train_loader(0)))

    def stepper(model, comp=None):
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if comp is not None:
                comp.step()

        return step

    fd, fm = stepper(dense), stepper(masked, compressor)
    td, tm = [], []
    for _ in range(repeats):
        td.append(statistics.median(time_callable(fd, warmup=3, repeats=10)))
        tm.append(statistics.median(time_callable(fm, warmup=3, repeats=10)))
    d, m = statistics.median(td) * 1e3, statistics.median(tm) * 1e3
    return {"dense_step_ms": d, "masked_step_ms": m, "ratio": m / d}


def packed_ratio(baseline: nn.Module) -> dict[str, Any]:
    model = copy.deepcopy(baseline)
    compressor = Compressor([MagnitudePruningConfig(sparsity=0.8)]).apply(model)
    model = compressor.finalize()
    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for dtype in ("float16", "float32"):
            report = save_packed(model, Path(tmp) / f"m-{dtype}.safetensors", values_dtype=dtype)
            out[dtype] = report.bytes_on_disk
        dense = dense_checkpoint_bytes(model)
    return {
        "dense_fp32_bytes": dense,
        "packed_fp16_bytes": out["float16"],
        "packed_fp32_bytes": out["float32"],
        "ratio_fp16": out["float16"] / dense,
        "ratio_fp32": out["float32"] / dense,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=8, help="fine-tune budget (full)")
    parser.add_argument("--baseline-epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (stated in JSON)")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--width", type=int, default=16, help="DigitsResNet base width")
    parser.add_argument(
        "--name",
        default="prune_digits",
        help="result/README section name; patterns only in default",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    per_seed: dict[str, list[dict[str, float]]] = {}
    dense_acc = []
    for seed in args.seeds:
        task = make_digits_task(seed=seed, width=args.width)
        torch.manual_seed(seed)
        baseline = task.make_model()
        train(baseline, task, args.baseline_epochs, 3e-3, seed + 10_000)
        dense_acc.append(task.metric(baseline, task.test_loader))
        steps_per_epoch = len(task.train_loader(0))
        for method in methods(args.levels, patterns=args.name == "prune_digits"):
            res = run_method(method, baseline, task, args.epochs, args.lr, seed, steps_per_epoch)
            per_seed.setdefault(method["name"], []).append(res)
            print(f"seed {seed} {method['name']:<32} {res}", flush=True)
    timing = step_time_ratio(task)
    packed = packed_ratio(baseline)

    def mean(values: list[float]) -> float:
        return statistics.fmean(values)

    summary = {}
    for name, runs in per_seed.items():
        summary[name] = {k: mean([r[k] for r in runs]) for k in runs[0]}
        summary[name]["full_spread"] = max(r["full"] for r in runs) - min(r["full"] for r in runs)
    dense = mean(dense_acc)
    params = sum(p.numel() for p in baseline.parameters())
    checks = {
        "step_time_ratio_le_1.10": timing["ratio"] <= 1.10,
        "packed_fp16_ratio_le_0.15": packed["ratio_fp16"] <= 0.15,
    }
    if 0.8 in args.levels:
        best80 = max(
            summary[f"slimkit {k} 80%"]["full"]
            for k in ("global", "global lamp", "global lamp one-shot")
        )
        checks["global_80_within_0.5pt"] = dense - best80 <= 0.005
    for s in (f"{level:.0%}" for level in args.levels):
        peer = summary[f"torch global_unstructured {s}"]
        kinds = ("local", "global", "global lamp", "global lamp one-shot")
        ours = [summary[f"slimkit {kind} {s}"] for kind in kinds]
        checks[f"global_ge_peer_full_{s}"] = summary[f"slimkit global {s}"]["full"] >= peer["full"]
        for budget in ("one_shot", "one_epoch", "full"):
            checks[f"best_ge_peer_{budget}_{s}"] = max(r[budget] for r in ours) >= peer[budget]
    payload = {
        "benchmark": "prune_digits",
        "args": vars(args),
        "env": environment(),
        "dense_test_accuracy": {"per_seed": dense_acc, "mean": dense},
        "methods": summary,
        "per_seed": per_seed,
        "step_time": timing,
        "packed": packed,
        "checks": checks,
        "wall_s": time.perf_counter() - start,
    }
    write_result(args.name, payload)
    rows = [
        [
            name,
            f"{v['one_shot']:.4f}",
            f"{v['one_epoch']:.4f}",
            f"{v['full']:.4f}",
            f"{v['full_spread']:.4f}",
            f"{v['full_weight_sparsity']:.3f}",
        ]
        for name, v in summary.items()
    ]
    text = (
        f"Digits ResNet width {args.width} ({params} params; test set, mean of seeds "
        f"{args.seeds}); dense baseline **{dense:.4f}**. "
        f"Fine-tune budget {args.epochs} epochs (Adam lr {args.lr}, cosine decay), torch threads "
        f"{args.threads}; peer = "
        "`torch.nn.utils.prune.global_unstructured` (L1, one-shot) with the same budget.\n\n"
        + md_table(
            [
                "method",
                "one-shot",
                "1 epoch",
                f"{args.epochs} epochs",
                "spread (full)",
                "weight sparsity",
            ],
            rows,
        )
        + f"\n\nTraining step with masks vs dense (batch 64, interleaved): "
        f"{timing['masked_step_ms']:.2f} ms vs {timing['dense_step_ms']:.2f} ms = "
        f"**x{timing['ratio']:.3f}**. Packed checkpoint at 80% sparsity: fp16 values "
        f"**x{packed['ratio_fp16']:.3f}** of dense fp32 ({packed['packed_fp16_bytes']} vs "
        f"{packed['dense_fp32_bytes']} bytes), fp32 values x{packed['ratio_fp32']:.3f}.\n\n"
        "Checks: "
        + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in checks.items())
        + f"\n\nReproduce: `.venv/bin/python -m benchmarks.prune_digits {' '.join(sys.argv[1:])}`"
    )
    update_readme_section(args.name, text)
    print(text)


if __name__ == "__main__":
    main()
