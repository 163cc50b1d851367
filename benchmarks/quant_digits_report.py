"""Tables, checks and the README text of ``benchmarks/quant_digits.py`` (pure formatting)."""

from __future__ import annotations

import statistics
import sys
from typing import Any

from benchmarks.common import md_table

OBSERVERS = ("minmax", "moving_average", "percentile", "mse", "entropy")
PEER_OF = {"entropy": "ORT Entropy"}  # every other slimkit variant is timed against ORT MinMax


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarise(per_seed: list[list[dict]]) -> list[dict[str, Any]]:
    keys = (
        "acc_ort",
        "acc_fake_quant",
        "acc_torch",
        "acc_qat_torch",
        "acc_pruned_fp32",
        "agreement",
        "kl",
        "own_agreement",
        "own_kl",
        "ort_vs_fake_quant_steps",
        "avx2_saturation_rate",
        "avx2_agreement",
        "avx2_kl",
        "qat_torch_agreement",
        "qat_torch_kl",
        "sparsity",
        "int8_zero_fraction",
    )
    rows = []
    for index, first in enumerate(per_seed[0]):
        runs = [seed[index] for seed in per_seed]
        row = {k: v for k, v in first.items() if k not in keys and k != "path"}
        for key in keys:
            if key in first:
                row[key] = mean([r[key] for r in runs])
        if "ort_vs_fake_quant_steps" in first:
            row["ort_vs_fake_quant_steps_max"] = max(r["ort_vs_fake_quant_steps"] for r in runs)
        if "pruned_zeros_kept" in first:
            row["pruned_zeros_kept"] = all(r["pruned_zeros_kept"] for r in runs)
        row["per_seed_acc_ort"] = [r["acc_ort"] for r in runs]
        rows.append(row)
    return rows


def attach_latency(rows: list[dict], latency: dict) -> None:
    results = latency["results"]
    for row in rows:
        timing = results[row["name"]]
        peer = PEER_OF.get(row["name"].removeprefix("slimkit "), "ORT MinMax")
        if row["name"].endswith(("a8w7 all", "a8w7 where needed")):
            peer = "ORT MinMax reduce_range"
        row["latency"] = {}
        for batch, t in timing.items():
            entry = {"median_ms": t["median_ms"], "vs_fp32": t["ratio"]}
            if row["kind"] == "slimkit":
                entry["vs_peer"] = t["median_ms"] / results[peer][batch]["median_ms"]
                entry["peer"] = peer
            row["latency"][batch] = entry


def fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def main_table(rows: list[dict], family: str) -> str:
    columns = [
        "variant",
        "ORT acc",
        "fake-quant acc",
        "agree",
        "KL",
        "agree*",
        "KL*",
        "ORT-FQ steps",
        "KB",
        "b1 x fp32",
        "b64 x fp32",
        "b1 x peer",
        "b64 x peer",
        "int8/float kernels",
    ]
    out = []
    for r in rows:
        if " a7w8" in r["name"] or " a8w7" in r["name"] or "reduce_range" in r["name"]:
            continue  # in the study table
        lat = r.get("latency", {})
        fq = r.get("acc_qat_torch", r.get("acc_fake_quant"))
        name = r["name"] + (" (QAT torch acc)" if "acc_qat_torch" in r else "")
        own_differs = "acc_qat_torch" in r or "acc_pruned_fp32" in r
        out.append(
            [
                name,
                fmt(r["acc_ort"]),
                fmt(fq),
                fmt(r["agreement"]),
                fmt(r["kl"], 5),
                fmt(r.get("own_agreement")) if own_differs else "=",
                fmt(r.get("own_kl"), 5) if own_differs else "=",
                fmt(r.get("ort_vs_fake_quant_steps_max"), 2),
                f"{r['size_bytes'] / 1024:.0f}",
                fmt(lat.get(1, {}).get("vs_fp32"), 3),
                fmt(lat.get(64, {}).get("vs_fp32"), 3),
                fmt(lat.get(1, {}).get("vs_peer"), 3),
                fmt(lat.get(64, {}).get("vs_peer"), 3),
                f"{r['int8_kernels']}/{r['float_kernels']}",
            ]
        )
    return f"**{family}**\n\n" + md_table(columns, out)


def study_table(rows: list[dict], family: str) -> str:
    columns = [
        "option",
        "can saturate",
        "AVX2 sat. pairs",
        "AVX2 agree",
        "AVX2 KL",
        "VNNI agree (ORT)",
        "VNNI KL (ORT)",
        "b1 x fp32",
        "b64 x fp32",
        "Clip ops",
        "int8/float kernels",
    ]
    out = []
    for r in rows:
        name = r["name"]
        if not (
            name == "slimkit minmax"
            or " a7w8" in name
            or " a8w7" in name
            or name.startswith("ORT MinMax")
        ):
            continue
        lat = r.get("latency", {})
        safe = " a7w8" in name or " a8w7 all" in name or "reduce_range" in name
        label = "no" if safe else ("only unflagged layers" if "needed" in name else "yes")
        emulated = r["kind"] == "slimkit"
        out.append(
            [
                name + (" (default)" if name == "slimkit minmax" else ""),
                label,
                f"{r['avx2_saturation_rate']:.2e}" if emulated else "-",
                fmt(r.get("avx2_agreement")),
                fmt(r.get("avx2_kl"), 5),
                fmt(r["agreement"]),
                fmt(r["kl"], 5),
                fmt(lat.get(1, {}).get("vs_fp32"), 3),
                fmt(lat.get(64, {}).get("vs_fp32"), 3),
                r["clip"],
                f"{r['int8_kernels']}/{r['float_kernels']}",
            ]
        )
    return f"**{family}**\n\n" + md_table(columns, out)


def memory_table(memory: dict) -> str:
    counts = sorted({n for per in memory.values() for n in per})
    columns = ["calibration", *[f"{n} batches: RSS / traced MiB" for n in counts]]
    rows = []
    for name, per in memory.items():
        cells = []
        for n in counts:
            m = per[n]
            cells.append(f"{fmt(m['rss_peak_mib'], 1)} / {m['tracemalloc_peak_mib']:.1f}")
        rows.append([name, *cells])
    return md_table(columns, rows)


def checks(summary: dict[str, list[dict]]) -> dict[str, bool]:
    rows = {r["name"]: r for r in summary["resnet"]}
    fp32 = rows["fp32"]["acc_ort"]
    out = {
        "resnet_int8_ptq_within_0.5pt": fp32 - rows["slimkit minmax"]["acc_ort"] <= 0.005,
        "resnet_w4a8_lsq_within_1pt": fp32 - rows["slimkit LSQ W4A8"]["acc_qat_torch"] <= 0.01,
        "pruned_zeros_stay_zero_in_int8": rows["slimkit pruned 80% + int8"]["pruned_zeros_kept"],
    }
    for family, family_rows in summary.items():
        rows = {r["name"]: r for r in family_rows}
        best = [rows[f"slimkit {o}"] for o in OBSERVERS]
        peers = [rows["ORT MinMax"], rows["ORT Entropy"]]
        out[f"{family}_best_fidelity_ge_best_peer"] = max(r["agreement"] for r in best) >= max(
            r["agreement"] for r in peers
        ) and min(r["kl"] for r in best) <= min(r["kl"] for r in peers)
        # minmax qparams equal the peer's up to one float32 ulp of each scale (ORT computes them
        # in float32): a strict KL comparison is a coin flip, so KL gets a 5% tolerance
        ours, peer = rows["slimkit minmax"], rows["ORT MinMax"]
        out[f"{family}_minmax_agreement_ge_peer"] = ours["agreement"] >= peer["agreement"]
        out[f"{family}_minmax_kl_within_5pct_of_peer"] = ours["kl"] <= 1.05 * peer["kl"]
        ours, peer = rows["slimkit entropy"], rows["ORT Entropy"]
        out[f"{family}_entropy_fidelity_ge_peer"] = (
            ours["agreement"] >= peer["agreement"] and ours["kl"] <= peer["kl"]
        )
        for batch in (1, 64):
            lat = rows["slimkit minmax"]["latency"][batch]
            out[f"{family}_int8_b{batch}_vs_peer_le_1.05"] = lat["vs_peer"] <= 1.05
            out[f"{family}_int8_b{batch}_faster_than_fp32"] = lat["vs_fp32"] < 1.0
    return out


def render(args, summary, memory, checked, payload) -> str:
    isa = payload["env"]["cpu"]["isa"]
    flags = ", ".join(k for k, v in isa.items() if v)
    head = (
        f"Seeds {args.seeds} (accuracy and fidelity are means; latency from seed "
        f"{args.seeds[0]}'s models, {args.rounds} interleaved rounds, 1 ORT thread); "
        f"{args.calibration_batches} calibration batches of 64 train images, the same for slimkit "
        f"and the peer. CPU: {payload['env']['cpu']['model_name']} ({flags}); ONNX Runtime "
        f"{payload['env']['cpu']['onnxruntime']}. **Measured** here: accuracies (test set, "
        "ORT int8 unless named), agreement/KL vs the fp32 model on val+test (540 images), the "
        "ORT vs fake-quant gap (max |diff| in output quantization steps, worst seed), sizes, "
        "kernel counts after ORT optimisation and latency ratios (`x peer`: vs ORT MinMax, "
        "entropy vs ORT Entropy). `agree*`/`KL*`: vs the float model the variant quantizes (the "
        "pruned model; the QAT model's torch fake-quant outputs) where that is not the fp32 "
        "baseline. QAT rows: `finalize` bakes the fake-quantized weights and keeps float "
        "activations, so the ORT int8 model is that model after slimkit 8-bit static PTQ "
        "(calibration re-derives activation ranges; W4 weights land on the int8 grid); their "
        "fake-quant column is the QAT model's own torch accuracy. Int8 kernels are QLinearConv + "
        "QGemm; float kernels Conv/FusedConv/Gemm/MatMul."
    )
    study_note = (
        "Non-VNNI study (minmax ranges). The AVX2 columns are **emulated** "
        "(`slimkit.quant.saturation`: u8 x s8 products summed in adjacent pairs into a "
        "saturating int16, K laid out (kh, kw, c) as ORT's NHWC QLinearConv; depthwise convs run "
        "MLAS's int32 kernel and never saturate); the VNNI and latency columns are **measured** "
        "on this machine. `a7w8` = `reduce_range=True` (7-bit activations: a Clip op after every "
        "QuantizeLinear); `a8w7` = `reduce_weight_range_` (7-bit weights, no graph change), on "
        "every u8s8 layer or only on the layers whose pairs saturate on the calibration batches."
    )
    text = [head, ""]
    for family in summary:
        text += [main_table(summary[family], family), ""]
    text += [study_note, ""]
    for family in summary:
        text += [study_table(summary[family], family), ""]
    text += [
        "Calibration peak memory (ResNet, calibration alone: slimkit `calibrate` vs ORT's "
        "`create_calibrator` + `collect_data` + `compute_data`), each in a fresh process after a "
        "1-batch warm-up: resident high-water growth / tracemalloc peak (Python and numpy "
        "allocations only), MiB.",
        "",
        memory_table(memory) if memory else "-",
        "",
        "Checks: " + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in checked.items()),
        "",
        f"Reproduce: `.venv/bin/python -m benchmarks.quant_digits {' '.join(sys.argv[1:])}`",
    ]
    return "\n".join(text)
