"""(e) Parallel computation: LayerNorm works on one sample at a time; BatchNorm needs the
statistics of the whole batch. Three measurements:

1. Data-parallel training, 2 gloo processes on loopback under DistributedDataParallel: the
   median time per step and the collectives per step that the norm issues itself, for local
   (per-rank) BatchNorm, normlab.SyncBatchNorm and LayerNorm.
2. What local BatchNorm gives up instead: how far per-shard batch statistics (and the
   normalized outputs) drift from the global ones as one batch is split over 1..16 shards.
3. Inference: LayerNorm and RMSNorm after a Linear versus eval-mode BatchNorm folded into it.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn

import normlab
from normlab.lab import ddp_worker
from normlab.lab.rules import fmt, mean
from normlab.lab.runner import Claim, Findings, RunContext, Verdict

SHARDS = (1, 2, 4, 8, 16)
WITHIN_SEQUENCE_CORRELATION = 0.3  # share of a token's variance common to its sequence
MARGIN = 0.10  # timing ratios must exceed 1 + MARGIN to count as a cost
DRIFT_MATERIAL = 0.05  # RMS output difference (normalized units) that counts as drift
FOLD_TOLERANCE = 1e-4  # max |folded - unfolded| / max |unfolded|, float32


def _sizes(ctx: RunContext) -> dict:
    pick = ctx.profile.pick
    return {
        "ddp": {
            "batch": 8,
            "length": 16,
            "features": 32,
            "hidden": 64,
            "distinct_batches": 4,
            "warmup": pick(smoke=3, quick=10, full=10),
            "rounds": pick(smoke=4, quick=16, full=30),
            "steps_per_round": pick(smoke=4, quick=10, full=10),
            "timeout_s": 30,  # gloo init and every collective
            "deadline_s": pick(smoke=60, quick=120, full=300),  # the whole run, spawn included
        },
        "drift": {
            "sequences": pick(smoke=32, quick=64, full=128),
            "length": 16,
            "hidden": pick(smoke=32, quick=64, full=64),
        },
        "inference": {
            "batch": pick(smoke=8, quick=16, full=16),
            "length": 64,
            "width": pick(smoke=64, quick=128, full=128),
            "repeats": pick(smoke=15, quick=80, full=150),
        },
    }


# --- 2. drift of local statistics -----------------------------------------------------------


def _drift(seed: int, ctx: RunContext, sizes: dict, correlation: float) -> dict:
    """Split one global batch of (sequences, length, hidden) pre-norm activations by sequence
    into k shards; compare per-shard BatchNorm statistics and outputs with the global ones."""
    generator = ctx.seed_everything(seed)
    b, length, h = sizes["sequences"], sizes["length"], sizes["hidden"]
    dtype = torch.float64
    shared = torch.randn(b, 1, h, generator=generator, dtype=dtype)
    own = torch.randn(b, length, h, generator=generator, dtype=dtype)
    offset = torch.randn(h, generator=generator, dtype=dtype) * 3
    scale = torch.rand(h, generator=generator, dtype=dtype) * 2 + 0.5
    x = offset + scale * (math.sqrt(correlation) * shared + math.sqrt(1 - correlation) * own)
    norm = normlab.BatchNorm(h, dim=-1, affine=False, track_running_stats=False).double()
    with torch.no_grad():
        y_global = norm(x)
        mu_global = x.mean((0, 1))
        sigma_global = x.var((0, 1), unbiased=False).sqrt()
        result = {}
        for k in SHARDS:
            shards = x.chunk(k, dim=0)
            y_local = torch.cat([norm(s) for s in shards])
            mu = torch.stack([s.mean((0, 1)) for s in shards])
            sigma = torch.stack([s.var((0, 1), unbiased=False).sqrt() for s in shards])
            result[str(k)] = {
                "tokens_per_shard": b // k * length,
                "sequences_per_shard": b // k,
                "mean_drift": float(((mu - mu_global) / sigma_global).square().mean().sqrt()),
                "std_drift": float((sigma / sigma_global - 1).square().mean().sqrt()),
                "output_drift": float((y_local - y_global).square().mean().sqrt()),
            }
    return result


# --- 3. inference: folded BatchNorm versus LayerNorm / RMSNorm ------------------------------


def fold_batch_norm(linear: nn.Linear, bn: nn.Module) -> nn.Linear:
    """A Linear equal to eval-mode ``bn(linear(x))``: per output feature o,
    W'[o] = W[o] * s[o], b'[o] = (b[o] - mean[o]) * s[o] + beta[o], s = gamma / sqrt(var+eps)."""
    with torch.no_grad():
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded = nn.Linear(linear.in_features, linear.out_features)
        folded.weight.copy_(linear.weight * s[:, None])
        folded.bias.copy_((linear.bias - bn.running_mean) * s + bn.bias)
    return folded


def _time_calls(functions: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, interleaved (order rotated each repeat)."""
    names = list(functions)
    times = {name: [] for name in names}
    for name in names:  # warm-up
        functions[name](x)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            functions[name](x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _inference(seed: int, ctx: RunContext, sizes: dict) -> dict:
    generator = ctx.seed_everything(seed)
    b, length, w = sizes["batch"], sizes["length"], sizes["width"]
    linear = nn.Linear(w, w)
    bn = normlab.BatchNorm(w, dim=-1)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(w, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(w, generator=generator))
        for _ in range(5):  # training-mode passes give the running statistics
            bn(linear(torch.randn(b, length, w, generator=generator) * 2 + 1))
    bn.eval()
    folded = fold_batch_norm(linear, bn)
    ln, rms = normlab.LayerNorm(w), normlab.RMSNorm(w)
    torch_ln = nn.LayerNorm(w)  # torch's fused kernel: LN's cost without normlab's overhead
    x = torch.randn(b, length, w, generator=generator) * 2 + 1
    with torch.inference_mode():
        reference = bn(linear(x))
        fold_error = float((folded(x) - reference).abs().max() / reference.abs().max())
        functions = {
            "bn_folded": folded,
            "bn_eval_unfolded": lambda t: bn(linear(t)),
            "layer_norm": lambda t: ln(linear(t)),
            "rms_norm": lambda t: rms(linear(t)),
            "torch_layer_norm": lambda t: torch_ln(linear(t)),
        }
        medians = _time_calls(functions, x, sizes["repeats"])  # 1 thread (set in run)
    return {
        "fold_max_rel_error": fold_error,
        "median_ms": {name: 1000 * t for name, t in medians.items()},
        "over_folded": {name: t / medians["bn_folded"] for name, t in medians.items()},
    }


# --- 1. data-parallel training --------------------------------------------------------------


def _training(ranks: list[dict], seed: int) -> dict:
    per_rank = [r[str(seed)] for r in ranks]
    out = {}
    for variant in ddp_worker.VARIANTS:
        runs = [r[variant] for r in per_rank]
        collectives = runs[0]["collectives_per_step"]
        out[variant] = {
            "median_step_ms": mean([r["median_step_ms"] for r in runs]),
            "median_step_ms_per_rank": [r["median_step_ms"] for r in runs],
            "quartiles_step_ms_rank0": runs[0]["quartiles_step_ms"],
            "timed_steps": runs[0]["timed_steps"],
            "norm_collectives_per_step": collectives,
            "norm_collectives_total": sum(collectives.values()),
            "ranks_count_alike": all(r["collectives_per_step"] == collectives for r in runs),
            "running_mean_rank_max_diff": runs[0]["running_mean_rank_max_diff"],
        }
    step = {v: out[v]["median_step_ms"] for v in ddp_worker.VARIANTS}
    out["ratios"] = {
        "sync_over_ln": step["bn_sync"] / step["layer_norm"],
        "sync_over_local": step["bn_sync"] / step["bn_local"],
        "local_over_ln": step["bn_local"] / step["layer_norm"],
    }
    return out


def _figure(ctx: RunContext, numbers: dict) -> None:
    import matplotlib.pyplot as plt

    seeds = list(numbers["seeds"])
    per_seed = numbers["seeds"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))

    ax = axes[0]
    labels = {"bn_local": "local BN", "bn_sync": "SyncBN", "layer_norm": "LayerNorm"}
    for i, variant in enumerate(ddp_worker.VARIANTS):
        ratios = [
            per_seed[s]["train"][variant]["median_step_ms"]
            / per_seed[s]["train"]["layer_norm"]["median_step_ms"]
            for s in seeds
        ]
        ax.bar(i, mean(ratios), color=("#d08c2c", "#b3261e", "#2a6fb0")[i], alpha=0.8)
        ax.scatter([i] * len(ratios), ratios, color="black", s=12, zorder=3)
        collectives = per_seed[seeds[0]]["train"][variant]["norm_collectives_total"]
        ax.text(i, mean(ratios), f"{collectives:g} coll./step", ha="center", va="bottom")
    ax.axhline(1 + MARGIN, color="grey", ls=":", lw=1)
    ax.set_xticks(range(3), [labels[v] for v in ddp_worker.VARIANTS])
    ax.set_ylabel("median step time / LayerNorm's")
    ax.set_title("2 gloo ranks, DDP: training step\n(norm's own collectives per step)", fontsize=9)

    ax = axes[1]
    for kind, style in (("iid", "-"), ("correlated", "--")):
        for metric, colour in (("output_drift", "#b3261e"), ("mean_drift", "#2a6fb0")):
            values = [
                mean([per_seed[s]["drift"][kind][str(k)][metric] for s in seeds]) for k in SHARDS
            ]
            ax.plot(SHARDS, values, style, color=colour, marker="o", label=f"{metric} ({kind})")
    ax.axhline(DRIFT_MATERIAL, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(SHARDS, [str(k) for k in SHARDS])
    ax.set_xlabel("shards (one batch split by sequence)")
    ax.set_ylabel("RMS difference (global-std units)")
    ax.set_title("Unsynchronized BN: per-shard vs global statistics", fontsize=9)
    ax.legend(fontsize=7)

    ax = axes[2]
    names = ("bn_folded", "bn_eval_unfolded", "rms_norm", "layer_norm", "torch_layer_norm")
    for i, name in enumerate(names):
        ratios = [per_seed[s]["inference"]["over_folded"][name] for s in seeds]
        colour = ("#1b7f3b", "#d08c2c", "#7a4fb0", "#2a6fb0", "#6fa0d0")[i]
        ax.bar(i, mean(ratios), color=colour, alpha=0.8)
        ax.scatter([i] * len(ratios), ratios, color="black", s=12, zorder=3)
    ax.axhline(1 + MARGIN, color="grey", ls=":", lw=1)
    ax.set_xticks(
        range(len(names)),
        [
            "Linear+BN\nfolded",
            "Linear+BN\n(eval)",
            "+normlab\nRMSNorm",
            "+normlab\nLayerNorm",
            "+torch.nn\nLayerNorm",
        ],
        fontsize=8,
    )
    ax.set_ylabel("median time / folded BN's")
    ax.set_title("Inference (1 thread): Linear + norm, time / folded", fontsize=9)
    fig.suptitle("(e) Parallelism: what BatchNorm's batch statistics cost", fontsize=10)
    fig.tight_layout()
    ctx.figure("parallelism", fig)


def run(ctx: RunContext) -> Findings:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops and timings: one thread, steadier on a shared machine
    try:
        return _run(ctx)
    finally:
        torch.set_num_threads(threads)


def _run(ctx: RunContext) -> Findings:
    sizes = _sizes(ctx)
    config = {**sizes["ddp"], "seeds": ctx.seeds}
    ctx.progress("spawning 2 gloo ranks")
    start = time.perf_counter()
    collect = ddp_worker.launch(config, world_size=2, deadline_s=config["deadline_s"])
    # While the ranks import torch: the drift simulation (no timing involved).
    drift = {
        str(seed): {
            "iid": _drift(seed, ctx, sizes["drift"], 0.0),
            "correlated": _drift(seed, ctx, sizes["drift"], WITHIN_SEQUENCE_CORRELATION),
        }
        for seed in ctx.track(ctx.seeds, "shard drift, seed")
    }
    ctx.progress("data-parallel training on 2 ranks")
    ranks = collect()
    ddp_seconds = time.perf_counter() - start
    numbers = {
        "sizes": sizes,
        "ddp_wall_seconds_incl_spawn": ddp_seconds,
        "ddp_timeline_rank0_s": ranks[0].pop("timeline"),
        "seeds": {},
    }
    ranks[1].pop("timeline")
    for seed in ctx.track(ctx.seeds, "inference timing, seed"):
        numbers["seeds"][str(seed)] = {
            "train": _training(ranks, seed),
            "drift": drift[str(seed)],
            "inference": _inference(seed, ctx, sizes["inference"]),
        }
    per_seed = numbers["seeds"].values()
    k = str(SHARDS[-1])
    numbers["aggregate"] = {
        "sync_over_ln_step": [s["train"]["ratios"]["sync_over_ln"] for s in per_seed],
        "sync_over_local_step": [s["train"]["ratios"]["sync_over_local"] for s in per_seed],
        "local_over_ln_step": [s["train"]["ratios"]["local_over_ln"] for s in per_seed],
        "collectives_per_step": {
            v: [s["train"][v]["norm_collectives_total"] for s in per_seed]
            for v in ddp_worker.VARIANTS
        },
        "output_drift_max_shards_iid": [s["drift"]["iid"][k]["output_drift"] for s in per_seed],
        "output_drift_max_shards_correlated": [
            s["drift"]["correlated"][k]["output_drift"] for s in per_seed
        ],
        "ln_over_folded_inference": [s["inference"]["over_folded"]["layer_norm"] for s in per_seed],
        "torch_ln_over_folded_inference": [
            s["inference"]["over_folded"]["torch_layer_norm"] for s in per_seed
        ],
        "rms_over_folded_inference": [s["inference"]["over_folded"]["rms_norm"] for s in per_seed],
        "bn_unfolded_over_folded_inference": [
            s["inference"]["over_folded"]["bn_eval_unfolded"] for s in per_seed
        ],
        "fold_max_rel_error": max(s["inference"]["fold_max_rel_error"] for s in per_seed),
        "running_mean_rank_diff": {
            v: max(s["train"][v]["running_mean_rank_max_diff"] for s in per_seed)
            for v in ("bn_local", "bn_sync")
        },
    }
    a = numbers["aggregate"]
    numbers["summary"] = (
        f"training step SyncBN/LN x{fmt(mean(a['sync_over_ln_step']))}, local BN/LN "
        f"x{fmt(mean(a['local_over_ln_step']))}; norm collectives/step SyncBN "
        f"{fmt(a['collectives_per_step']['bn_sync'][0])}, local BN and LN 0 (after training, "
        f"the 2 ranks' running means differ by up to "
        f"{fmt(a['running_mean_rank_diff']['bn_local'])} for local BN, "
        f"{fmt(a['running_mean_rank_diff']['bn_sync'])} for SyncBN); local-BN output "
        f"drift at {k} shards {fmt(mean(a['output_drift_max_shards_iid']))} (iid tokens), "
        f"{fmt(mean(a['output_drift_max_shards_correlated']))} (correlated); inference "
        f"LN/folded BN x{fmt(mean(a['ln_over_folded_inference']))} (torch.nn.LayerNorm "
        f"x{fmt(mean(a['torch_ln_over_folded_inference']))}), RMSNorm/folded "
        f"x{fmt(mean(a['rms_over_folded_inference']))}."
    )
    _figure(ctx, numbers)
    d, i = sizes["ddp"], sizes["inference"]
    dr = sizes["drift"]
    return Findings(
        numbers,
        (
            f"Seeds {ctx.seeds}. (1) Training: 2 processes spawned with torch.multiprocessing, "
            f"gloo on 127.0.0.1 (free port, {d['timeout_s']} s timeouts, whole run bounded by "
            f"{d['deadline_s']} s), "
            f"1 thread each, DistributedDataParallel without per-forward buffer broadcast "
            f"(forward_sync_buffers=False, so local BN stays local; DDP's default would add one "
            f"buffer broadcast per forward to both BN models). Model: Linear({d['features']}, "
            f"{d['hidden']}) -> norm -> ReLU -> Linear({d['hidden']}, {d['hidden']}) -> norm -> "
            f"ReLU -> Linear({d['hidden']}, 1) on random (batch {d['batch']} x length "
            f"{d['length']} x {d['features']}) tokens per rank, MSE, SGD; norm = normlab "
            f"BatchNorm(dim=-1) per rank, normlab.SyncBatchNorm(dim=-1), or normlab.LayerNorm. "
            f"After {d['warmup']} warm-up steps, {d['rounds']} interleaved rounds of "
            f"{d['steps_per_round']} timed steps per variant; median step time (mean of the 2 "
            f"ranks' medians); the norm's own collectives counted by wrapping "
            f"torch.distributed's public collectives in the worker (DDP's gradient all-reduce "
            f"runs in its C++ reducer, is the same for all three and is not counted). (2) "
            f"Drift: one global batch of {dr['sequences']} sequences x {dr['length']} tokens x "
            f"{dr['hidden']} features (random per-feature offset and scale; tokens iid, or "
            f"sharing {WITHIN_SEQUENCE_CORRELATION:.0%} of their variance within a sequence) "
            f"split by sequence into {list(SHARDS)} shards; per-shard vs global BN statistics "
            f"and outputs, float64, in one process. (3) Inference: Linear({i['width']}, "
            f"{i['width']}) on ({i['batch']} x {i['length']} x {i['width']}) followed by "
            f"normlab LayerNorm, torch.nn.LayerNorm (fused kernel), normlab RMSNorm, "
            f"eval-mode normlab BatchNorm, or that BatchNorm folded into the Linear "
            f"(checked to match within {FOLD_TOLERANCE}); median of {i['repeats']} interleaved "
            f"calls, 1 thread. Times are ratios on a shared 2-core machine (absolute times are "
            f"inflated); the DDP part took {ddp_seconds:.1f} s including process start. The "
            f"padding part of the claim is tested in (c)."
        ),
    )


def verdict(numbers: dict) -> Verdict:
    a = numbers["aggregate"]
    sync_ratio = min(a["sync_over_ln_step"])
    inference_ratio = min(  # the faster LayerNorm (normlab's or torch's fused kernel)
        min(a["ln_over_folded_inference"]), min(a["torch_ln_over_folded_inference"])
    )
    drift = min(a["output_drift_max_shards_iid"])
    sync_collectives = min(a["collectives_per_step"]["bn_sync"])
    others = max(
        max(a["collectives_per_step"]["bn_local"]), max(a["collectives_per_step"]["layer_norm"])
    )
    deciding = (
        f"LN / folded-BN inference time x{fmt(inference_ratio)} (min over seeds); SyncBN / LN "
        f"training step x{fmt(sync_ratio)} with {fmt(sync_collectives)} extra collectives per "
        f"step; local-BN output drift {fmt(drift)} at {SHARDS[-1]} shards"
    )
    if a["fold_max_rel_error"] > FOLD_TOLERANCE:
        return Verdict(
            "inconclusive",
            f"The folded BatchNorm does not match the unfolded one (relative error "
            f"{fmt(a['fold_max_rel_error'])}), so the inference comparison is invalid.",
            deciding,
        )
    communicates = sync_collectives >= 1 and others == 0
    sync_costs = sync_ratio >= 1 + MARGIN
    local_drifts = drift >= DRIFT_MATERIAL
    folded_is_cheaper = inference_ratio >= 1 + MARGIN
    if not communicates or not (sync_costs or local_drifts):
        return Verdict(
            "contradicted",
            f"BatchNorm's batch statistics cost nothing measurable here: SyncBN issues "
            f"{fmt(sync_collectives)} collectives per step (LN and local BN {fmt(others)}), "
            f"its step is x{fmt(sync_ratio)} LN's, and local statistics drift by {fmt(drift)}.",
            deciding,
        )
    training = (
        f"In training the claim holds: synchronized BN adds {fmt(sync_collectives)} "
        f"collectives per step (LayerNorm none) and its step takes x{fmt(sync_ratio)} "
        f"LayerNorm's (min over seeds); unsynchronized BN avoids the wait but its per-shard "
        f"statistics drift from the global ones (output RMS difference {fmt(drift)} at "
        f"{SHARDS[-1]} shards)."
    )
    if sync_costs and local_drifts and not folded_is_cheaper:
        return Verdict(
            "supported",
            training + f" At inference LN costs x{fmt(inference_ratio)} folded BN, within "
            f"the {MARGIN:.0%} margin.",
            deciding,
        )
    return Verdict(
        "partly supported",
        training
        + (
            f" At inference the claim fails: eval-mode BN uses running statistics, needs no "
            f"batch and folds into the preceding Linear, so it costs nothing, while LayerNorm "
            f"costs x{fmt(inference_ratio)} the folded layer (min over seeds)."
            if folded_is_cheaper
            else " Only one of the two training costs (sync time, local drift) exceeded its "
            "threshold."
        ),
        deciding,
    )


CLAIM = Claim(
    letter="e",
    key="parallelism",
    title="Parallelism: cross-sample statistics and communication",
    article="LN works on one sample at a time; BN must wait for the whole batch and compute "
    "statistics across it, which limits parallelism, more so with padded sequences.",
    rule=f"Written before the results. Inconclusive if the folded BN differs from eval BN by "
    f"more than {FOLD_TOLERANCE} (relative). Contradicted if SyncBN issues no collective per "
    f"step of its own (or LN / local BN issue any), or if neither training cost shows: SyncBN's "
    f"median step time is below {1 + MARGIN:g} x LN's in some seed AND local BN's output "
    f"differs from global-statistics BN by less than {DRIFT_MATERIAL} RMS at {SHARDS[-1]} "
    f"shards in some seed (iid tokens). Supported if both training costs show (SyncBN/LN "
    f">= {1 + MARGIN:g} in every seed and drift >= {DRIFT_MATERIAL} in every seed) and "
    f"folded BN is not cheaper at inference (LN/folded-BN time < {1 + MARGIN:g} in some "
    f"seed, LN being the faster of normlab.LayerNorm and torch.nn.LayerNorm). Otherwise "
    f"partly supported: the cost is real in training, but at inference "
    f"eval-mode BN folds into the preceding Linear and LN costs >= {1 + MARGIN:g} x as much "
    f"in every seed (or only one training cost shows). All times are ratios of medians.",
    literature="Ioffe & Szegedy 2015 (BN; inference uses population statistics, an affine map); "
    "Goyal et al. 2017 (Accurate, Large Minibatch SGD: BN statistics per worker, not "
    "synchronized); Peng et al. 2018 (MegDet: cross-GPU synchronized BN for small per-GPU "
    "batches); Wu & He 2018 (GroupNorm, motivated by small per-device batches); Jacob et al. "
    "2018 (folding BN into the preceding layer for inference); Ba, Kiros & Hinton 2016 (LN: "
    "per-sample statistics, same computation in training and test).",
    run=run,
    verdict=verdict,
)
