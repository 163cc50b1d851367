"""Int8 quantization on digits vs ONNX Runtime's own quantize_static, and the int8-kernel study.

For each seed, a DigitsResNet (width 16) and a MobileNetV2-style model (``mobilenetv2_tiny``,
depthwise convs) are trained on digits, then quantized and run in ONNX Runtime (1 thread):

* slimkit static int8 PTQ with every observer (per-channel int8 weights, uint8 activations);
* the peer, ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, QUInt8/QInt8, MinMax
  and Entropy) on the same fp32 ONNX (after ``quant_pre_process``) and the same calibration
  batches;
* ResNet only: LSQ QAT at W8A8 and W4A8 (torch fake-quant accuracy; for ORT the finalized QAT
  model gets slimkit 8-bit static PTQ, which re-derives activation ranges), and magnitude
  pruning to 80% (global LAMP, fine-tuned) followed by int8 PTQ;
* the non-VNNI study (minmax ranges): default u8 x s8, 7-bit activations (``reduce_range``, as
  ``export_qdq`` writes it and after ``drop_redundant_clips``), 7-bit weights on every u8s8
  layer and only where calibration data saturates (``reduce_weight_range_``), and the peer's
  ``reduce_range`` (7-bit weights).

Fidelity is measured against the fp32 model's outputs on the validation + test images (top-1
agreement, mean KL); the ORT vs fake-quant gap in units of the output quantization step; the
AVX2 ``vpmaddubsw`` int16 pair saturation is *emulated* (this CPU's ORT uses VNNI and never
saturates). Latency is measured interleaved (``compare_latency``) on seed 0's models.

Run: python -m benchmarks.quant_digits [--seeds 0 1 2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from benchmarks.common import environment, update_readme_section, write_result
from benchmarks.common import train as common_train
from benchmarks.quant_digits_report import OBSERVERS, attach_latency, checks, render, summarise
from slimkit import Compressor, MagnitudePruningConfig
from slimkit.export.clips import drop_redundant_clips
from slimkit.export.onnx import export_onnx, optimized_op_counts
from slimkit.export.qdq import export_qdq
from slimkit.measure.fidelity import mean_kl_divergence, top1_agreement
from slimkit.measure.latency import compare_latency, ort_session
from slimkit.models.cnn import DigitsResNet, mobilenetv2_tiny
from slimkit.quant.ptq import StaticQuantization, StaticQuantizationConfig
from slimkit.quant.qat import QATConfig, QuantizationAwareTraining
from slimkit.quant.saturation import (
    emulate_u8s8_saturation,
    input_qparams,
    needs_reduce_range,
    reduce_weight_range_,
    saturation_report,
)
from slimkit.tasks.digits import make_digits_task

FLOAT_KERNELS = ("Conv", "FusedConv", "NhwcFusedConv", "Gemm", "MatMul", "FusedMatMul")
MODELS = {"resnet": lambda: DigitsResNet(width=16), "mobilenet": lambda: mobilenetv2_tiny(width=16)}


# ------------------------------------------------------------------------------------ training
def train(model: nn.Module, task, epochs: int, lr: float, seed: int, on_step=None) -> None:
    """Adam, cosine decay over the budget; ``on_step(step)`` after every optimizer step."""
    with timed("training"):
        common_train(model, task, epochs, lr, seed, on_step=on_step)
    model.eval()


# ----------------------------------------------------------------------------- measurement
TIMES: dict[str, float] = {}


@contextlib.contextmanager
def timed(label: str):
    """Accumulate wall seconds per stage (printed at the end, stored in the JSON)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        TIMES[label] = TIMES.get(label, 0.0) + time.perf_counter() - start


def ort_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    return ort_session(path).run(None, {"input": x.numpy()})[0]


def torch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x).numpy()


def accuracy(logits: np.ndarray, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels.numpy()).mean())


def kernel_counts(path: Path) -> dict[str, int]:
    counts = optimized_op_counts(path)
    return {
        "int8_kernels": sum(counts.get(k, 0) for k in ("QLinearConv", "QGemm")),
        "float_kernels": sum(counts.get(k, 0) for k in FLOAT_KERNELS),
        "clip": counts.get("Clip", 0),
        "ops": counts,
    }


def _rss_kib(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def peak_memory(fn) -> dict[str, float | None]:
    """Run ``fn()``; peak resident growth (VmHWM after resetting it, MiB) and tracemalloc peak."""
    gc.collect()
    reset = False
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        reset = True
    base = _rss_kib("VmRSS")
    tracemalloc.start()
    try:
        fn()
        _, traced = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    hwm = _rss_kib("VmHWM")
    rss = (hwm - base) / 1024 if reset and base is not None and hwm is not None else None
    return {"rss_peak_mib": rss, "tracemalloc_peak_mib": traced / 2**20}


@contextlib.contextmanager
def one_thread_ort():
    """ORT's quantization tools open sessions with default options (all cores); pin them to 1."""
    original = ort.SessionOptions

    def options() -> ort.SessionOptions:
        made = original()
        made.intra_op_num_threads = 1
        made.inter_op_num_threads = 1
        return made

    ort.SessionOptions = options
    try:
        yield
    finally:
        ort.SessionOptions = original


# ------------------------------------------------------------------------------------ peers
class Reader:
    """ORT CalibrationDataReader over the same calibration batches slimkit sees."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.items = iter([{"input": x.numpy()} for x, _ in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def peer_quantize(fp32: Path, out: Path, batches, method: str, reduce_range=False) -> Path:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    with timed("peer quantize_static"), one_thread_ort():
        quant_pre_process(str(fp32), str(pre))
        quantize_static(
            str(pre),
            str(out),
            Reader(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method),
        )
    return out


def peer_calibration(fp32: Path, folder: Path, batches, method: str) -> None:
    """ORT's calibration step alone (what ``quantize_static`` runs before writing QDQ)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    with one_thread_ort():
        calibrator = create_calibrator(
            str(fp32),
            augmented_model_path=str(folder / f"augmented-{method}.onnx"),
            calibrate_method=getattr(CalibrationMethod, method),
        )
        calibrator.collect_data(Reader(batches))
        calibrator.compute_data()


# ------------------------------------------------------------------------------- variants
def ptq(model: nn.Module, batches, **config: Any) -> tuple[nn.Module, StaticQuantization]:
    quantized = copy.deepcopy(model)
    technique = StaticQuantization(StaticQuantizationConfig(**config))
    technique.apply(quantized)
    technique.calibrate(quantized, batches)
    return quantized, technique


def output_step(model: nn.Module) -> float:
    return float(list(model.activation_quantizers.values())[-1].scale)


def slimkit_record(
    name, quantized, technique, ctx, folder, *, clean_clips=False, own_ref=None, **extra
):
    """Export, run in ORT, compare with fp32 and fake-quant, and emulate AVX2 saturation.

    ``own_ref``: logits (val+test) of the float model this variant quantizes when it is not the
    fp32 baseline (the pruned model, the QAT model); fidelity to it isolates quantization error.
    """
    with timed("export"):
        path = export_qdq(quantized, ctx["test_x"][:1], folder / f"{name}.onnx")
    dropped = 0
    if clean_clips:
        proto = onnx.load(str(path))
        dropped = drop_redundant_clips(proto)
        path = path.with_name(f"{name}.clean.onnx")
        onnx.save(proto, str(path))
    fq_test, fq_fid = torch_logits(quantized, ctx["test_x"]), torch_logits(quantized, ctx["fid_x"])
    ort_fid = ort_logits(path, ctx["fid_x"])
    qparams = input_qparams(technique)
    with timed("avx2 emulation"), torch.no_grad():
        with emulate_u8s8_saturation(quantized, qparams) as report:
            emulated = quantized(ctx["fid_x"]).numpy()
    return {
        "name": name,
        "kind": "slimkit",
        "path": path,
        "acc_ort": accuracy(ort_logits(path, ctx["test_x"]), ctx["test_y"]),
        "acc_fake_quant": accuracy(fq_test, ctx["test_y"]),
        **fidelity(ctx["ref_fid"], ort_fid),
        **{f"own_{k}": v for k, v in fidelity(_own(ctx, own_ref), ort_fid).items()},
        "ort_vs_fake_quant_steps": float(np.abs(ort_fid - fq_fid).max()) / output_step(quantized),
        "avx2_saturation_rate": report.rate,
        "avx2_saturating_layers": [n for n, s in report.layers.items() if s.saturated_pairs],
        "avx2_agreement": top1_agreement(ctx["ref_fid"], emulated),
        "avx2_kl": mean_kl_divergence(ctx["ref_fid"], emulated),
        "clips_dropped": dropped,
        **extra,
        **file_facts(path),
    }


def _own(ctx, own_ref: np.ndarray | None) -> np.ndarray:
    return ctx["ref_fid"] if own_ref is None else own_ref


def fidelity(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    return {"agreement": top1_agreement(ref, test), "kl": mean_kl_divergence(ref, test)}


def file_facts(path: Path) -> dict[str, Any]:
    with timed("kernel counts"):
        return {"size_bytes": path.stat().st_size, **kernel_counts(path)}


def peer_record(name: str, path: Path, ctx) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "peer",
        "path": path,
        "acc_ort": accuracy(ort_logits(path, ctx["test_x"]), ctx["test_y"]),
        **fidelity(ctx["ref_fid"], ort_logits(path, ctx["fid_x"])),
        **file_facts(path),
    }


def qat_record(name, fp32, ctx, folder, wbits: int, epochs: int) -> dict[str, Any]:
    model = copy.deepcopy(fp32)
    steps = epochs * len(ctx["task"].train_loader(0))
    qat = QuantizationAwareTraining(QATConfig(wbits=wbits, abits=8, freeze_bn_after=steps // 2))
    qat.apply(model)
    qat.initialize(model, ctx["calib"], num_batches=None)
    train(model, ctx["task"], epochs, 5e-4, ctx["seed"] + 1, qat.step)
    qat_acc = accuracy(torch_logits(model, ctx["test_x"]), ctx["test_y"])
    qat_logits = torch_logits(model, ctx["fid_x"])
    qat_fid = fidelity(ctx["ref_fid"], qat_logits)
    plain = qat.finalize(model)
    quantized, technique = ptq(plain, ctx["calib"])
    return slimkit_record(
        name,
        quantized,
        technique,
        ctx,
        folder,
        own_ref=qat_logits,
        acc_qat_torch=qat_acc,
        qat_torch_agreement=qat_fid["agreement"],
        qat_torch_kl=qat_fid["kl"],
    )


def pruned_record(name, fp32, ctx, folder, epochs: int) -> dict[str, Any]:
    model = copy.deepcopy(fp32)
    config = MagnitudePruningConfig(sparsity=0.8, ranking="global", importance="lamp")
    compressor = Compressor([config]).apply(model)
    train(model, ctx["task"], epochs, 1e-3, ctx["seed"] + 2, lambda _: compressor.step())
    pruned = compressor.finalize()  # strip_pruning: plain weights with exact zeros
    layers = [m for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = [m.weight.detach() == 0 for m in layers]
    sparsity = sum(int(z.sum()) for z in zeros) / sum(z.numel() for z in zeros)
    pruned_acc = accuracy(torch_logits(pruned, ctx["test_x"]), ctx["test_y"])
    quantized, technique = ptq(pruned, ctx["calib"])
    own = torch_logits(pruned, ctx["fid_x"])
    record = slimkit_record(
        name,
        quantized,
        technique,
        ctx,
        folder,
        own_ref=own,
        acc_pruned_fp32=pruned_acc,
        sparsity=sparsity,
    )
    # BN folding scales whole output channels, so pruned positions must be int8 code 0 in ONNX
    proto = onnx.load(str(record["path"]))
    codes = [
        onnx.numpy_helper.to_array(i)
        for i in proto.graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1
    ]
    unused, kept = list(codes), True
    for z in zeros:  # match each pruned layer to an unused int8 tensor of its shape
        match = next(
            (i for i, c in enumerate(unused) if c.shape == z.shape and (c[z.numpy()] == 0).all()),
            None,
        )
        kept = kept and match is not None
        if match is not None:
            unused.pop(match)
    record["pruned_zeros_kept"] = kept
    record["int8_zero_fraction"] = sum(int((c == 0).sum()) for c in codes) / sum(
        c.size for c in codes
    )
    return record


def study_records(fp32, base_name, ctx, folder) -> list[dict[str, Any]]:
    """Non-VNNI options on minmax ranges (the default ``a8w8`` is the ``minmax`` row)."""
    out = []
    quantized, technique = ptq(fp32, ctx["calib"], reduce_range=True)
    out.append(slimkit_record(f"{base_name} a7w8 reduce_range", quantized, technique, ctx, folder))
    out.append(
        slimkit_record(
            f"{base_name} a7w8 reduce_range + drop_redundant_clips",
            quantized,
            technique,
            ctx,
            folder,
            clean_clips=True,
        )
    )
    quantized, technique = ptq(fp32, ctx["calib"])
    reduce_weight_range_(technique)
    out.append(slimkit_record(f"{base_name} a8w7 all", quantized, technique, ctx, folder))
    quantized, technique = ptq(fp32, ctx["calib"])
    found = saturation_report(quantized, input_qparams(technique), ctx["calib"])
    needed = [n for n, s in found.layers.items() if s.saturated_pairs]
    reduce_weight_range_(technique, needed)
    record = slimkit_record(f"{base_name} a8w7 where needed", quantized, technique, ctx, folder)
    record["reduced_layers"] = needed
    out.append(record)
    return out


# ------------------------------------------------------------------------------------ a seed
def run_family(family: str, ctx, folder: Path, args) -> list[dict[str, Any]]:
    task = ctx["task"]
    torch.manual_seed(ctx["seed"])
    fp32 = MODELS[family]()
    train(fp32, task, args.epochs, 3e-3, ctx["seed"] + 10_000)
    ctx["ref_fid"] = torch_logits(fp32, ctx["fid_x"])
    fp32_path = export_onnx(fp32, ctx["test_x"][:1], folder / f"{family}-fp32.onnx")
    records = [
        {
            "name": "fp32",
            "kind": "fp32",
            "path": fp32_path,
            "acc_ort": accuracy(ort_logits(fp32_path, ctx["test_x"]), ctx["test_y"]),
            "acc_torch": accuracy(ctx["ref_fid"][-len(ctx["test_y"]) :], ctx["test_y"]),
            **fidelity(ctx["ref_fid"], ort_logits(fp32_path, ctx["fid_x"])),
            **file_facts(fp32_path),
        }
    ]
    for observer in OBSERVERS:
        quantized, technique = ptq(fp32, ctx["calib"], observer=observer)
        records.append(slimkit_record(f"slimkit {observer}", quantized, technique, ctx, folder))
    for method, rr in (("MinMax", False), ("Entropy", False), ("MinMax", True)):
        name = f"ORT {method}" + (" reduce_range" if rr else "")
        out = folder / f"{family}-{name.replace(' ', '-')}.onnx"
        peer_quantize(fp32_path, out, ctx["calib"], method, reduce_range=rr)
        records.append(peer_record(name, out, ctx))
    records += study_records(fp32, "slimkit minmax", ctx, folder)
    if family == "resnet":
        records.append(qat_record("slimkit LSQ W8A8", fp32, ctx, folder, 8, args.qat_epochs))
        records.append(qat_record("slimkit LSQ W4A8", fp32, ctx, folder, 4, args.qat_epochs))
        records.append(
            pruned_record("slimkit pruned 80% + int8", fp32, ctx, folder, args.prune_epochs)
        )
    ctx["fp32_model"] = fp32
    return records


def calibration_memory(state: Path, fp32_path: Path, folder: Path, counts) -> dict:
    """Peak memory of calibration alone, slimkit (streaming observers) vs ORT's calibrator.

    Each measurement runs in a fresh interpreter (memory freed by earlier work would otherwise
    be reused and hide the growth), after a 1-batch warm-up of the same calibration; two run
    at a time (each has its own process, so they do not disturb each other's peak).
    """
    from concurrent.futures import ThreadPoolExecutor

    specs = []
    for n, tool, method in itertools.product(counts, ("slimkit", "ORT"), ("minmax", "entropy")):
        child = folder / f"calibration-{tool}-{method}-{n}"
        child.mkdir()
        specs.append(
            {"tool": tool, "method": method, "batches": n, "state": str(state),
             "onnx": str(fp32_path), "folder": str(child)}
        )  # fmt: skip

    def run(spec: dict) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.quant_digits", "--calibration-child",
             json.dumps(spec)],
            capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
        )  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        measured = list(pool.map(run, specs))
    result: dict[str, dict[int, dict]] = {}
    for spec, peak in zip(specs, measured, strict=True):
        method = {"minmax": "MinMax", "entropy": "Entropy"}[spec["method"]]
        label = f"slimkit {spec['method']}" if spec["tool"] == "slimkit" else f"ORT {method}"
        result.setdefault(label, {})[spec["batches"]] = peak
    return result


def calibration_child(raw: str) -> None:
    """``--calibration-child SPEC``: measure one calibration, print its peak memory as JSON."""
    spec = json.loads(raw)
    torch.set_num_threads(1)
    task = make_digits_task(seed=0)
    batches = list(itertools.islice(task.train_loader(0), spec["batches"]))
    if spec["tool"] == "slimkit":
        fp32 = MODELS["resnet"]()
        fp32.load_state_dict(torch.load(spec["state"], weights_only=True))

        def calibrate(data):
            model = copy.deepcopy(fp32)
            technique = StaticQuantization(StaticQuantizationConfig(observer=spec["method"]))
            technique.apply(model)
            return lambda: technique.calibrate(model, data)
    else:
        method = {"minmax": "MinMax", "entropy": "Entropy"}[spec["method"]]

        def calibrate(data):
            return lambda: peer_calibration(Path(spec["onnx"]), Path(spec["folder"]), data, method)

    with contextlib.redirect_stdout(sys.stderr):  # ORT's calibrators print progress
        calibrate(batches[:1])()
        measured = peak_memory(calibrate(batches))
    print(json.dumps(measured))


# -------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15, help="fp32 training")
    parser.add_argument("--qat-epochs", type=int, default=4)
    parser.add_argument("--prune-epochs", type=int, default=8, help="fine-tune after pruning")
    parser.add_argument("--calibration-batches", type=int, default=8, help="of 64 train images")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds")
    parser.add_argument("--quick", action="store_true", help="1 seed, short training (smoke)")
    parser.add_argument("--name", default="quant_digits")
    parser.add_argument("--calibration-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.calibration_child:
        with one_thread_ort():
            calibration_child(args.calibration_child)
        return
    if args.quick:
        args.seeds, args.epochs, args.qat_epochs, args.prune_epochs, args.rounds = [0], 3, 1, 1, 1
        args.name = args.name if args.name != "quant_digits" else "quant_digits_quick"
    torch.set_num_threads(1)
    start = time.perf_counter()
    per_seed: dict[str, list[list[dict]]] = {f: [] for f in MODELS}
    latency: dict[str, dict] = {}
    memory: dict = {}
    with one_thread_ort(), tempfile.TemporaryDirectory(prefix="slimkit-quant-digits-") as tmp:
        for seed in args.seeds:
            task = make_digits_task(seed=seed)
            test_x, test_y = task.test_loader.dataset.tensors
            val_x = task.val_loader.dataset.tensors[0]
            ctx = {
                "task": task,
                "seed": seed,
                "calib": list(itertools.islice(task.train_loader(0), args.calibration_batches)),
                "test_x": test_x,
                "test_y": test_y,
                "fid_x": torch.cat([val_x, test_x]),
            }
            for family in MODELS:
                folder = Path(tmp) / f"seed{seed}-{family}"
                folder.mkdir()
                records = run_family(family, ctx, folder, args)
                per_seed[family].append(records)
                print(
                    f"seed {seed} {family}: "
                    + ", ".join(
                        f"{r['name']} {r['acc_ort']:.4f}/{r['agreement']:.4f}" for r in records
                    ),
                    flush=True,
                )
                if seed == args.seeds[0]:
                    paths = {r["name"]: r["path"] for r in records}
                    with timed("latency"):
                        latency[family] = compare_latency(paths, rounds=args.rounds, repeats=50)
                    if family == "resnet":
                        state = folder / "fp32.pt"
                        torch.save(ctx["fp32_model"].state_dict(), state)
                        with timed("calibration memory"):
                            # 19 full batches: ORT's Entropy calibrator fails on a ragged one
                            counts = (4, 19) if not args.quick else (2, 4)
                            memory = calibration_memory(state, paths["fp32"], folder, counts)
    summary = {}
    for family in MODELS:
        summary[family] = summarise(per_seed[family])
        attach_latency(summary[family], latency[family])
    checked = checks(summary)
    payload = {
        "benchmark": "quant_digits",
        "args": vars(args),
        "env": environment(),
        "needs_reduce_range_here": needs_reduce_range(),
        "summary": summary,
        "per_seed": {
            f: [[{k: v for k, v in r.items() if k not in ("path", "ops")} for r in s] for s in runs]
            for f, runs in per_seed.items()
        },
        "latency": {f: {k: v for k, v in lat.items()} for f, lat in latency.items()},
        "calibration_memory": memory,
        "checks": checked,
        "stage_seconds": dict(TIMES),
        "wall_s": time.perf_counter() - start,
    }
    write_result(args.name, payload)
    text = render(args, summary, memory, checked, payload)
    update_readme_section(args.name, text)
    print(text)
    print("stage seconds:", {k: round(v, 1) for k, v in TIMES.items()}, file=sys.stderr)


if __name__ == "__main__":
    main()
