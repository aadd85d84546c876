"""Issue 5: the multi-layer patching grid, olmo_iv's engine against nnsight 0.8 on transformers.

Every method patches, for each sample and layer set K, the source run's block outputs at its last token into the
target run at position 0 (block l's output for every l in K) and reads the answer's logit and rank at the
target's last position. All read the same random checkpoint written by transformers' save_pretrained.

  ours            olmo_iv.interventions.patching.patch_layers: each source once, the target run, then the set tree (each set
                  starts from its parent's cached residual), rows batched across sets and samples, last-position
                  logits, ranks by counting.
  nnsight-a       nnsight on Olmo2ForCausalLM, the paper's structure: per sample one source trace (saving every
                  layer's output at -1, stopped after the last layer), then one trace per layer set writing
                  `model.model.layers[l].output[:, 0, :]` and saving `model.lm_head.output[:, -1]`. The authors'
                  code runs five traces per (sample, set) (it also re-runs the source, clean and target runs),
                  so this is a lower bound on its cost.
  nnsight-b       the same source trace, then one trace per sample with one invoke per layer set, each writing
                  the pre-saved source vectors (no barriers: the values come from outside the trace).
  nnsight-b-last  nnsight-b with logits_to_keep=1 (transformers' switch to unembed only the last position), on
                  paper the cheapest nnsight variant (on CPU it is not: transformers feeds lm_head a
                  non-contiguous slice, which runs as a batched matmul). nnsight-a and -b compute full logits,
                  the model's default.

Each method runs in its own process (`--rounds` times): one warm-up sample, then one timed run over its samples
(plus `--repeats` more) that also gives the peak memory. The results must agree with ours (answer logits within
--atol, ranks equal up to logits tied within --atol) before anything is reported. Times are per sample (nnsight-a
runs fewer samples; with --sets-a it runs the first N sets and its time is scaled to the whole grid).

    python benchmarks/bench_patching.py                                     # CPU, issue 5's shape
    python benchmarks/bench_patching.py --device cuda --shape 1b --samples 100 --methods ours,nnsight-b-last
    python benchmarks/bench_patching.py --device cuda --dtype bf16 --shape 7b --layers-size 3 --methods ours
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (
    DTYPES,
    RESULTS,
    SHAPES,
    PeakMemory,
    Run,
    finish_worker,
    fmt_bytes,
    gemm_flops,
    load_hf,
    machine,
    make_checkpoint,
    matmul_gflops,
    run_worker,
    save_result,
    shape_dict,
    sync,
    worker_spec,
)

from olmo_iv.interventions.patching import _tree, answer_rank, canonical, layer_grid

METHODS = ("ours", "nnsight-b", "nnsight-b-last", "nnsight-a")
TARGET_POS = 0


def make_samples(n: int, vocab: int, source_len: int, target_len: int, seed: int):
    """Random token ids: sources of source_len-2 .. source_len+2 tokens (distinct per sample), targets of
    target_len tokens, one answer id each. Sample i is the same in every process and for every n."""
    sources, targets, answers = [], [], []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 100003 + i)
        ls = source_len + int(torch.randint(-2, 3, (1,), generator=g))
        sources.append(torch.randint(0, vocab, (ls,), generator=g))
        targets.append(torch.randint(0, vocab, (target_len,), generator=g))
        answers.append(int(torch.randint(0, vocab, (1,), generator=g)))
    return sources, targets, answers


# ---------------------------------------------------------------------------------------------- nnsight


def nnsight_model(spec: dict):
    """nnsight's TransformersModel around the Olmo2ForCausalLM loaded from the checkpoint. The inputs are token
    ids, so the tokenizer is never used to tokenize: a one-word stand-in satisfies the text-generation pipeline."""
    import transformers
    from nnsight import TransformersModel
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    hf = load_hf(Path(spec["checkpoint"]), DTYPES[spec["dtype"]], spec["device"])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")), pad_token="<pad>")
    return TransformersModel(hf, tokenizer=tok)


def source_trace(lm, src: torch.Tensor, n_layers: int) -> list[torch.Tensor]:
    """Every layer's output at the source's last token; the run stops after the last block (no unembedding)."""
    import nnsight

    with lm.trace(src[None], use_cache=False) as tracer:
        saved = nnsight.save([lm.model.layers[layer].output[:, -1, :].clone() for layer in range(n_layers)])
        tracer.stop()
    return saved


def patched_trace(lm, tgt: torch.Tensor, saved: list[torch.Tensor], layer_set: tuple[int, ...]) -> torch.Tensor:
    """(a): one trace for one layer set; returns the last-position logits [1, V]."""
    with lm.trace(tgt[None], use_cache=False):
        for layer in layer_set:
            lm.model.layers[layer].output[:, TARGET_POS, :] = saved[layer]
        logits = lm.lm_head.output[:, -1].save()
    return logits


def patched_invokes(lm, tgt: torch.Tensor, saved: list[torch.Tensor], sets: list[tuple[int, ...]],
                    last_only: bool) -> torch.Tensor:
    """(b): one trace, one invoke per layer set; returns the last-position logits [K, V]."""
    outs: list = []
    kwargs = {"use_cache": False, **({"logits_to_keep": 1} if last_only else {})}
    with lm.trace() as tracer:
        for layer_set in sets:
            with tracer.invoke(tgt[None], **kwargs):
                for layer in layer_set:
                    lm.model.layers[layer].output[:, TARGET_POS, :] = saved[layer]
                outs.append(lm.lm_head.output[:, -1].save())
    return torch.cat(outs)


def _with_ties(logits: torch.Tensor, answers: torch.Tensor, tol: float) -> torch.Tensor:
    """[N, 4]: answer logit, rank, and the lowest / highest rank if logits within `tol` of the answer's were
    ordered either way (float noise between two implementations can reorder those, and only those)."""
    logits = logits.float()
    a, rank = answer_rank(logits, answers)
    lo = 1 + (logits > a[:, None] + tol).sum(1)
    hi = (logits > a[:, None] - tol).sum(1)
    return torch.stack([a.double(), rank.double(), lo.double(), hi.double()], 1)


def nnsight_run(lm, method: str, samples, sets, n_layers: int, tol: float) -> torch.Tensor:
    """[S, K, 4] (logit, rank, rank_lo, rank_hi) for each sample and layer set."""
    sources, targets, answers = samples
    out = []
    for src, tgt, ans in zip(sources, targets, answers):
        saved = source_trace(lm, src.to(lm.device), n_layers)
        tgt = tgt.to(lm.device)
        if method == "nnsight-a":
            logits = torch.cat([patched_trace(lm, tgt, saved, s) for s in sets])
        else:
            logits = patched_invokes(lm, tgt, saved, sets, last_only=method == "nnsight-b-last")
        out.append(_with_ties(logits, torch.full((len(sets),), ans, device=logits.device), tol).cpu())
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- workers


def worker(spec: dict) -> None:
    method, device, dtype = spec["method"], spec["device"], DTYPES[spec["dtype"]]
    torch.set_grad_enabled(False)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    n_layers = spec["n_layers"]
    sets = [tuple(s) for s in spec["sets"]]
    samples = make_samples(spec["samples"], spec["vocab_size"], spec["source_len"], spec["target_len"], spec["seed"])
    first = tuple(x[:1] for x in samples)
    if method == "ours":
        import olmo_iv
        from olmo_iv.interventions.patching import patch_layers

        model = olmo_iv.load(spec["checkpoint"], dtype=dtype, device=device)

        def run(s):
            r = patch_layers(model, *s, sets, target_pos=TARGET_POS)
            # [S, K, 3]: patched logit and rank, and the unpatched target's logit (to show that patches act)
            target = r.logit_target.double()[:, None].expand_as(r.logit_patched)
            return torch.stack([r.logit_patched.double(), r.rank_patched.double(), target], -1)
    else:
        lm = nnsight_model(spec)

        def run(s):
            return nnsight_run(lm, method, s, sets, n_layers, spec["atol"])

    with torch.inference_mode():
        run(first)  # warm-up: allocator, kernels, and nnsight's first compile of each trace body
        times, peaks, results = [], [], []
        for _ in range(1 + spec["repeats"]):
            with PeakMemory(device) as mem:  # reading the peak costs microseconds: every run is timed
                sync(device)
                t0 = time.perf_counter()
                results.append(run(samples))
                sync(device)
                times.append(time.perf_counter() - t0)
            peaks.append(mem.bytes)
            result, peak = results[0], max(peaks)
    finish_worker(spec, {"method": method, "runs_s": times, "peak_bytes": peak, "memory_method": mem.method,
                         "samples": spec["samples"], "sets": len(sets)}, {"result": result})


# ---------------------------------------------------------------------------------------------- FLOPs


def flops_per_sample(method: str, shape, sets, source_lens: list[int], target_len: int, *,
                     attention: bool = True) -> float:
    """Executed GEMM FLOPs per sample, averaged over the samples' source lengths (see common.gemm_flops)."""
    L, T = shape.n_layers, target_len
    src = [Run(1, ls, L, 0) for ls in source_lens]  # every method stops the source run after the last block
    if method == "ours":
        tree = _tree(sorted({canonical(s, L) for s in sets}))
        nodes = [node for level in tree.values() for node in level]
        # the target-only run (last-position logits) and the capture run of every block's output, then each
        # set of the tree from its parent's residual after block k: blocks k+1 .. L-1 and one logit position
        runs = [Run(1, T, L, 1), Run(1, T, L, 0)] + [Run(1, T, L - 1 - node[-1], 1) for node in nodes]
    else:
        runs = [Run(len(sets), T, L, 1 if method == "nnsight-b-last" else T)]
    total = gemm_flops(shape, src, attention=attention)
    total += len(source_lens) * gemm_flops(shape, runs, attention=attention)
    return total / len(source_lens)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--shape", default="small", choices=sorted(SHAPES), help="small: issue 5's CPU shape")
    p.add_argument("--layers-size", type=int, default=2, choices=(1, 2, 3), help="the paper's grid of this size")
    p.add_argument("--samples", type=int, default=None, help="samples for ours (default 8 on CPU, 100 on a GPU)")
    p.add_argument("--samples-b", type=int, default=None, help="samples for nnsight-b* (default: 8 on CPU, 4 on a GPU)")
    p.add_argument("--samples-a", type=int, default=2, help="samples for nnsight-a (extrapolated per sample)")
    p.add_argument("--sets-a", type=int, default=None,
                   help="run nnsight-a on the first N layer sets only and extrapolate to the grid (GPU: it is slow)")
    p.add_argument("--source-len", type=int, default=10, help="source lengths vary by up to +-2 around this")
    p.add_argument("--target-len", type=int, default=8)
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)} "
                   "(default: all on CPU; ours,nnsight-b-last on a GPU)")
    p.add_argument("--repeats", type=int, default=0, help="extra timed runs per process (each process times one "
                   "run after its warm-up sample; --rounds gives more)")
    p.add_argument("--rounds", type=int, default=2, help="times the whole set of processes is run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in every worker (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=None, help="allowed |logit diff| (default 1e-4 fp32, 0.1 else)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where random checkpoints are kept")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/patching-...json)")
    args = p.parse_args()
    device, dtype = args.device, DTYPES[args.dtype]
    gpu = device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    shape = SHAPES[args.shape]
    methods = (args.methods or ("ours,nnsight-b-last" if gpu else ",".join(METHODS))).split(",")
    if unknown := set(methods) - set(METHODS):
        sys.exit(f"unknown methods {sorted(unknown)}: choose from {', '.join(METHODS)}")
    atol = args.atol if args.atol is not None else (1e-4 if dtype == torch.float32 else 0.1)
    samples_for = {"ours": args.samples or (100 if gpu else 8), "nnsight-a": args.samples_a}
    samples_for["nnsight-b"] = samples_for["nnsight-b-last"] = args.samples_b or (4 if gpu else 8)
    sets = layer_grid(shape.n_layers, args.layers_size)
    sets_for = {m: sets for m in methods}
    if "nnsight-a" in methods and args.sets_a:
        sets_for["nnsight-a"] = sets[: args.sets_a]
    sets_canon = {m: [tuple(sorted(set(s))) for s in ss] for m, ss in sets_for.items()}

    ckpt = make_checkpoint(shape, seed=args.seed, dtype=dtype, device=device, cache_dir=args.cache_dir)
    if args.threads:  # the matmul probe and the recorded machine use the workers' thread count
        torch.set_num_threads(args.threads)
    print(f"machine: {machine(device)}", flush=True)
    mm = matmul_gflops(device, dtype)
    print(f"matmul throughput: {mm['gflops']} GFLOP/s ({mm['n']}x{mm['n']} {mm['dtype']})", flush=True)
    print(f"{len(sets)} layer sets of size {args.layers_size}; samples per method: "
          + ", ".join(f"{m} {samples_for[m]}" for m in methods), flush=True)
    base = dict(checkpoint=str(ckpt), device=device, dtype=args.dtype, n_layers=shape.n_layers,
                vocab_size=shape.vocab_size, source_len=args.source_len, target_len=args.target_len,
                seed=args.seed, repeats=args.repeats, threads=args.threads, atol=atol)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in methods:
            print(f"round {r + 1}/{args.rounds}: {m} ({samples_for[m]} samples x {len(sets_for[m])} sets)", flush=True)
            spec = {**base, "method": m, "samples": samples_for[m], "sets": sets_canon[m]}
            runs[m].append(run_worker(__file__, spec))

    results = {m: runs[m][0].pop("tensors")["result"] for m in methods}
    for rs in runs.values():
        for r in rs[1:]:
            r.pop("tensors", None)
    agreement = _agreement(results, sets_for, atol)
    if "ours" in results:  # a patch that silently did nothing would leave the target's logit unchanged
        o = results["ours"]
        agreement[f"ours: patched logit moved more than {atol} from the target-only logit"] = {
            "fraction": round(float(((o[..., 0] - o[..., 2]).abs() > atol).double().mean()), 4), "ok": True}
    max_samples = max(samples_for.values())
    source_lens = [len(s) for s in make_samples(max_samples, shape.vocab_size, args.source_len, args.target_len,
                                                args.seed)[0]]
    rows = {}
    for m in methods:
        times = [round(t, 4) for r in runs[m] for t in r["runs_s"]]
        per_sample = statistics.median(times) / samples_for[m] * len(sets) / len(sets_for[m])
        flops = flops_per_sample(m, shape, sets, source_lens[: samples_for[m]], args.target_len)
        rows[m] = {"samples": samples_for[m], "sets_run": len(sets_for[m]), "n_sets": len(sets), "runs_s": times,
                   "s_per_sample": round(per_sample, 4),
                   "peak_bytes": int(statistics.median(r["peak_bytes"] for r in runs[m])),
                   "gemm_gflop_per_sample": round(flops / 1e9, 2), "gflops": round(flops / per_sample / 1e9, 1),
                   "pct_of_matmul": round(100 * flops / per_sample / 1e9 / mm["gflops"], 1)}
    if "ours" in rows:
        for r in rows.values():
            r["ours_speedup"] = round(r["s_per_sample"] / rows["ours"]["s_per_sample"], 2)
            # useful work: the FLOPs the grid needs (ours' count) per second of this method
            r["useful_gflops"] = round(rows["ours"]["gemm_gflop_per_sample"] / r["s_per_sample"], 1)
    _print_table(rows, agreement, atol, mm)
    settings = {**vars(args), "shape": shape_dict(shape), "checkpoint": str(ckpt), "atol": atol, "methods": methods,
                "samples_per_method": samples_for, "n_sets": len(sets), "target_pos": TARGET_POS, "source_pos": -1,
                "cache_dir": str(args.cache_dir) if args.cache_dir else None, "out": None,
                "memory_method": runs[methods[0]][0]["memory_method"],
                "memory_note": "peak over one run of the method's samples; ours batches samples together, "
                               "nnsight methods run one sample at a time"}
    suffix = f"-{args.threads}t" if args.threads else ""
    name = f"patching-{device.split(':')[0]}-{shape.name}-{args.layers_size}L-{args.dtype}{suffix}.json"
    out = args.out or RESULTS / name
    ok = all(a["ok"] for a in agreement.values())
    save_result(out, "patching", settings, {"matmul": mm, "results": rows, "agreement": agreement, "agree": ok}, device)
    print(f"wrote {out}")
    if not ok:
        sys.exit(f"results disagree with ours: {agreement}")


def _agreement(results: dict, sets_for: dict, atol: float) -> dict:
    """Each nnsight method against ours on their common samples and sets."""
    if "ours" not in results:
        return {}
    ours = results["ours"]
    out = {}
    for m, r in results.items():
        if m == "ours" or m.startswith("ours"):
            continue
        s, k = r.shape[0], len(sets_for[m])
        o = ours[:s, :k]
        diff = (o[..., 0] - r[..., 0]).abs()
        rank = o[..., 1]
        equal = rank == r[..., 1]
        within = (rank >= r[..., 2]) & (rank <= r[..., 3])
        out[m] = {"compared": int(diff.numel()), "max_abs_logit_diff": float(diff.max()),
                  "ranks_equal": int(equal.sum()),
                  "ranks_within_tie_window": int(within.sum()),
                  "ok": bool(diff.max() <= atol and within.all())}
    return out


def _print_table(rows: dict, agreement: dict, atol: float, mm: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"patching grid, per sample (matmul throughput {mm['gflops']} GFLOP/s)")
    cols = ("method", "samples", "s / sample", "ours faster by", "peak memory", "GEMM GFLOP / sample", "GFLOP/s",
            "% matmul", "useful GFLOP/s")
    for col in cols:
        t.add_column(col, justify="left" if col == "method" else "right")
    for m, r in rows.items():
        t.add_row(m, f"{r['samples']}" + (f" ({r['sets_run']} sets)" if r["sets_run"] != r.get("n_sets") else ""),
                  f"{r['s_per_sample']:.3f}",
                  f"{r.get('ours_speedup', float('nan')):.2f}x", fmt_bytes(r["peak_bytes"]),
                  f"{r['gemm_gflop_per_sample']:.1f}", f"{r['gflops']:.1f}", f"{r['pct_of_matmul']:.0f}",
                  f"{r.get('useful_gflops', float('nan')):.1f}")
    con = Console(width=160)
    con.print(t)
    for m, a in agreement.items():
        if "fraction" in a:
            con.print(f"{m}: {a['fraction']:.1%} of (sample, set) pairs")
            continue
        con.print(f"{m} vs ours: {a['compared']} (sample, set) pairs, max |logit diff| {a['max_abs_logit_diff']:.2e} "
                  f"(atol {atol}), ranks equal {a['ranks_equal']}, within the tie window {a['ranks_within_tie_window']}"
                  f" -> {'ok' if a['ok'] else 'DISAGREE'}")


if __name__ == "__main__":
    if (s := worker_spec(sys.argv)) is not None:
        worker(s)
    else:
        main()
