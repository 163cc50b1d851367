"""Knowledge distillation on digits: scratch vs KD vs KD+hint, prune+KD, W4A8 QAT+KD, full recipe.

For each seed (the digits split, the 20% label subset, the init and the data order all follow it):

1. teacher: ``DigitsResNet(width=16)`` trained on the full train split (Adam, cosine decay);
   student: ``DigitsResNet(width=4)`` (1/4 width) trained on a fixed stratified 20% subset of the
   train split (the same subset, init and batch order for every method) for the same number of
   epochs: (a) from scratch (cross-entropy), (b) + soft labels (KL, T=4; the teacher sees the
   same batches), (c) + soft labels + a FitNets hint ``layer3 -> layer3`` (1x1 adapter),
   (d) + soft labels + attention transfer on ``layer2`` and ``layer3``, and, with mixup
   (every image of a batch blended with another of the same batch, weight ~ U(0, 1)):
   (e) from scratch on the mixed images with mixed labels (the augmentation's own gain), and
   (f) "function matching" (Beyer et al., CVPR 2022, "a good teacher is patient and
   consistent"): the student matches the teacher's soft labels on the same mixed images, KD loss
   only (``task_weight: 0``) — the teacher labels points between the labelled images;
2. the teacher magnitude-pruned (global, one-shot) to 80% / 90% and fine-tuned on the subset,
   with and without KD from the unpruned teacher;
3. W4A8 QAT (LSQ) of the teacher, fine-tuned on the subset, with and without KD (accuracy of the
   fake-quantized model);
4. ``recipes/digits_full.yaml`` through ``run_recipe`` (structured prune to 50% FLOPs + KD +
   int8 static PTQ, packed int8 checkpoint, ONNX, ORT latency) as shipped (seed 0), and again
   with its seed replaced by each of ``--recipe-seeds`` (default 1 2).

Run: python -m benchmarks.kd_digits [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Subset

from benchmarks.common import environment, md_table, update_readme_section, write_result
from benchmarks.common import train as common_train
from slimkit import Compressor, MagnitudePruningConfig, QATConfig
from slimkit.distill import (
    Distillation,
    DistillationConfig,
    FeaturePairConfig,
    SoftLabelConfig,
    frozen_copy,
)
from slimkit.models.cnn import DigitsResNet
from slimkit.tasks.digits import make_digits_task

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "digits_full.yaml"


def subset_loader_factory(task, fraction: float, seed: int, batch_size: int = 64):
    """A stratified ``fraction`` of the train split (fixed for ``seed``) and its loader factory."""
    dataset = task.train_loader(0).dataset
    labels = dataset.tensors[1].numpy()
    keep, _ = train_test_split(
        list(range(len(labels))), train_size=fraction, stratify=labels, random_state=seed
    )
    subset = Subset(dataset, sorted(keep))

    def loader(epoch_seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(epoch_seed)
        return DataLoader(subset, batch_size, shuffle=True, generator=generator)

    return loader, len(subset)


def mixup_loader_factory(loader_factory):
    """Batches ``(x_mixed, y, y_other, lam)``: each image blended with a random other image of
    its batch, ``x_mixed = lam * x + (1 - lam) * x[perm]``, ``lam ~ U(0, 1)`` (Beta(1, 1)) per
    image; the mixing follows the epoch seed, so every method sees the same mixed batches."""

    def mix(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        lam = torch.rand(len(x), generator=generator)
        perm = torch.randperm(len(x), generator=generator)
        mixed = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[perm]
        return mixed, y, y[perm], lam

    def loader(epoch_seed: int) -> list:  # a list: common.train takes its len for the decay
        generator = torch.Generator().manual_seed(10_000 + epoch_seed)
        return [mix(x, y, generator) for x, y in loader_factory(epoch_seed)]

    return loader


def mixup_cross_entropy(outputs: torch.Tensor, batch) -> torch.Tensor:
    """Cross-entropy against the mixed labels of a mixup batch."""
    _, y, y_other, lam = batch
    ce = nn.functional.cross_entropy
    per_image = lam * ce(outputs, y, reduction="none")
    return (per_image + (1 - lam) * ce(outputs, y_other, reduction="none")).mean()


def kd_technique(
    teacher: nn.Module, task, pairs: list[FeaturePairConfig], task_weight: float = 1.0
) -> Distillation:
    config = DistillationConfig(
        teacher="baseline",
        soft_label=SoftLabelConfig(loss="kl", temperature=4.0, weight=1.0),
        pairs=pairs,
        task_weight=task_weight,
    )
    kd = Distillation(config).bind(frozen_copy(teacher), task.forward)
    kd.example_inputs = task.example_inputs
    return kd


def train(model, task, loader, epochs: int, lr: float, seed: int, techniques=()) -> nn.Module:
    """Adam + cosine decay over the budget; ``techniques`` (distill first) go in a Compressor.

    Returns the applied (not yet finalized) compressor, or None without techniques; the loss is
    ``task_weight * task_loss + compressor.loss(outputs, batch)``.
    """
    compressor = Compressor(list(techniques)).apply(model) if techniques else None
    common_train(model, task, epochs, lr, seed, compressor=compressor, loader=loader)
    return compressor


def hint_pairs() -> list[FeaturePairConfig]:
    return [FeaturePairConfig(student="layer3", teacher="layer3", loss="hint", weight=1.0)]


def attention_pairs() -> list[FeaturePairConfig]:
    return [
        FeaturePairConfig(student=name, teacher=name, loss="attention", weight=1.0)
        for name in ("layer2", "layer3")
    ]


STUDENTS = ("scratch", "kd", "kd+hint", "kd+attention", "scratch+mixup", "kd function matching")


def student_runs(task, teacher, loader, args, seed) -> dict[str, float]:
    out = {}
    mixed = mixup_loader_factory(loader)
    mixup_task = replace(task, loss=mixup_cross_entropy)
    for name, pairs, run_task, run_loader, task_weight in (
        ("scratch", None, task, loader, 1.0),
        ("kd", [], task, loader, 1.0),
        ("kd+hint", hint_pairs(), task, loader, 1.0),
        ("kd+attention", attention_pairs(), task, loader, 1.0),
        ("scratch+mixup", None, mixup_task, mixed, 1.0),
        ("kd function matching", [], mixup_task, mixed, 0.0),
    ):
        torch.manual_seed(seed)
        student = DigitsResNet(width=args.student_width)
        techniques = [] if pairs is None else [kd_technique(teacher, task, pairs, task_weight)]
        compressor = train(student, run_task, run_loader, args.epochs, args.lr, seed, techniques)
        if compressor is not None:
            student = compressor.finalize()
        out[name] = task.metric(student, task.test_loader)
        print(f"seed {seed} student {name:<14} {out[name]:.4f}", flush=True)
    return out


def prune_runs(task, teacher, loader, args, seed) -> dict[str, float]:
    out = {}
    for sparsity in args.sparsities:
        for use_kd in (False, True):
            torch.manual_seed(seed)
            model = copy.deepcopy(teacher)
            techniques: list[Any] = [kd_technique(teacher, task, [])] if use_kd else []
            techniques.append(MagnitudePruningConfig(sparsity=sparsity, ranking="global"))
            compressor = train(model, task, loader, args.prune_epochs, args.ft_lr, seed, techniques)
            model = compressor.finalize()
            name = f"prune {sparsity:.0%}" + (" + KD" if use_kd else "")
            out[name] = task.metric(model, task.test_loader)
            print(f"seed {seed} {name:<22} {out[name]:.4f}", flush=True)
        model = copy.deepcopy(teacher)
        compressor = Compressor([MagnitudePruningConfig(sparsity=sparsity, ranking="global")])
        model = compressor.apply(model).finalize()
        out[f"prune {sparsity:.0%} one-shot (no fine-tune)"] = task.metric(model, task.test_loader)
    return out


def qat_runs(task, teacher, loader, args, seed) -> dict[str, float]:
    out = {}
    for use_kd in (False, True):
        torch.manual_seed(seed)
        model = copy.deepcopy(teacher)
        techniques: list[Any] = [kd_technique(teacher, task, [])] if use_kd else []
        techniques.append(QATConfig(wbits=4, abits=8, method="lsq"))
        compressor = train(model, task, loader, args.qat_epochs, args.ft_lr, seed, techniques)
        name = "W4A8 QAT" + (" + KD" if use_kd else "")
        out[name] = task.metric(model, task.test_loader)  # fake-quantized weights and inputs
        compressor.finalize()
        print(f"seed {seed} {name:<22} {out[name]:.4f}", flush=True)
    return out


def run_full_recipe(run_dir: Path, seed: int | None = None) -> dict[str, Any]:
    """Run ``recipes/digits_full.yaml`` as shipped, or with its ``seed`` replaced (a new split,
    baseline and fine-tune order)."""
    from slimkit.recipe.runner import run_recipe
    from slimkit.recipe.schema import load_recipe

    recipe = load_recipe(RECIPE)
    if seed is not None:
        recipe = recipe.model_copy(update={"seed": seed})
    start = time.perf_counter()
    run_recipe(recipe, run_dir, progress=False)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return {"wall_s": wall, "metrics": metrics}


def beats(method: dict[str, Any], control: dict[str, Any]) -> bool:
    """The issue's test: the mean gain exceeds the larger of the two seed spreads (max - min)."""
    return method["mean"] - control["mean"] > max(method["spread"], control["spread"])


def stats(values: list[float]) -> dict[str, Any]:
    return {
        "per_seed": values,
        "mean": statistics.fmean(values),
        "spread": max(values) - min(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="short budgets (smoke run)")
    parser.add_argument("--fraction", type=float, default=0.2, help="labelled train fraction")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=150, help="student epochs (all methods)")
    parser.add_argument("--prune-epochs", type=int, default=2)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3, help="student lr")
    parser.add_argument("--ft-lr", type=float, default=1e-3, help="prune/QAT fine-tune lr")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    parser.add_argument("--student-width", type=int, default=4)
    parser.add_argument("--teacher-width", type=int, default=16)
    parser.add_argument("--no-recipe", action="store_true", help="skip the full recipe run")
    parser.add_argument("--recipe-metrics", type=Path, help="reuse a finished run's metrics.json")
    parser.add_argument(
        "--recipe-seeds",
        type=int,
        nargs="*",
        default=[1, 2],
        help="also run the full recipe with these seeds (robustness of the shipped seed's result)",
    )
    args = parser.parse_args()
    if args.quick:
        args.teacher_epochs, args.epochs, args.qat_epochs = 5, 10, 1
    torch.set_num_threads(1)
    start = time.perf_counter()
    per_seed: dict[str, list[float]] = {}
    teacher_acc = []
    subset_size = 0
    for seed in args.seeds:
        task = make_digits_task(seed=seed, width=args.teacher_width)
        torch.manual_seed(seed)
        teacher = task.make_model()
        train(teacher, task, task.train_loader, args.teacher_epochs, 3e-3, seed + 10_000)
        teacher_acc.append(task.metric(teacher, task.test_loader))
        print(f"seed {seed} teacher {teacher_acc[-1]:.4f}", flush=True)
        loader, subset_size = subset_loader_factory(task, args.fraction, seed)
        results = {}
        results.update(student_runs(task, teacher, loader, args, seed))
        results.update(prune_runs(task, teacher, loader, args, seed))
        results.update(qat_runs(task, teacher, loader, args, seed))
        for name, value in results.items():
            per_seed.setdefault(name, []).append(value)
    summary = {name: stats(values) for name, values in per_seed.items()}
    teacher_stats = stats(teacher_acc)

    recipe: dict[str, Any] | None = None
    if args.recipe_metrics is not None:
        recipe = {
            "wall_s": None,
            "metrics": json.loads(args.recipe_metrics.read_text(encoding="utf-8")),
            "source": str(args.recipe_metrics),
        }
    elif not args.no_recipe:
        with tempfile.TemporaryDirectory() as tmp:
            recipe = run_full_recipe(Path(tmp) / "digits_full")
    recipe_summary = summarize_recipe(recipe["metrics"]) if recipe else None
    other_seeds = {}
    if not args.no_recipe:
        for seed in args.recipe_seeds:
            with tempfile.TemporaryDirectory() as tmp:
                run = run_full_recipe(Path(tmp) / "digits_full", seed=seed)
            other_seeds[seed] = summarize_recipe(run["metrics"])
            print(f"recipe seed {seed}: drop {other_seeds[seed]['drop_ort']:+.4f}", flush=True)

    checks = {}
    for method, control in (
        ("kd", "scratch"),
        ("kd+hint", "scratch"),
        ("kd+attention", "scratch"),
        ("kd function matching", "scratch"),
        ("kd function matching", "scratch+mixup"),
    ):
        checks[f"{method}_beats_{control}_by_more_than_spread"] = beats(
            summary[method], summary[control]
        )
    if recipe_summary:
        r = recipe_summary
        checks["full_recipe_within_1pt_torch"] = r["drop_torch"] <= 0.01
        checks["full_recipe_within_1pt_ort"] = r["drop_ort"] <= 0.01
        checks["full_recipe_packed_le_0.125_of_dense"] = r["packed_ratio"] <= 0.125
        checks["full_recipe_ge_2x_faster_ort_batch64"] = r["speedup"]["64"] >= 2.0
    if other_seeds:
        runs = [recipe_summary, *other_seeds.values()] if recipe_summary else other_seeds.values()
        mean_drop = statistics.fmean(run["drop_ort"] for run in runs)
        checks["full_recipe_mean_drop_over_seeds_le_1pt_ort"] = mean_drop <= 0.01
    payload = {
        "benchmark": "kd_digits",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "env": environment(),
        "subset_size": subset_size,
        "teacher": teacher_stats,
        "methods": summary,
        "recipe": recipe_summary,
        "recipe_other_seeds": other_seeds,
        "recipe_metrics": recipe["metrics"] if recipe else None,
        "checks": checks,
        "wall_s": time.perf_counter() - start,
    }
    write_result("kd_digits", payload)
    text = render(args, payload)
    update_readme_section("kd_digits", text)
    print(text)


def summarize_recipe(metrics: dict[str, Any]) -> dict[str, Any]:
    """Pull the numbers the issue asks for out of the run's ``metrics.json``."""
    base = metrics["baseline"]
    kept = next(s for s in metrics["stages"] if s["name"] == metrics["kept"])
    art = metrics["artifacts"]
    latency = art["onnx"]["latency"]
    base_ms = {str(b): v for b, v in latency["median_ms"]["baseline"].items()}
    model_ms = {str(b): v for b, v in latency["median_ms"]["model"].items()}
    out: dict[str, Any] = {
        "kept_stage": metrics["kept"],
        "baseline_torch": base["test_metric"],
        "final_torch": kept["test_metric"],
        "baseline_ort": base["onnx"]["test_metric"],
        "final_ort": art["onnx"]["test_accuracy"],
        "baseline_macs": base["macs"],
        "final_macs": kept["macs"],
        "baseline_params": base["params"],
        "final_params": kept["params"],
        "packed_bytes": art["packed"]["bytes"],
        "packed_values_dtype": art["packed"]["values_dtype"],
        "dense_fp32_bytes": art["packed"]["dense_fp32_bytes"],
        "packed_ratio": art["packed"]["ratio"],
        "baseline_onnx_bytes": art["onnx"]["baseline_bytes"],
        "final_onnx_bytes": art["onnx"]["model_bytes"],
        "onnx_size_ratio": art["onnx"]["size_ratio"],
        "ort_threads": latency["threads"],
        "baseline_latency_ms": base_ms,
        "final_latency_ms": model_ms,
        "speedup": {b: base_ms[b] / model_ms[b] for b in base_ms if b in model_ms},
        "stages": [
            {
                "name": s["name"],
                "test_torch": s["test_metric"],
                "test_ort": (s.get("onnx") or {}).get("test_metric"),
                "macs": s["macs"],
                "params": s["params"],
                "onnx_bytes": (s.get("onnx") or {}).get("bytes"),
            }
            for s in metrics["stages"]
        ],
    }
    out["drop_torch"] = out["baseline_torch"] - out["final_torch"]
    out["drop_ort"] = out["baseline_ort"] - out["final_ort"]
    return out


def reading(payload: dict[str, Any]) -> str:
    """The numbers above in words: which targets are met, by how much."""
    s, checks = payload["methods"], payload["checks"]

    def gain(method: str, control: str = "scratch") -> str:
        margin = (s[method]["mean"] - s[control]["mean"]) * 100
        spread = max(s[method]["spread"], s[control]["spread"]) * 100
        verdict = "more" if margin > spread else "less"
        return f"{margin:+.1f} pt over {control} ({verdict} than the {spread:.1f} pt spread)"

    text = [
        "Reading: **KD vs scratch** — plain soft labels give "
        + gain("kd")
        + ", hint "
        + gain("kd+hint")
        + ", attention "
        + gain("kd+attention")
        + "; on 251 labelled images these gains are real on average but below the seed spread. "
        "Function matching (the teacher labels mixup blends of the same images) gives "
        + gain("kd function matching")
        + " and "
        + gain("kd function matching", "scratch+mixup")
        + ", so the gain is the teacher's, not the augmentation's."
    ]
    r = payload["recipe"]
    if r:
        drops = [r["drop_ort"], *(o["drop_ort"] for o in payload["recipe_other_seeds"].values())]
        text.append(
            f" **Full recipe** (shipped seed): {-r['drop_ort'] * 100:+.2f} pt in ORT (target "
            f"within 1 pt: {'met' if checks['full_recipe_within_1pt_ort'] else 'not met'}; mean "
            f"over {len(drops)} seeds {-statistics.fmean(drops) * 100:+.2f} pt), packed int8 "
            f"x{r['packed_ratio']:.3f} of dense fp32 (target <= 0.125: "
            f"{'met' if checks['full_recipe_packed_le_0.125_of_dense'] else 'not met'}), ORT "
            f"x{r['speedup']['64']:.2f} faster at batch 64 (target >= 2x: "
            f"{'met' if checks['full_recipe_ge_2x_faster_ort_batch64'] else 'not met'}); at "
            f"batch 1 an 8x8 image costs ~{r['baseline_latency_ms']['1'] * 1000:.0f} us, ORT's "
            "per-call overhead, and int8 gives no speed-up there."
        )
    return "".join(text)


def fmt(stat: dict[str, Any]) -> str:
    return f"{stat['mean']:.4f} ± {stat['spread'] / 2:.4f}"


def render(args, payload: dict[str, Any]) -> str:
    s = payload["methods"]
    seeds = args.seeds
    per = lambda name: ", ".join(f"{v:.4f}" for v in s[name]["per_seed"])  # noqa: E731
    student_rows = [
        [
            name,
            fmt(s[name]),
            f"{s[name]['spread']:.4f}",
            f"{s[name]['mean'] - s['scratch']['mean']:+.4f}",
            per(name),
        ]
        for name in STUDENTS
    ]
    other = [n for n in s if n not in STUDENTS]
    other_rows = [[name, fmt(s[name]), f"{s[name]['spread']:.4f}", per(name)] for name in other]
    t = payload["teacher"]
    lines = [
        f"Digits (sklearn 8x8, stratified 70/15/15 split per seed; test set). Seeds {seeds}; "
        f"mean ± half-range over seeds (spread = max - min). Teacher `DigitsResNet(width="
        f"{args.teacher_width})` trained {args.teacher_epochs} epochs on the full train split "
        f"(Adam 3e-3, cosine): **{t['mean']:.4f}** (spread {t['spread']:.4f}). Students "
        f"`DigitsResNet(width={args.student_width})` trained {args.epochs} epochs on a stratified "
        f"{args.fraction:.0%} label subset ({payload['subset_size']} images; same subset, init "
        f"and batch order per seed for every method), Adam {args.lr}, cosine; KD = soft labels "
        "(KL, T=4, weight 1) + cross-entropy (weight 1); hint = `layer3`→`layer3` MSE via a 1x1 "
        "adapter; attention = attention transfer on `layer2`, `layer3`. Mixup rows: each image "
        "blended with another of its batch (weight ~ U(0, 1), the same mixed batches for both); "
        "scratch+mixup trains on the mixed labels, *kd function matching* (Beyer et al. 2022, "
        "patient and consistent teacher) on the teacher's soft labels of the same mixed images "
        "only (`task_weight: 0`).",
        "",
        md_table(["student", "accuracy", "spread", "vs scratch", "per seed"], student_rows),
        "",
        f"Teacher-sized model compressed and fine-tuned on the same {args.fraction:.0%} subset "
        f"(Adam {args.ft_lr}, cosine): global magnitude pruning, one-shot, {args.prune_epochs} "
        f"epochs; W4A8 QAT (LSQ, per-channel 4-bit weights, 8-bit inputs) {args.qat_epochs} "
        "epochs, accuracy of the fake-quantized model. KD = soft labels from the uncompressed "
        "teacher.",
        "",
        md_table(["model", "accuracy", "spread", "per seed"], other_rows),
    ]
    r = payload["recipe"]
    if r:
        lat_rows = [
            [
                f"batch {b}",
                f"{r['baseline_latency_ms'][b]:.4g}",
                f"{r['final_latency_ms'][b]:.4g}",
                f"x{r['speedup'][b]:.2f}",
            ]
            for b in sorted(r["baseline_latency_ms"], key=int)
        ]
        stage_rows = [
            [
                st["name"],
                f"{st['test_torch']:.4f}",
                "-" if st["test_ort"] is None else f"{st['test_ort']:.4f}",
                st["macs"],
                st["params"],
                st["onnx_bytes"],
            ]
            for st in r["stages"]
        ]
        lines += [
            "",
            "Full recipe `recipes/digits_full.yaml` (seed 0, one run through "
            "`slimkit.recipe.runner.run_recipe`): baseline = the width-16 model trained 15 "
            "epochs on the full train split; structured prune to 50% FLOPs (global allocation, "
            "`group_l1` importance, widths rounded to 8) fine-tuned 20 epochs on the full train "
            "split with KD from the baseline (soft labels T=4 + `layer3` hint), then int8 static "
            "PTQ (the 1-channel stem conv `conv1` kept in float); "
            f"packed {r['packed_values_dtype']} checkpoint and ONNX QDQ; ORT on "
            f"{r['ort_threads']} thread, final comparison timed interleaved by the runner.",
            "",
            md_table(
                ["", "baseline", "full recipe"],
                [
                    [
                        "test accuracy (torch)",
                        f"{r['baseline_torch']:.4f}",
                        f"{r['final_torch']:.4f}",
                    ],
                    ["test accuracy (ORT)", f"{r['baseline_ort']:.4f}", f"{r['final_ort']:.4f}"],
                    ["MACs", r["baseline_macs"], r["final_macs"]],
                    ["params", r["baseline_params"], r["final_params"]],
                    [
                        "checkpoint bytes",
                        f"{r['dense_fp32_bytes']} (dense fp32)",
                        f"{r['packed_bytes']} (packed, x{r['packed_ratio']:.3f})",
                    ],
                    [
                        "ONNX bytes",
                        r["baseline_onnx_bytes"],
                        f"{r['final_onnx_bytes']} (x{r['onnx_size_ratio']:.3f})",
                    ],
                ],
            ),
            "",
            md_table(
                ["stage", "test (torch)", "test (ORT)", "MACs", "params", "ONNX bytes"], stage_rows
            ),
            "",
            md_table(["ORT latency (ms)", "baseline", "full recipe", "speedup"], lat_rows),
        ]
    if payload["recipe_other_seeds"]:
        runs = {0: r, **payload["recipe_other_seeds"]} if r else payload["recipe_other_seeds"]
        seed_rows = [
            [
                seed if seed else "0 (shipped)",
                f"{run['baseline_ort']:.4f}",
                f"{run['final_ort']:.4f}",
                f"{-run['drop_ort'] * 100:+.2f}",
                run["final_macs"],
                f"x{run['packed_ratio']:.3f}",
                f"x{run['speedup']['64']:.2f}",
            ]
            for seed, run in runs.items()
        ]
        lines += [
            "",
            "The same recipe with its `seed` replaced (a new split, baseline and fine-tune order; "
            "one test image is 0.37 pt):",
            "",
            md_table(
                [
                    "seed",
                    "baseline (ORT)",
                    "full recipe (ORT)",
                    "change (pt)",
                    "MACs",
                    "packed / dense",
                    "ORT b64 speedup",
                ],
                seed_rows,
            ),
        ]
    lines += [
        "",
        "Checks: "
        + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in payload["checks"].items()),
        "",
        reading(payload),
        "",
        f"Machine: {payload['env']['cpu']}; torch threads 1. Wall {payload['wall_s']:.0f} s.",
        "",
        f"Reproduce: `.venv/bin/python -m benchmarks.kd_digits {' '.join(sys.argv[1:])}`",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
