"""MiniLM student: a 3-layer encoder made from the 6-layer all-MiniLM-L6-v2, with and without
distillation, against the teacher.

Task: the built-in ``sentence-embedding`` task (:mod:`slimkit.tasks.sentences`): the bundled
``sentence-transformers/all-MiniLM-L6-v2`` (offline) is the teacher and the reference; the
metric is *fidelity*, the cosine similarity of a model's sentence embedding with the teacher's,
on held-out sentences of the Python reference manual (mean and min over the test sentences).

Variants, all 3-layer students made by :class:`~slimkit.prune.depth.DropLayers` (``--keep``,
initialised from the teacher's own layers) and trained with the same data, epochs, optimizer and
seed through the recipe runner (:class:`~slimkit.recipe.runner.Runner`, as
``recipes/minilm_student.yaml`` runs them):

* ``dropped``: no training at all;
* ``output loss``: trained on the task loss only, ``1 - cos(student, teacher embedding)``;
* ``output + hidden distill``: the same task loss plus ``distill`` from the teacher with a hint
  per student layer (student layer ``i`` against teacher layer ``2i+1``'s hidden states,
  ``--hint-loss``, weight ``--hint-weight``);
* ``int8``: the first seed's distilled student, dynamically quantized (int8 ``MatMulInteger``
  Linears, :func:`~slimkit.quant.dynamic.export_dynamic_onnx`).

Trained variants run once per ``--seeds`` entry (the seed orders the training batches and draws
dropout); the spread over seeds is the noise a difference must beat. Fidelity is measured on the
exported ONNX models in ONNX Runtime (what deploys; fp32 PyTorch agrees to ~1e-6). Latency:
ONNX Runtime, 1 intra-op thread, interleaved (:func:`slimkit.measure.latency.compare_latency`),
batch 1 and batch 32, every input padded to the task's fixed sequence length (64 tokens, the
shape the exported graphs take). The trained students share one architecture, so one fp32
student is timed. Sizes are the ONNX files.

Run: .venv/bin/python -m benchmarks.minilm_student [--seeds 0 1 2] [--epochs 4] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from benchmarks.common import environment, md_table, update_readme_section, write_result
from slimkit.export.onnx import export_onnx
from slimkit.measure.latency import compare_latency
from slimkit.measure.ort_module import OrtModule
from slimkit.measure.size import count_parameters
from slimkit.prune.depth import drop_layers_
from slimkit.quant.dynamic import DynamicQuantConfig, export_dynamic_onnx
from slimkit.recipe.runner import Runner
from slimkit.recipe.schema import Recipe
from slimkit.tasks.base import Task
from slimkit.tasks.sentences import embedding_cosines, make_sentence_task

NAME = "minilm_student"
LAYERS = "transformer.encoder.layer"
TEACHER, DROPPED, OUTPUT, DISTILL, INT8 = (
    "teacher (6 layers)",
    "dropped, no training",
    "output loss",
    "output + hidden distill",
    "int8 (distilled, dynamic)",
)


def student_recipe(args: argparse.Namespace, seed: int, distill: bool) -> Recipe:
    """One stage: drop layers, fine-tune (with ``distill`` when asked) on the task loss."""
    techniques: list[dict[str, Any]] = [
        {"kind": "drop_layers", "layers": LAYERS, "keep": args.keep}
    ]
    if distill:
        pairs = [
            {
                "student": f"{LAYERS}.{i}",
                "teacher": f"{LAYERS}.{2 * i + 1}",
                "loss": args.hint_loss,
                "weight": args.hint_weight,
            }
            for i in range(len(args.keep))
        ]
        techniques.append({"kind": "distill", "soft_label": None, "pairs": pairs})
    train = {"epochs": args.epochs, "lr": args.lr, "optimizer": "adamw", "lr_schedule": "cosine"}
    return Recipe.from_dict(
        {
            "name": f"student-{'distill' if distill else 'output'}-{seed}",
            "task": "sentence-embedding",
            "seed": seed,
            "batch_size": args.batch_size,
            "baseline": {"epochs": 0},
            "stages": [{"name": "student", "train": train, "techniques": techniques}],
            "export": {"onnx": False, "packed": False, "latency": False},
        }
    )


def train_student(task: Task, recipe: Recipe, folder: Path) -> tuple[nn.Module, float, float]:
    """``(student, validation fidelity, wall seconds)`` of one recipe run."""
    start = time.perf_counter()
    runner = Runner(recipe, folder, progress=False, task=task, console=Console(quiet=True))
    result = runner.run()
    return runner.model, result.stages[0].val_metric, time.perf_counter() - start


def measure(task: Task, model: nn.Module, path: Path, *, int8: bool = False) -> dict[str, Any]:
    """Export ``model`` to ``path`` (fp32, or dynamic int8) and measure fidelity in ORT."""
    if int8:
        export_dynamic_onnx(model, task.example_inputs, path, config=DynamicQuantConfig())
    else:
        export_onnx(model, task.example_inputs, path)
    cosines = embedding_cosines(OrtModule(path), task.test_loader)
    return {
        "params": count_parameters(model),
        "layers": len(model.get_submodule(LAYERS)),
        "onnx_bytes": path.stat().st_size,
        "cos_mean": float(cosines.mean()),
        "cos_min": float(cosines.min()),
        "cos_p5": float(torch.quantile(cosines, 0.05)),
    }


def seed_summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    values = [r["cos_mean"] for r in runs]
    return {
        "cos_mean": statistics.mean(values),
        "cos_mean_std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "cos_min": statistics.mean(r["cos_min"] for r in runs),
        "cos_p5": statistics.mean(r["cos_p5"] for r in runs),
        "val_cos_mean": statistics.mean(r["val_cosine"] for r in runs),
        "train_s": statistics.mean(r["train_s"] for r in runs),
    }


def reading(output: list[dict[str, Any]], distill: list[dict[str, Any]]) -> dict[str, Any]:
    """Distillation minus output-only, per seed (same seed = same batches), against the noise."""
    deltas = [d["cos_mean"] - o["cos_mean"] for d, o in zip(distill, output, strict=True)]
    noise = max(seed_summary(output)["cos_mean_std"], seed_summary(distill)["cos_mean_std"])
    mean = statistics.mean(deltas)
    wins = sum(d > 0 for d in deltas)
    if len(deltas) < 2:
        verdict = "one seed only: no noise estimate, no conclusion"
    elif wins == len(deltas) and mean > 2 * noise:
        verdict = "distillation is better, by more than twice the seed-to-seed spread"
    elif wins == len(deltas):
        verdict = "distillation is better in every seed, by less than twice the seed spread"
    elif wins == 0:
        verdict = "output-only training is better in every seed"
    else:
        verdict = "no consistent difference: within seed noise"
    return {
        "deltas": deltas,
        "mean_delta": mean,
        "seed_std": noise,
        "wins": wins,
        "seeds": len(deltas),
        "verdict": verdict,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=int, nargs="+", default=[1, 3, 5], help="kept layers")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4, help="AdamW, cosine decay")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hint-loss", choices=["hint", "cosine"], default="cosine")
    parser.add_argument("--hint-weight", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train", type=int, default=1024, help="training sentences")
    parser.add_argument("--val", type=int, default=64, help="validation sentences")
    parser.add_argument("--test", type=int, default=512, help="held-out test sentences")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per round")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT threads")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: tiny sizes, 1 epoch, JSON only"
    )
    parser.add_argument("--name", default=NAME, help="result file and README section name")
    args = parser.parse_args()
    if args.quick:
        args.train, args.val, args.test, args.epochs, args.seeds = 64, 16, 32, 1, [0]
        args.rounds, args.warmup, args.repeats = 1, 1, 2
        args.name = f"{args.name}_quick" if args.name == NAME else args.name
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    task = make_sentence_task(
        batch_size=args.batch_size, train=args.train, val=args.val, test=args.test
    )
    print(f"task ready in {time.perf_counter() - start:.0f}s", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {OUTPUT: [], DISTILL: []}
    with tempfile.TemporaryDirectory(prefix="slimkit-minilm-student-") as tmp:
        folder = Path(tmp)
        paths = {TEACHER: folder / "teacher.onnx", INT8: folder / "int8.onnx"}
        teacher = task.make_model()
        rows[TEACHER] = measure(task, teacher, paths[TEACHER])
        dropped = task.make_model()
        drop_layers_(dropped, LAYERS, args.keep)
        rows[DROPPED] = measure(task, dropped, folder / "dropped.onnx")
        students: dict[str, nn.Module] = {}
        for seed in args.seeds:
            for name, distill in ((OUTPUT, False), (DISTILL, True)):
                run_dir = folder / f"run-{seed}-{int(distill)}"
                model, val, wall = train_student(task, student_recipe(args, seed, distill), run_dir)
                row = measure(task, model, folder / f"{int(distill)}-{seed}.onnx")
                row.update(seed=seed, val_cosine=val, train_s=wall)
                runs[name].append(row)
                print(f"{name} seed {seed}: {row['cos_mean']:.4f} ({wall:.0f}s)", flush=True)
                if seed == args.seeds[0]:
                    students[name] = copy.deepcopy(model)
                    paths[name] = folder / f"{int(distill)}-{seed}.onnx"
        for name in (OUTPUT, DISTILL):
            rows[name] = {**{k: runs[name][0][k] for k in ("params", "layers", "onnx_bytes")}}
            rows[name].update(seed_summary(runs[name]))
        rows[INT8] = measure(task, students[DISTILL], paths[INT8], int8=True)
        timed = {TEACHER: paths[TEACHER], "student fp32": paths[DISTILL], INT8: paths[INT8]}
        latency = compare_latency(
            timed,
            batch_sizes=(1, 32),
            threads=args.threads,
            rounds=args.rounds,
            warmup=args.warmup,
            repeats=args.repeats,
        )
    for name, row in rows.items():
        key = INT8 if name == INT8 else (TEACHER if name == TEACHER else "student fp32")
        for batch in (1, 32):
            row[f"b{batch}_ms"] = latency["results"][key][batch]["median_ms"]
            row[f"b{batch}_vs_teacher"] = latency["results"][key][batch]["ratio"]
        row["size_vs_teacher"] = row["onnx_bytes"] / rows[TEACHER]["onnx_bytes"]
    verdict = reading(runs[OUTPUT], runs[DISTILL])
    payload = {
        "benchmark": args.name,
        "args": vars(args),
        "env": environment(),
        "task": task.info,
        "sequence_length": int(task.example_inputs[0].shape[1]),
        "variants": rows,
        "seeds": runs,
        "distill_vs_output": verdict,
        "latency": latency,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "wall_s": time.perf_counter() - start,
    }
    write_result(args.name, payload)
    text = readme(rows, runs, verdict, task, args)
    if not args.quick:  # a smoke test's numbers do not belong in the README
        update_readme_section(args.name, text)
    print(text)


def readme(
    rows: dict[str, dict[str, Any]],
    runs: dict[str, list[dict[str, Any]]],
    verdict: dict[str, Any],
    task: Task,
    args: argparse.Namespace,
) -> str:
    seeds = len(args.seeds)
    table = []
    for name, row in rows.items():
        spread = f" ± {row['cos_mean_std']:.4f}" if "cos_mean_std" in row and seeds > 1 else ""
        table.append(
            [
                name,
                row["layers"],
                f"{row['params'] / 1e6:.2f}M",
                f"{row['cos_mean']:.4f}{spread}",
                f"{row['cos_p5']:.4f}",
                f"{row['cos_min']:.4f}",
                f"{row['train_s']:.0f}" if "train_s" in row else "-",
                f"{row['b1_ms']:.2f}",
                f"x{row['b1_vs_teacher']:.3f}",
                f"{row['b32_ms']:.1f}",
                f"x{row['b32_vs_teacher']:.3f}",
                f"{row['onnx_bytes'] / 2**20:.1f}",
            ]
        )
    columns = ["variant", "layers", "params", "cos mean", "cos p5", "cos min", "train s"]
    columns += ["b1 ms", "b1 vs teacher", "b32 ms", "b32 vs teacher", "ONNX MiB"]
    per_seed = ", ".join(
        f"seed {o['seed']}: {o['cos_mean']:.4f} vs {d['cos_mean']:.4f}"
        for o, d in zip(runs[OUTPUT], runs[DISTILL], strict=True)
    )
    info = task.info
    hint = f"{args.hint_loss} (weight {args.hint_weight})"
    lines = [
        f"`all-MiniLM-L6-v2` (bundled, offline, 6 layers) as teacher; students keep layers "
        f"{args.keep} (`drop_layers`) and train {args.epochs} epochs (AdamW, lr {args.lr}, "
        f"cosine decay, batch {args.batch_size}) on {info['train']} sentences through the recipe "
        f"runner; distillation adds a {hint} hint from student layer i to teacher layer 2i+1. "
        f"Fidelity: cosine of each test sentence's embedding with the teacher's, {info['test']} "
        f"held-out sentences of {info['dataset']} (fingerprint `{info['fingerprint'][:12]}`), "
        f"measured on the ONNX models in ONNX Runtime; trained rows are the mean over seeds "
        f"{args.seeds} (± sample std; p5 and min: 5th percentile and worst sentence, averaged "
        "over seeds; train s: wall time of the recipe run, 1 thread). "
        f"Latency: ONNX Runtime, {args.threads} thread, interleaved over {args.rounds} rounds, "
        f"inputs padded to {int(task.example_inputs[0].shape[1])} tokens (the task's fixed "
        "sequence length); the trained students share one architecture and are timed once "
        "(the dropped row shows the same timing).",
        "",
        md_table(columns, table),
        "",
        f"Distillation vs output loss only, per seed (output vs distill): {per_seed}. Mean "
        f"difference {verdict['mean_delta']:+.4f}, seed-to-seed std {verdict['seed_std']:.4f}, "
        f"distillation ahead in {verdict['wins']}/{verdict['seeds']} seeds: "
        f"{verdict['verdict']} (a seed changes the batch order and dropout; the split and the "
        "initialisation, the teacher's own layers, are fixed, so this spread is a floor on the "
        "noise). A distillation run took "
        f"x{rows[DISTILL]['train_s'] / rows[OUTPUT]['train_s']:.2f} the wall time of an "
        "output-only run here (it also runs the teacher on every batch; wall times on this "
        "shared machine vary by tens of percent between runs, `seeds` in the JSON has each "
        "run's); int8 costs "
        f"{runs[DISTILL][0]['cos_mean'] - rows[INT8]['cos_mean']:.4f} fidelity against the "
        "fp32 student it was made from.",
        "",
        f"Reproduce: `.venv/bin/python -m benchmarks.minilm_student {cli_args(args)}`",
    ]
    return "\n".join(lines)


def cli_args(args: argparse.Namespace) -> str:
    if args.quick:
        return "--quick"
    parts = [f"--seeds {' '.join(map(str, args.seeds))}", f"--epochs {args.epochs}"]
    if args.keep != [1, 3, 5]:
        parts.append(f"--keep {' '.join(map(str, args.keep))}")
    return " ".join(parts)


if __name__ == "__main__":
    main()
