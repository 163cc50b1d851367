"""The ``slimkit`` command line: a thin layer over the Python API.

Every error a user can cause is printed as one line (``slimkit: error: ...``) with exit code 2.
Under ``torchrun`` (``compress --nproc N`` starts it) a failing worker prints
``slimkit: error: rank R failed: ...`` instead, any exception included (the traceback goes to
the error files, see :mod:`slimkit.launcher`).
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from slimkit.distributed import DEFAULT_TIMEOUT_S, launched_by_torchrun
from slimkit.errors import ConfigError, SlimkitError

app = typer.Typer(
    name="slimkit",
    help="Compress trained PyTorch models and measure the result.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Recent typer vendors its own copy of click (and does not depend on click); older typer re-exports
# click's classes. Take ClickException from typer's own class tree so both work.
_ClickException: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)

RunDir = Annotated[
    Path | None, typer.Option("--run-dir", help="new or empty folder for the run's outputs")
]


def builtin_recipe_path(name: str) -> Path:
    return Path(str(resources.files("slimkit.recipe") / "builtin" / f"{name}.yaml"))


def _check_run_args(recipe_path: Path | None, run_dir: Path | None, resume: Path | None) -> None:
    if resume is not None and run_dir is not None:
        raise ConfigError("--resume continues RUN_DIR in place; do not give --run-dir too")
    if resume is None and recipe_path is None:
        raise ConfigError("give a recipe file, or --resume RUN_DIR")


def _run(
    recipe_path: Path | None,
    run_dir: Path | None,
    quiet: bool,
    resume: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> None:
    from slimkit import distributed
    from slimkit.recipe.runner import resume_run, run_recipe
    from slimkit.recipe.schema import load_recipe

    _check_run_args(recipe_path, run_dir, resume)
    distributed.init_from_env(timeout=timeout)  # under torchrun: join its process group
    console = Console(quiet=not distributed.is_main())
    recipe = load_recipe(recipe_path) if recipe_path is not None else None
    if resume is not None:
        result = resume_run(resume, recipe, progress=not quiet, console=console)
    else:
        result = run_recipe(recipe, run_dir, progress=not quiet, console=console)
    console.print(str(result), end="")
    console.print(
        f"run folder: {result.run_dir}  (report.html, metrics.json, model.onnx, tensorboard/)"
    )
    distributed.shutdown()


def _launch(
    nproc: int,
    recipe_path: Path | None,
    run_dir: Path | None,
    quiet: bool,
    resume: Path | None,
    timeout: float,
) -> None:
    """Run ``compress`` on ``nproc`` local processes through torchrun (see slimkit.launcher)."""
    from slimkit.launcher import launch
    from slimkit.recipe.runner import resolve_run_dir
    from slimkit.recipe.schema import load_recipe

    if launched_by_torchrun():
        raise ConfigError("--nproc starts torchrun itself; under torchrun leave it out")
    _check_run_args(recipe_path, run_dir, resume)
    argv = ["compress"]
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)  # a bad recipe fails here, before any process starts
        argv.append(str(recipe_path))
    if resume is not None:
        argv += ["--resume", str(resume)]
    else:
        argv += ["--run-dir", str(resolve_run_dir(recipe.name, run_dir))]
    argv += ["--timeout", repr(timeout)] + (["--quiet"] if quiet else [])
    code, failure = launch(nproc, argv, timeout=timeout)
    if failure is not None:
        print(f"slimkit: error: {failure}", file=sys.stderr)
    if code:
        raise typer.Exit(code)


@app.command()
def demo(
    run_dir: RunDir = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Train on bundled digits, prune to 80% while fine-tuning, quantize to int8, export, report."""
    _run(builtin_recipe_path("digits_prune_int8"), run_dir, quiet)


@app.command()
def compress(
    recipe: Annotated[Path | None, typer.Argument(help="recipe YAML file")] = None,
    run_dir: RunDir = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="continue the run in this folder from its last checkpoint (at most one epoch "
            "of work is redone)",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="processes on this machine: above 1, relaunch through torchrun and train with "
            "DistributedDataParallel (gloo on CPU, NCCL for CUDA tensors)",
        ),
    ] = 1,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=1.0,
            help="seconds a process waits for the others (rendezvous, collectives) before the "
            "job fails",
        ),
    ] = DEFAULT_TIMEOUT_S,
) -> None:
    """Run a recipe: baseline, compression stages, export, report.

    Several processes: --nproc N here, or start it with torchrun yourself (several machines:
    torchrun --nnodes M --node-rank R --rdzv-endpoint HOST:PORT -m slimkit.cli compress ...).
    """
    if nproc > 1:
        _launch(nproc, recipe, run_dir, quiet, resume, timeout)
    else:
        _run(recipe, run_dir, quiet, resume, timeout)


@app.command()
def inspect(recipe: Annotated[Path, typer.Argument(help="recipe YAML file")]) -> None:
    """List every module each technique will touch, and every one it skips with the reason."""
    from slimkit.recipe.inspect import inspect_recipe
    from slimkit.recipe.schema import load_recipe

    Console().print(inspect_recipe(load_recipe(recipe)))


@app.command()
def sensitivity(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML file (its baseline and task)")],
    out: Annotated[
        Path | None,
        typer.Option("--out", help="new or empty folder (default runs/NAME-sensitivity)"),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Per-layer sensitivity curves for structured pruning: sensitivity.json and .png.

    Trains (or loads) the recipe's baseline, then prunes each channel group alone at sparsities
    0.1..0.9 and measures the validation metric. The first structured_prune technique of the
    recipe, if any, gives the scope, importance and round_to. Point that technique's
    sensitivity_file at the JSON to reuse the curves.
    """
    from slimkit.prune.sensitivity import run_sensitivity
    from slimkit.prune.structured import StructuredPruningConfig
    from slimkit.recipe.runner import Runner, resolve_run_dir
    from slimkit.recipe.schema import load_recipe

    console = Console()
    spec = load_recipe(recipe)
    folder = resolve_run_dir(f"{spec.name}-sensitivity", out)
    runner = Runner(spec, folder, console=console, progress=not quiet)
    model, base = runner.baseline()
    configs = [
        t for s in spec.stages for t in s.techniques if isinstance(t, StructuredPruningConfig)
    ]
    files = run_sensitivity(
        runner.task, model, folder, config=configs[0] if configs else None, progress=not quiet
    )
    report = files.report
    console.print(str(report))
    console.print(
        f"baseline val {spec.task} {runner.task.metric_name}: {base.val_metric:.4f}; "
        f"wrote {files.json} and {files.png}"
    )


@app.command()
def bench(
    model: Annotated[Path, typer.Argument(help="ONNX model file")],
    batch: Annotated[
        list[int] | None, typer.Option("--batch", help="batch sizes (repeatable)")
    ] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads")] = 1,
    repeats: Annotated[int, typer.Option(help="timed runs per batch size")] = 50,
    warmup: Annotated[int, typer.Option(help="untimed runs first")] = 10,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write JSON here")] = None,
) -> None:
    """ONNX Runtime latency (median of repeated runs after warm-up) and size of a model."""
    from slimkit.measure.bench import bench_onnx

    report = bench_onnx(
        model,
        batch_sizes=tuple(batch or (1, 32)),
        threads=threads,
        repeats=repeats,
        warmup=warmup,
    )
    Console().print(report.table())
    if json_out is not None:
        from slimkit.io import atomic_write_json

        atomic_write_json(json_out, report.to_dict())


@app.command()
def schema() -> None:
    """Print the recipe JSON Schema."""
    from slimkit.recipe.schema import recipe_json_schema

    typer.echo(json.dumps(recipe_json_schema(), indent=2))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning slimkit errors into one line and exit code 2."""
    worker = launched_by_torchrun()  # a torchrun worker names its rank in any failure
    try:
        code = app(args=argv, standalone_mode=False)  # typer.Exit(n) comes back as n
    except SlimkitError as exc:
        if worker:
            return _worker_failed(exc)
        message = " ".join(str(exc).split())
        print(f"slimkit: error: {message}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("slimkit: aborted", file=sys.stderr)
        return 130
    except _ClickException as exc:
        if worker:
            return _worker_failed(exc)
        exc.show()  # type: ignore[attr-defined]
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:
        if worker:
            return _worker_failed(exc)
        raise
    return code if isinstance(code, int) else 0


def _worker_failed(exc: Exception) -> int:
    """A torchrun worker's failure: one line naming the rank; the error files for the launcher."""
    from slimkit.launcher import record_failure

    code = 2 if isinstance(exc, (SlimkitError, _ClickException)) else 1
    print(f"slimkit: error: {record_failure(exc, code)}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
