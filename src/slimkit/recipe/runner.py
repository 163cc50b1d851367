"""Run a recipe: baseline, stages of techniques with fine-tuning, a measured gate, export.

After the baseline and after every stage the model is measured: task metric (validation and
test), parameters, MACs, and (with ``export.onnx``) its ONNX file in ``onnx/NAME.onnx`` with the
metric as ONNX Runtime computes it and ORT latency interleaved with the previous stage's model.
The gate (:mod:`slimkit.recipe.gate`) then flags the stage or stops the run.

The run folder gets (each written atomically): ``metrics.json``, ``report.html`` (self-contained:
the table, plots across stages, per-layer bars), ``recipe.yaml`` (the validated
recipe), ``tensorboard/`` event files, ``onnx/`` (one model per stage), ``baseline.onnx`` and
``model.onnx`` (the kept model, int8 when quantized), ``model.packed.safetensors`` (sparse packed
checkpoint) and ``model.safetensors`` (dense state dict).

Under ``torchrun`` (``slimkit compress RECIPE --nproc N``, after
:func:`slimkit.distributed.init_from_env`) every rank runs the same recipe. Training steps run
through ``DistributedDataParallel``: each rank takes its contiguous share of the rows of every
batch of the seeded loader, its mean loss weighted so that the averaged gradient is the whole
batch's, so a step, the schedules and the learning rate are those of a single-process run
(the task loss must be a mean over rows; BatchNorm normalises each rank's rows). Calibration
batches are shared out the same way and the statistics all-reduced. The techniques always see
the plain model. Rank 0 alone evaluates, exports, measures latency and writes every file; the
others wait, then receive its results (the gate's decision included, so all stop together).
Resuming, rank 0 reads the checkpoints and every rank loads what it read.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from slimkit.core.compressor import Compressor
from slimkit.core.technique import RunContext, Technique
from slimkit.distributed import (
    ShardedBatches,
    all_reduce_,
    all_reduce_tensors_,
    is_distributed,
    is_main,
    on_main,
    shard_rows,
    world_size,
)
from slimkit.errors import CheckpointError, ConfigError
from slimkit.export.onnx import export_onnx, optimized_op_counts
from slimkit.export.packed import save_packed
from slimkit.io import atomic_path, atomic_write_json, atomic_write_text
from slimkit.measure.flops import count_macs
from slimkit.measure.latency import compare_latency, cpu_info
from slimkit.measure.ort_module import OrtModule
from slimkit.measure.size import count_nonzero_parameters, count_parameters, dense_checkpoint_bytes
from slimkit.prune.manifest import PruningManifest, save_pruned
from slimkit.recipe.checkpoints import RunCheckpoints, recipe_fingerprint
from slimkit.recipe.gate import gate_violations
from slimkit.recipe.results import RunResult, StageResult
from slimkit.recipe.schema import Recipe, TrainBudget, dump_recipe
from slimkit.report.html import write_report
from slimkit.report.table import print_summary
from slimkit.report.tensorboard import CompressionSummaries
from slimkit.state_dicts import load_into, load_state_dict_file
from slimkit.tasks.base import Task, load_task


def resolve_run_dir(name: str, run_dir: str | Path | None, *, root: str | Path = "runs") -> Path:
    """An explicit ``run_dir`` must be new or empty; default ``runs/NAME`` gets a free suffix."""
    if run_dir is not None:
        path = Path(run_dir)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(f"run folder {path} already exists and is not empty; choose another")
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = Path(root) / name
    path, n = base, 1
    while path.exists() and (not path.is_dir() or any(path.iterdir())):
        n += 1
        path = base.with_name(f"{name}-{n}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_optimizer(params: Iterable[nn.Parameter], budget: TrainBudget) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if budget.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=budget.lr, momentum=budget.momentum, weight_decay=budget.weight_decay
        )
    cls = torch.optim.AdamW if budget.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=budget.lr, weight_decay=budget.weight_decay)


def make_lr_schedule(
    optimizer: torch.optim.Optimizer, budget: TrainBudget, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step learning-rate decay for a stage (``None`` for a constant rate)."""
    if budget.lr_schedule == "constant":
        return None
    total = max(1, budget.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)


def has_quantizers(model: nn.Module) -> bool:
    """True when ``model`` carries slimkit fake-quant modules (not a plain model)."""
    from slimkit.quant.fake import ActivationQuantizer, WeightQuantizer

    return any(isinstance(m, (ActivationQuantizer, WeightQuantizer)) for m in model.modules())


def make_training(
    model: nn.Module,
    budget: TrainBudget,
    steps_per_epoch: int,
    compressor: Compressor | None,
    steps_done: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Optimizer over the model's and the techniques' parameters, and the stage's learning-rate
    decay positioned ``steps_done`` steps in (a rebuild after layers were sliced; the
    optimizer's moments start afresh)."""
    extra = list(compressor.parameters()) if compressor is not None else []
    optimizer = make_optimizer(itertools.chain(model.parameters(), extra), budget)
    decay = make_lr_schedule(optimizer, budget, steps_per_epoch)
    if decay is not None and steps_done > 0:
        total = max(1, budget.epochs * steps_per_epoch)
        lr = budget.lr * (1 + math.cos(math.pi * min(steps_done, total) / total)) / 2
        for group in optimizer.param_groups:
            group["lr"] = lr
        decay.last_epoch = steps_done
    return optimizer, decay


# Kernels that show ONNX Runtime runs (part of) the model in integer arithmetic.
INT_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
        "QGemm",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "DynamicQuantizeLinear",
    }
)


def wrap_for_training(model: nn.Module) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` inside a process group (the model itself in a
    single process). ``static_graph``: parameters a forward never uses are allowed."""
    if not is_distributed():
        return model
    return DistributedDataParallel(model, static_graph=True)


class TrainBatches:
    """The first ``count`` batches of the task's training data, re-iterable and streamed."""

    def __init__(self, task: Task, seed: int, count: int) -> None:
        self.task, self.seed, self.count = task, seed, count

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.task.train_loader(self.seed)), self.count)


class Runner:
    """Executes a :class:`Recipe`; the CLI and the Python API both use it."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        *,
        console: Console | None = None,
        progress: bool = True,
        task: Task | None = None,
    ) -> None:
        self.recipe = recipe
        self.run_dir = run_dir
        self.main = is_main()  # rank 0 (always, in a single process): measures and writes
        self.console = console or Console()
        self.show_progress = progress and self.main
        if not self.main:
            self.console = Console(quiet=True)
        self.task = task or load_task(recipe.task, seed=recipe.seed, batch_size=recipe.batch_size)
        self.summaries: CompressionSummaries | None = None
        self.global_step = 0
        self.techniques: list[Technique] = []  # every stage's, in order (for the export form)
        self.stage_states: list[dict[str, Any]] = []
        self.checkpoints = RunCheckpoints(run_dir)

    # --- training -------------------------------------------------------------------------
    def train(
        self,
        model: nn.Module,
        budget: TrainBudget,
        label: str,
        compressor: Compressor | None = None,
        resume_from: dict[str, Any] | None = None,
    ) -> int:
        """Train ``budget.epochs`` epochs; step the compressor after every optimizer step.

        After every epoch the part's progress is checkpointed; ``resume_from`` (such a
        checkpoint, its model and compressor state already loaded) continues after its epoch.
        Several processes: each trains on its share of every batch's rows through
        ``DistributedDataParallel`` (see the module docstring).
        """
        if budget.epochs == 0:
            return 0
        task = self.task
        task_weight = compressor.task_loss_weight if compressor is not None else 1.0
        steps_per_epoch = len(task.train_loader(0))
        optimizer, decay = make_training(model, budget, steps_per_epoch, compressor, 0)
        trained, ranks = wrap_for_training(model), world_size()
        steps, first_epoch = 0, 0
        if resume_from is not None:
            optimizer.load_state_dict(resume_from["optimizer"])
            if decay is not None and resume_from["decay"] is not None:
                decay.load_state_dict(resume_from["decay"])
            steps, first_epoch = int(resume_from["steps"]), int(resume_from["epoch"])
            self.global_step = int(resume_from["global_step"])
            torch.set_rng_state(resume_from["rng"])
        progress = Progress(
            TextColumn(f"[bold]{label}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not self.show_progress,
            transient=False,
        )
        with progress:
            bar = progress.add_task(
                label, total=budget.epochs, completed=first_epoch, loss=float("nan")
            )
            for epoch in range(first_epoch, budget.epochs):
                trained.train()
                total, count = 0.0, 0
                seed = self.recipe.seed * 1000 + self.global_step + epoch
                for batch in task.train_loader(seed):
                    batch, share = shard_rows(batch)  # 1.0 in a single process
                    outputs = task.forward(trained, batch)
                    loss = task.loss(outputs, batch)
                    if task_weight != 1.0:
                        loss = task_weight * loss
                    if compressor is not None:
                        loss = loss + compressor.loss(outputs, batch)
                    optimizer.zero_grad(set_to_none=True)
                    (loss * share if share != 1.0 else loss).backward()
                    if ranks > 1 and compressor is not None:  # adapters: outside DDP's reach
                        grads = [p.grad for p in compressor.parameters() if p.grad is not None]
                        all_reduce_tensors_(grads, "mean")
                    optimizer.step()
                    if decay is not None:
                        decay.step()
                    steps += 1
                    total, count = total + loss.item() * share / ranks, count + 1
                    if compressor is not None:
                        compressor.step()
                        if compressor.parameters_replaced:  # structured pruning sliced layers
                            optimizer, decay = make_training(
                                model, budget, steps_per_epoch, compressor, steps
                            )
                            trained = wrap_for_training(model)
                        if self.summaries is not None:
                            self.summaries.log_compressor(compressor)
                if count == 0:
                    raise ConfigError(f"task {task.name!r}: the train loader yielded no batches")
                total = float(all_reduce_(torch.tensor(total, dtype=torch.float64), "sum"))
                if self.summaries is not None:
                    self.summaries.log_scalars(
                        {f"{label}/loss": total / count}, self.global_step + steps
                    )
                progress.update(bar, advance=1, loss=total / count)
                if not self.main:
                    continue
                self.checkpoints.save_progress(
                    {
                        "part": label,
                        "epoch": epoch + 1,
                        "steps": steps,
                        "global_step": self.global_step,
                        "model": model.state_dict(),
                        "compressor": compressor.state_dict() if compressor else None,
                        "optimizer": optimizer.state_dict(),
                        "decay": decay.state_dict() if decay is not None else None,
                        "rng": torch.get_rng_state(),
                    }
                )
        del trained  # DDP lets go of the process group before anything tears it down
        self.global_step += steps
        return steps

    def measure(
        self,
        model: nn.Module,
        name: str,
        steps: int,
        wall_s: float,
        compressor: Compressor | None = None,
    ) -> StageResult:
        task = self.task
        params = count_parameters(model)
        nonzero = count_nonzero_parameters(model)
        return StageResult(
            name=name,
            val_metric=task.metric(model, task.val_loader),
            test_metric=task.metric(model, task.test_loader),
            params=params,
            nonzero_params=nonzero,
            sparsity=1.0 - nonzero / max(1, params),
            macs=count_macs(model, task.example_inputs).total_macs,
            steps=steps,
            wall_s=round(wall_s, 3),
            techniques=[s.to_dict() for s in compressor.summaries()] if compressor else [],
        )

    # --- the run --------------------------------------------------------------------------
    def baseline(self, resume_from: dict[str, Any] | None = None) -> tuple[nn.Module, StageResult]:
        cfg = self.recipe.baseline
        torch.manual_seed(self.recipe.seed)
        model = self.task.make_model()
        start = time.perf_counter()
        steps = 0
        if cfg.checkpoint:
            load_into(model, on_main(load_state_dict_file, cfg.checkpoint), cfg.checkpoint)
        else:
            if resume_from is not None:
                load_into(model, resume_from["model"], "progress.pt")
            steps = self.train(model, cfg, "baseline", resume_from=resume_from)
        wall_s = time.perf_counter() - start
        return model, on_main(self.measure, model, "baseline", steps, wall_s)

    def run_stage(
        self, model: nn.Module, index: int, resume_from: dict[str, Any] | None = None
    ) -> tuple[nn.Module, StageResult]:
        stage = self.recipe.stages[index]
        torch.manual_seed(self.recipe.seed + index + 1)
        start = time.perf_counter()
        compressor = Compressor(list(stage.techniques), example_inputs=self.task.example_inputs)
        context = RunContext(
            baseline=self.baseline_model,
            stage_input=model,
            make_model=self.task.make_model,
            forward=self.task.forward,
            evaluate=lambda m: self.task.metric(m, self.task.val_loader),
            work_dir=self.run_dir / "stages" / stage.name,
        )
        for technique in compressor.techniques:
            technique.bind_run(context)
        compressor.apply(model)
        batches: Iterable[Any] = TrainBatches(
            self.task, self.recipe.seed + index, stage.calibration_batches
        )
        if is_distributed():  # each rank calibrates on its rows; statistics are all-reduced
            batches = ShardedBatches(batches)
        compressor.before_training(batches, progress=self.show_progress)
        if resume_from is not None:  # the stage's state at the end of its last saved epoch
            load_into(model, resume_from["model"], "progress.pt")
            compressor.load_state_dict(resume_from["compressor"])
        if self.summaries is not None:
            self.summaries.log_compressor(compressor, force=True)
        steps = self.train(model, stage.train, stage.name, compressor, resume_from)
        compressor.after_training(batches, progress=self.show_progress)
        if self.summaries is not None:
            self.summaries.log_compressor(compressor, force=True)
        self.stage_states = [t.state_dict() for t in compressor.techniques]  # before finalize
        model = compressor.finalize()
        self.techniques.extend(compressor.techniques)
        for technique in compressor.techniques:  # the small model's record: load_pruned rebuilds it
            manifest = getattr(technique, "manifest", None)
            if isinstance(manifest, PruningManifest) and not has_quantizers(model) and self.main:
                save_pruned(model, manifest, context.work_dir / "pruned")
        wall_s = time.perf_counter() - start
        result = on_main(self.measure, model, stage.name, steps, wall_s, compressor)
        for summary in compressor.summaries():
            if self.show_progress:
                print_summary(summary, self.console)
        return model, result

    def restore_stage(self, model: nn.Module, index: int) -> nn.Module:
        """A finished stage on resume: rebuild its structure on ``model`` (the model as it
        entered the stage), load its saved weights; no training, no measuring."""
        stage = self.recipe.stages[index]
        weights, states = on_main(self.checkpoints.load_model, stage.name)
        compressor = Compressor(list(stage.techniques), example_inputs=self.task.example_inputs)
        if len(states) != len(compressor.techniques):
            raise CheckpointError(
                f"checkpoint of stage {stage.name!r} holds {len(states)} technique states, the "
                f"recipe has {len(compressor.techniques)} techniques"
            )
        for technique, state in zip(compressor.techniques, states, strict=True):
            technique.load_state_dict(state)
            model = technique.rebuild(model)
        load_into(model, weights, f"checkpoints/{stage.name}.safetensors")
        self.techniques.extend(compressor.techniques)
        return model

    # --- ONNX: per stage, and the kept model ----------------------------------------------
    def stage_onnx(self, model: nn.Module, result: StageResult, previous: StageResult | None):
        """Export ``onnx/NAME.onnx`` in the form the techniques so far give it and measure it."""
        cfg = self.recipe.export
        example = self.task.example_inputs
        path = self.run_dir / "onnx" / f"{result.name}.onnx"
        path.parent.mkdir(exist_ok=True)
        form = "fp32"
        for technique in reversed(self.techniques):
            if technique.export_onnx(model, example, path) is not None:
                form = technique.kind
                break
        else:
            export_onnx(model, example, path)
        info: dict[str, Any] = {
            "path": str(path.relative_to(self.run_dir)),
            "form": form,
            "bytes": path.stat().st_size,
            "integer_ops": {
                op: n for op, n in sorted(optimized_op_counts(path).items()) if op in INT_OPS
            },
        }
        if cfg.onnx_metric:
            info["test_metric"] = self.task.metric(OrtModule(path), self.task.test_loader)
        if cfg.latency:
            batches = self.latency_batches()
            paths = {"current": path}
            if previous is not None and previous.onnx is not None:
                paths = {"previous": self.run_dir / previous.onnx["path"], "current": path}
            timing = compare_latency(
                paths, batch_sizes=batches, threads=cfg.latency_threads, rounds=3, repeats=30
            )["results"]
            info["threads"] = cfg.latency_threads
            info["latency_ms"] = {b: timing["current"][b]["median_ms"] for b in batches}
            if "previous" in paths:
                info["latency_ratio"] = {
                    b: timing["current"][b]["median_ms"] / timing["previous"][b]["median_ms"]
                    for b in batches
                }
        result.onnx = info

    def latency_batches(self) -> list[int]:
        return sorted({1, self.recipe.export.latency_batch})

    def check_gate(self, result: StageResult, index: int, baseline: StageResult) -> bool:
        """Fill ``result.gate``; print and log each violation; True when the stage passed."""
        stage, gate = self.recipe.stages[index], self.recipe.gate
        bound = stage.max_metric_drop if stage.max_metric_drop is not None else gate.max_metric_drop
        batch = self.recipe.export.latency_batch
        ratio = ((result.onnx or {}).get("latency_ratio") or {}).get(batch)
        violations = gate_violations(
            metric_name=self.task.metric_name,
            baseline_metric=baseline.val_metric,
            metric=result.val_metric,
            max_metric_drop=bound,
            latency_ratio=ratio,
            max_latency_ratio=gate.max_latency_ratio,
            latency_batch=batch,
        )
        result.gate = {"passed": not violations, "violations": violations}
        for violation in violations:
            self.console.print(f"[bold red]gate[/]: stage {result.name}: {violation}")
        return not violations

    def export(
        self,
        baseline: nn.Module,
        model: nn.Module,
        base: StageResult,
        kept: StageResult,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        cfg = self.recipe.export
        dense = self.run_dir / "model.safetensors"
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with atomic_path(dense) as tmp:
            save_file(state, str(tmp))
        out["dense"] = {"path": dense.name, "bytes": dense.stat().st_size}
        if cfg.packed:
            report = save_packed(
                model,
                self.run_dir / "model.packed.safetensors",
                values_dtype=cfg.values_dtype,
                metadata={"recipe": self.recipe.name, "task": self.task.name},
            )
            reference = dense_checkpoint_bytes(baseline)
            out["packed"] = {
                "path": "model.packed.safetensors",
                "bytes": report.bytes_on_disk,
                "dense_fp32_bytes": reference,
                "ratio": report.bytes_on_disk / reference,
                "values_dtype": cfg.values_dtype,
            }
        if cfg.onnx and base.onnx is not None and kept.onnx is not None:
            out["onnx"] = self.export_onnx(base, kept)
        return out

    def export_onnx(self, base: StageResult, kept: StageResult) -> dict[str, Any]:
        """``baseline.onnx`` and ``model.onnx`` (copies of the baseline's and the kept stage's)
        and their latency measured interleaved, the final before/after comparison."""
        cfg = self.recipe.export
        paths = {"baseline": self.run_dir / "baseline.onnx", "model": self.run_dir / "model.onnx"}
        for name, result in (("baseline", base), ("model", kept)):
            with atomic_path(paths[name]) as tmp:
                shutil.copyfile(self.run_dir / result.onnx["path"], tmp)
        out: dict[str, Any] = {
            "baseline": paths["baseline"].name,
            "model": paths["model"].name,
            "form": kept.onnx["form"],
            "baseline_bytes": base.onnx["bytes"],
            "model_bytes": kept.onnx["bytes"],
            "size_ratio": kept.onnx["bytes"] / base.onnx["bytes"],
            "integer_ops": kept.onnx["integer_ops"],
        }
        if "test_metric" in kept.onnx:
            out[f"test_{self.task.metric_name}"] = kept.onnx["test_metric"]
        if cfg.latency:
            batches = self.latency_batches()
            timing = compare_latency(
                paths, batch_sizes=batches, threads=cfg.latency_threads, rounds=3, repeats=30
            )
            out["latency"] = {
                "threads": cfg.latency_threads,
                "batch_sizes": batches,
                "median_ms": {
                    n: {b: timing["results"][n][b]["median_ms"] for b in batches} for n in paths
                },
                "ratio": {b: timing["results"]["model"][b]["ratio"] for b in batches},
            }
        return out

    def run(self, *, resume: bool = False) -> RunResult:
        """Run the recipe; with ``resume`` continue the run in ``run_dir`` where it stopped.

        Under ``torch.distributed`` call it on every rank (see the module docstring).
        """
        start = time.perf_counter()
        recipe_text = dump_recipe(self.recipe)
        fingerprint = recipe_fingerprint(recipe_text)
        if resume:
            state, progress = on_main(self.load_resume_state, fingerprint)
        else:
            if self.main:
                atomic_write_text(self.run_dir / "recipe.yaml", recipe_text)
            state = {"recipe": fingerprint, "done": [], "results": {}, "global_step": 0}
            progress = None
        state.setdefault("finished", False)

        def progress_for(part: str) -> dict[str, Any] | None:
            return progress if progress is not None and progress["part"] == part else None

        measure_onnx = self.recipe.export.onnx
        stopped: str | None = None
        summaries_writer = (
            CompressionSummaries(self.run_dir / "tensorboard")
            if self.main
            else contextlib.nullcontext(None)
        )
        with summaries_writer as summaries:
            self.summaries = summaries
            if "baseline" in state["done"]:
                model = self.task.make_model()
                weights, _ = on_main(self.checkpoints.load_model, "baseline")
                load_into(model, weights, "checkpoints/baseline.safetensors")
                base = StageResult.from_dict(state["results"]["baseline"])
                self.global_step = int(state["global_step"])
            else:
                model, base = self.baseline(progress_for("baseline"))

                def finish_baseline() -> StageResult:
                    if measure_onnx:
                        self.stage_onnx(model, base, None)
                    self.finish_part(state, model, base, [])
                    return base

                base = on_main(finish_baseline)
            baseline_model = copy.deepcopy(model)
            self.baseline_model = baseline_model
            kept_model, kept = baseline_model, base
            results: list[StageResult] = []
            for index, stage in enumerate(self.recipe.stages):
                previous = results[-1] if results else base
                if stage.name in state["done"]:
                    model = self.restore_stage(model, index)
                    result = StageResult.from_dict(state["results"][stage.name])
                    self.global_step = int(state["global_step_after"][stage.name])
                    results.append(result)
                    kept_model, kept = model, result
                    continue
                model, result = self.run_stage(model, index, progress_for(stage.name))

                def finish_stage(
                    model: nn.Module = model,
                    result: StageResult = result,
                    previous: StageResult = previous,
                    index: int = index,
                ) -> StageResult:
                    if measure_onnx:
                        self.stage_onnx(model, result, previous)
                    self.check_gate(result, index, base)
                    self.log_stage(result)
                    self.finish_part(state, model, result, self.stage_states)
                    return result

                result = on_main(finish_stage)  # rank 0's gate decision holds for every rank
                results.append(result)
                if result.gate["passed"] or self.recipe.gate.on_violation == "warn":
                    kept_model, kept = model, result
                else:
                    reasons = "; ".join(result.gate["violations"])
                    stopped = f"stage {result.name} failed the gate ({reasons}); kept {kept.name}"
                    self.console.print(f"[bold red]stopped[/]: {stopped}")
                    break
            self.summaries = None

        def write_outputs() -> RunResult:
            artifacts = self.export(baseline_model, kept_model, base, kept)
            run = RunResult(
                recipe=self.recipe.name,
                task=self.task.name,
                metric_name=self.task.metric_name,
                run_dir=str(self.run_dir),
                baseline=base,
                stages=results,
                artifacts=artifacts,
                wall_s=round(time.perf_counter() - start, 3),
                kept=kept.name,
                stopped=stopped,
                environment={
                    "cpu": cpu_info(),
                    "torch_threads": torch.get_num_threads(),
                    "ort_threads": self.recipe.export.latency_threads,
                    "processes": world_size(),
                },
            )
            atomic_write_json(self.run_dir / "metrics.json", run.to_dict())
            write_report(self.run_dir, run.to_dict())
            state["finished"] = True
            self.checkpoints.save_state(state)
            return run

        run = on_main(write_outputs)
        self.model = kept_model
        return run

    def load_resume_state(self, fingerprint: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The run state and the part in progress of the run being resumed (checked against
        the recipe's ``fingerprint``)."""
        state = self.checkpoints.load_state()
        if state.get("recipe") != fingerprint:
            raise CheckpointError(
                f"{self.run_dir} was run with a different recipe than {self.recipe.name!r}"
            )
        if state.get("finished"):
            raise ConfigError(f"the run in {self.run_dir} already finished; nothing to resume")
        return state, self.checkpoints.load_progress()

    def finish_part(
        self,
        state: dict[str, Any],
        model: nn.Module,
        result: StageResult,
        technique_states: list[dict[str, Any]],
    ) -> None:
        """Checkpoint a finished part (baseline or stage) and record it in ``state.json``."""
        self.checkpoints.save_model(result.name, model, technique_states)
        state["done"].append(result.name)
        state["results"][result.name] = asdict(result)
        state["global_step"] = self.global_step
        state.setdefault("global_step_after", {})[result.name] = self.global_step
        self.checkpoints.save_state(state)
        self.checkpoints.clear_progress()

    def log_stage(self, result: StageResult) -> None:
        if self.summaries is None:
            return
        m = self.task.metric_name
        scalars = {f"{m}/val": result.val_metric, f"{m}/test": result.test_metric}
        for b, ms in ((result.onnx or {}).get("latency_ms") or {}).items():
            scalars[f"ort_latency_ms/batch{b}"] = ms
        self.summaries.log_scalars(scalars, self.global_step)


def run_recipe(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    *,
    progress: bool = True,
    console: Console | None = None,
) -> RunResult:
    """Validate the run folder, run the recipe, print and return the result."""
    path = on_main(resolve_run_dir, recipe.name, run_dir)  # rank 0 picks it, for every rank
    runner = Runner(recipe, path, console=console, progress=progress)
    return runner.run()


def resume_run(
    run_dir: str | Path,
    recipe: Recipe | None = None,
    *,
    progress: bool = True,
    console: Console | None = None,
) -> RunResult:
    """Continue the run in ``run_dir`` from its last checkpoint (the recipe saved there, which
    ``recipe``, when given, must equal)."""
    from slimkit.recipe.schema import load_recipe

    path = Path(run_dir)

    def saved_recipe() -> Recipe:
        if not path.is_dir():
            raise ConfigError(f"run folder to resume not found: {path}")
        saved = load_recipe(path / "recipe.yaml")
        if recipe is not None and recipe != saved:
            raise ConfigError(
                f"the recipe differs from the one {path} was started with "
                f"({path / 'recipe.yaml'}); resume without a recipe, or start a new run"
            )
        return saved

    saved = on_main(saved_recipe)  # rank 0 reads the run folder, for every rank
    return Runner(saved, path, console=console, progress=progress).run(resume=True)
