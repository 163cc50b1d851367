"""Two real processes (gloo over loopback): every technique agrees bit for bit across ranks and
matches one process on the same global batches; ``slimkit compress --nproc 2`` end to end; a
rank that fails ends the job with one line naming it. The helpers' single-process behaviour."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from slimkit import distributed as D
from slimkit.core.compressor import Compressor
from slimkit.core.schedules import PolynomialSchedule
from slimkit.errors import ConfigError, UnsupportedModuleError
from slimkit.prune.magnitude import MagnitudePruningConfig, weight_mask_of
from slimkit.prune.structured import StructuredPruning, StructuredPruningConfig
from slimkit.quant.affine import QuantSpec
from slimkit.quant.observers import make_observer
from slimkit.quant.ptq import StaticQuantization, StaticQuantizationConfig
from slimkit.quant.qat import QATConfig, QuantizationAwareTraining
from slimkit.recipe.runner import run_recipe
from slimkit.recipe.schema import load_recipe

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
ROWS = 15  # odd: the ranks' shares differ (8 and 7 rows), so the loss weighting matters
OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "entropy")
QAT_CASES = {"lsq_plus": ("lsq_plus", True), "lsq_first_forward": ("lsq", False)}


# --- models, data and the runs compared -----------------------------------------------------------
def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def global_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(ROWS, 1, 8, 8, generator=g) * (1 + i % 3), torch.randint(0, 10, (ROWS,))


def train(model: nn.Module, compressor: Compressor | None, steps: int, lr: float = 0.05) -> None:
    """SGD on global batches: under DDP each rank takes its rows, its loss weighted by its share
    (what the runner does); in one process the whole batch."""
    net = DistributedDataParallel(model) if D.is_distributed() else model
    extra = list(compressor.parameters()) if compressor is not None else []
    optimizer = torch.optim.SGD([*net.parameters(), *extra], lr=lr, momentum=0.9)
    for i in range(steps):
        (x, y), share = D.shard_rows(global_batch(i))
        loss = F.cross_entropy(net(x), y) * share
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if compressor is not None:
            compressor.step()
    del net


def run_pruning(importance: str) -> dict[str, torch.Tensor]:
    """Magnitude pruning with a gradual schedule and an EMA/Taylor importance while training."""
    model = tiny_model()
    schedule = PolynomialSchedule(final=0.7, begin=2, end=8, frequency=2)
    config = MagnitudePruningConfig(schedule=schedule, importance=importance, ema_alpha=0.8)
    compressor = Compressor([config]).apply(model)
    train(model, compressor, steps=9)
    out = {}
    for name, module in model.named_modules():
        if (state := weight_mask_of(module)) is not None:
            out[f"{name}.mask"] = state.mask.clone()
            out[f"{name}.importance"] = state.importance.clone()
            out[f"{name}.weight"] = module.parametrizations.weight.original.detach().clone()
    return out


def run_masks_from_rank0(perturb: bool) -> dict[str, torch.Tensor]:
    """One-shot magnitude masks when rank 1's weights differ: rank 0's masks win."""
    model = tiny_model()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    Compressor([MagnitudePruningConfig(sparsity=0.5)]).apply(model)
    return {
        n: weight_mask_of(m).mask.clone() for n, m in model.named_modules() if weight_mask_of(m)
    }


def calibration_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [global_batch(i) for i in range(4)]


def run_calibration(observer: str) -> dict[str, torch.Tensor]:
    """Static PTQ: each rank calibrates on its rows of the calibration batches."""
    model = tiny_model()
    technique = StaticQuantization(StaticQuantizationConfig(observer=observer))
    technique.apply(model)
    technique.calibrate(model, D.ShardedBatches(calibration_batches()))
    out = {}
    for key, quantizer in model.activation_quantizers.items():
        out[f"{key}.scale"] = quantizer.scale.clone()
        out[f"{key}.zero_point"] = quantizer.zero_point.clone()
        if hasattr(quantizer.observer, "histogram"):
            out[f"{key}.count"] = quantizer.observer.histogram.sum().reshape(1)
    return out


def qat_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantizers' scales and zero points and the weights under them."""
    return {
        name: tensor.clone()
        for name, tensor in model.state_dict().items()
        if name.endswith(("scale", "zero_point", "original"))
    }


def run_qat(method: str, initialize: bool) -> dict[str, dict[str, torch.Tensor]]:
    """QAT with learned scales, initialised from every rank's batches (``initialize``) or by
    LSQ's init on the first forward; then trained, DDP averaging the scales' gradients."""
    model = tiny_model()
    technique = QuantizationAwareTraining(QATConfig(method=method))
    compressor = Compressor([technique]).apply(model)
    if initialize:
        technique.initialize(model, D.ShardedBatches(calibration_batches()), num_batches=None)
    else:
        with torch.no_grad():
            model(D.shard_rows(global_batch(0))[0][0])
    init = qat_state(model)
    train(model, compressor, steps=3, lr=0.01)
    return {"init": init, "trained": qat_state(model)}


def run_structured(perturb: bool) -> dict[str, torch.Tensor]:
    """One-shot structured pruning when rank 1's weights differ: the channels rank 0 picks go
    on every rank. Returns each sliced layer's kept indices."""
    model = tiny_model()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
    config = StructuredPruningConfig(sparsity=0.5, round_to=1)
    technique = StructuredPruning(config, example_inputs=(torch.randn(1, 1, 8, 8),))
    technique.apply(model)
    out = {}
    for record in technique.manifest.layers.values():
        for field in ("kept_out", "kept_in"):
            if getattr(record, field) is not None:
                out[f"{record.module}.{field}"] = torch.tensor(getattr(record, field))
    return out


def observed_data() -> torch.Tensor:
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(7)) * torch.arange(1, 5)


def run_observer_without_data(seen: bool) -> dict[str, torch.Tensor]:
    """A rank that saw nothing still takes part; per-channel ranges get the others' shape."""
    out = {}
    x = observed_data()
    for name, spec in (
        ("minmax", QuantSpec(granularity="per_channel", axis=1)),
        ("moving_average", QuantSpec(granularity="per_channel", axis=1)),
        ("entropy", QuantSpec(signed=False)),
    ):
        observer = make_observer(name, spec)
        if seen:
            observer(x)
        observer.synchronize()
        out[f"{name}.min"], out[f"{name}.max"] = observer.compute_range()
    return out


def refusals() -> dict[str, str]:
    """DDP-wrapped and FSDP-sharded models are refused with one-line errors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    messages = {}
    config = MagnitudePruningConfig(sparsity=0.5)
    try:
        Compressor([config]).apply(DistributedDataParallel(tiny_model()))
    except UnsupportedModuleError as exc:
        messages["ddp"] = str(exc)
    model = tiny_model()
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    for kind, technique in (
        ("fsdp", Compressor([config])),
        ("fsdp_ptq", StaticQuantization()),
    ):
        try:
            technique.apply(model)
        except UnsupportedModuleError as exc:
            messages[kind] = str(exc)
    return messages


def _scenarios(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for importance in ("ema", "taylor"):
        out[f"prune_{importance}"] = run_pruning(importance)
    out["masks_from_rank0"] = run_masks_from_rank0(perturb=rank == 1)
    for observer in OBSERVERS:
        out[f"ptq_{observer}"] = run_calibration(observer)
    for case, (method, initialize) in QAT_CASES.items():
        for when, state in run_qat(method, initialize).items():
            out[f"{case}_{when}"] = state
    out["structured"] = run_structured(perturb=rank == 1)
    out["no_data"] = run_observer_without_data(seen=rank == 0)
    out["refusals"] = refusals()
    return out


def _worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.save(_scenarios(rank), Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # tearing gloo down while the other rank still uses it aborts a process
    finally:
        dist.destroy_process_group()


def spawn(worker: Any, args: tuple, timeout: float) -> None:
    """``mp.spawn`` with a deadline: a hung job fails the test instead of the suite."""
    context = mp.start_processes(worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes did not finish within {timeout:.0f} s")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("ranks")
    spawn(_worker, (WORLD, str(folder / "rendezvous"), str(folder)), timeout=120)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_same_on_every_rank(ranks: list[dict[str, Any]], key: str) -> dict[str, torch.Tensor]:
    first = ranks[0][key]
    for other in ranks[1:]:
        assert sorted(other[key]) == sorted(first), key
        for name, tensor in first.items():
            assert torch.equal(other[key][name], tensor), f"{key}: {name} differs across ranks"
    return first


# --- techniques on two processes ------------------------------------------------------------------
@pytest.mark.parametrize("importance", ["ema", "taylor"])
def test_pruning_masks_are_identical_and_match_one_process(ranks, importance: str) -> None:
    key = f"prune_{importance}"
    got = assert_same_on_every_rank(ranks, key)
    reference = run_pruning(importance)  # one process, whole global batches
    for name, tensor in reference.items():
        if name.endswith(".mask"):
            agree = float((got[name] == tensor).float().mean())
            assert agree >= 0.99, f"{name}: {agree:.4f} of the mask agrees"
            assert float((tensor == 0).float().mean()) == pytest.approx(0.7, abs=0.02)
        else:
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5)


def test_masks_come_from_rank_0_when_weights_differ(ranks) -> None:
    got = assert_same_on_every_rank(ranks, "masks_from_rank0")
    reference = run_masks_from_rank0(perturb=False)
    for name, mask in reference.items():
        assert torch.equal(got[name], mask), name


@pytest.mark.parametrize("observer", OBSERVERS)
def test_calibration_qparams_are_identical_and_match_one_process(ranks, observer: str) -> None:
    got = assert_same_on_every_rank(ranks, f"ptq_{observer}")
    reference = run_calibration(observer)
    assert sorted(got) == sorted(reference)
    for name, tensor in reference.items():
        if name.endswith(".count"):  # every value was counted once, whichever rank saw it
            assert torch.equal(got[name], tensor), name
        elif observer == "minmax":  # the union's min/max: exact
            assert torch.equal(got[name], tensor), name
        elif name.endswith(".scale"):
            # moving averages are averaged over ranks, histograms merged on a grid up to 2x
            # coarser (see the observers' docstring): close, not equal
            bound = {"moving_average": 0.1, "percentile": 0.05, "mse": 0.1, "entropy": 0.3}
            ratio = float(got[name]) / float(tensor)
            assert abs(ratio - 1) <= bound[observer], f"{name}: scale ratio {ratio:.4f}"


@pytest.mark.parametrize("case", sorted(QAT_CASES))
def test_lsq_scales_stay_identical_and_match_one_process(ranks, case: str) -> None:
    init = assert_same_on_every_rank(ranks, f"{case}_init")
    trained = assert_same_on_every_rank(ranks, f"{case}_trained")
    reference = run_qat(*QAT_CASES[case])
    assert any(name.endswith("input_quantizer.scale") for name in init)
    for name, tensor in reference["init"].items():  # statistics of the union of the rows
        torch.testing.assert_close(init[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    for name, tensor in reference["trained"].items():
        moved = float((tensor - reference["init"][name]).abs().max())
        if name.endswith("scale"):
            assert moved > 0, f"{name} did not learn"
        # LSQ's scale gradient jumps where a value crosses a rounding boundary, so float noise
        # (a sum over two ranks) grows a little with every step: compare with how far it moved
        bound = 0.05 * moved + 1e-7
        torch.testing.assert_close(trained[name], tensor, rtol=1e-3, atol=bound, msg=name)


def test_structured_pruning_slices_rank_0s_channels_everywhere(ranks) -> None:
    got = assert_same_on_every_rank(ranks, "structured")
    assert len(got["0.kept_out"]) == 8  # half of the 16 filters went
    mine = run_structured(perturb=False)  # rank 0's own choice
    assert sorted(mine) == sorted(got)
    assert all(torch.equal(got[k], mine[k]) for k in got)
    own = run_structured(perturb=True)  # what rank 1 alone would have cut
    assert any(not torch.equal(own[k], got[k]) for k in got)


def test_an_observer_that_saw_nothing_takes_the_others_statistics(ranks) -> None:
    got = assert_same_on_every_rank(ranks, "no_data")
    x = observed_data()  # only rank 0 saw it
    for name in ("minmax", "moving_average"):
        assert torch.equal(got[f"{name}.min"], x.amin(0)), name
        assert torch.equal(got[f"{name}.max"], x.amax(0)), name
    assert 0 < float(got["entropy.max"]) <= float(x.max())


def test_ddp_wrapped_and_fsdp_sharded_models_are_refused(ranks) -> None:
    messages = ranks[0]["refusals"]
    assert "apply techniques to the plain model" in messages["ddp"]
    for kind in ("fsdp", "fsdp_ptq"):
        assert "sharded by FSDP" in messages[kind] and "DDP" in messages[kind]
        assert "\n" not in messages[kind]


# --- slimkit compress --nproc 2 -------------------------------------------------------------------
def slimkit(
    args: list[str], cwd: Path, timeout: float, **env_vars: str
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_vars)
    return subprocess.run(
        [sys.executable, "-m", "slimkit.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory, tiny_recipe_text: str) -> Path:
    """``slimkit compress tiny.yaml --nproc 2``: the run folder."""
    folder = tmp_path_factory.mktemp("two_processes")
    (folder / "tiny.yaml").write_text(tiny_recipe_text, encoding="utf-8")
    proc = slimkit(
        ["compress", "tiny.yaml", "--nproc", "2", "--run-dir", "two", "--quiet"],
        folder,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("run folder: two") == 1  # rank 0 alone prints
    assert "error" not in proc.stderr.lower()
    return folder / "two"


def metrics_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))


def test_compress_on_two_processes_matches_one(tmp_path: Path, two_processes: Path) -> None:
    recipe = load_recipe(two_processes / "recipe.yaml")
    console = Console(file=io.StringIO())
    one = run_recipe(recipe, tmp_path / "one", progress=False, console=console).to_dict()
    two = metrics_of(two_processes)
    assert two["environment"]["processes"] == 2
    for part_one, part_two in zip(
        [one["baseline"], *one["stages"]], [two["baseline"], *two["stages"]], strict=True
    ):
        assert part_two["steps"] == part_one["steps"]  # the same optimizer steps
        assert part_two["params"] == part_one["params"]
        assert part_two["sparsity"] == pytest.approx(part_one["sparsity"], abs=1e-3)
        # BatchNorm normalises each rank's half batch: close, not equal
        assert part_two["val_metric"] == pytest.approx(part_one["val_metric"], abs=0.12)
    names_one, names_two = files_under(tmp_path / "one"), files_under(two_processes)
    assert [n for n in names_two if "events" not in n] == [
        n for n in names_one if "events" not in n
    ]
    assert len([n for n in names_two if "events" in n]) == 1  # one TensorBoard writer: rank 0
    assert not [n for n in names_two if n.endswith(".tmp")]


CRASHING_TASK = """\
import os

from slimkit.tasks.digits import make_digits_task


def make(seed=0, batch_size=64):
    task = make_digits_task(seed=seed, batch_size=batch_size)
    loader, calls = task.train_loader, []

    def train_loader(epoch_seed):
        calls.append(epoch_seed)
        crash = os.environ.get("CRASH_RANK") == os.environ.get("RANK")
        if crash and len(calls) > 2:  # in the prune stage, after the baseline's checkpoint
            raise RuntimeError("simulated crash")
        return loader(epoch_seed)

    task.train_loader = train_loader
    return task
"""


def test_a_failing_rank_ends_the_job_with_one_line_and_the_run_resumes(
    tmp_path: Path, tiny_recipe_text: str, two_processes: Path
) -> None:
    (tmp_path / "crashing.py").write_text(CRASHING_TASK, encoding="utf-8")
    recipe = tmp_path / "crash.yaml"
    text = tiny_recipe_text.replace("task: digits", "task: crashing:make")
    recipe.write_text(text.replace("onnx: true}", "onnx: true, latency: false}"))
    args = ["compress", recipe.name, "--nproc", "2", "--run-dir", "run", "--quiet"]
    start = time.monotonic()
    proc = slimkit([*args, "--timeout", "60"], tmp_path, timeout=120, CRASH_RANK="1")
    assert time.monotonic() - start < 90
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    message = "slimkit: error: rank 1 failed: RuntimeError: simulated crash (traceback: "
    assert line.startswith(message) and line.endswith(".txt)"), line
    traceback = Path(line.removeprefix(message)[:-1])  # kept: not a slimkit error
    assert "simulated crash" in traceback.read_text(encoding="utf-8")
    shutil.rmtree(traceback.parent)
    assert not (tmp_path / "run" / "metrics.json").exists()

    # every rank resumes from rank 0's checkpoints: the run ends as one never interrupted
    proc = slimkit(["compress", "--resume", "run", "--nproc", "2", "--quiet"], tmp_path, 150)
    assert proc.returncode == 0, proc.stderr
    resumed, reference = metrics_of(tmp_path / "run"), metrics_of(two_processes)
    for key in ("val_metric", "test_metric", "sparsity", "steps"):
        assert [resumed["baseline"][key], resumed["stages"][0][key]] == [
            reference["baseline"][key],
            reference["stages"][0][key],
        ], key


# --- the helpers in one process -------------------------------------------------------------------
def test_helpers_are_no_ops_in_one_process() -> None:
    assert (D.rank(), D.world_size(), D.is_main(), D.is_distributed()) == (0, 1, True, False)
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_(t, "mean") is t and t.tolist() == [1.0, 2.0]
    assert D.broadcast_tensor_(t) is t
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.on_main(lambda x: x + 1, 1) == 2
    assert D.only_main(lambda: "main")() == "main"
    with D.main_process_first():
        pass
    D.barrier()
    assert D.init_from_env() is False  # no torchrun variables here
    with pytest.raises(ConfigError, match="op must be one of"):
        D.all_reduce_(t, "avg")


def test_shard_rows_splits_every_batch_tensor_and_weights_the_shares() -> None:
    x, y, mask = torch.arange(10).reshape(5, 2), torch.arange(5), torch.ones(3)
    parts = [D.shard_rows((x, y, mask, "text"), r, 2) for r in range(2)]
    assert [p[0][1].tolist() for p in parts] == [[0, 1], [2, 3, 4]]
    assert parts[0][0][2] is mask and parts[0][0][3] == "text"  # no batch dimension: whole
    assert [p[1] for p in parts] == [pytest.approx(0.8), pytest.approx(1.2)]
    # the weighted means averaged over ranks (what DDP does to gradients): the batch's mean
    averaged = sum(w * part[1].float().mean() for part, w in parts) / 2
    assert float(averaged) == pytest.approx(float(y.float().mean()))
    part, weight = D.shard_rows({"ids": torch.zeros(1, 3)}, 0, 2)  # fewer rows than ranks
    assert weight == 0.0 and part["ids"].shape == (1, 3)
    with pytest.raises(ConfigError, match="no tensor"):
        D.shard_rows(["a", "b"], 0, 2)


def test_nproc_under_torchrun_and_bad_arguments_are_one_line_errors(
    tmp_path: Path, tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from slimkit.cli import main

    assert main(["compress", "--nproc", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "slimkit: error: give a recipe file, or --resume RUN_DIR"
    )
    assert (
        main(["compress", str(tiny_recipe), "--nproc", "2", "--resume", "x", "--run-dir", "y"]) == 2
    )
    assert "do not give --run-dir too" in capsys.readouterr().err
    for name, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "x"),
        ("MASTER_PORT", "1"),
    ):
        monkeypatch.setenv(name, value)
    assert main(["compress", str(tiny_recipe), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "slimkit: error: rank 0 failed: --nproc starts torchrun itself; under torchrun leave it out"
    ]
