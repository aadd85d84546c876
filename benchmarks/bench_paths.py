"""Issue 7: path tracing, olmo_iv.analysis.paths.trace (DP counts, pruned prefix-trie frontier, fused step op, readout by
counting) against the direct per-path implementation (olmo_iv.reference.trace_direct: enumerate every path, multiply
the per-layer maps out head by head for each path, read out with a full argsort, as the reference does).

CPU (default): a small random model and the toy model when olmo_iv/models/toy exists. Both methods trace the
same source tokens (the longest suffix of positions with at most --direct-paths paths) keeping every path; the
paths, their order, ranks and logits must agree before anything is reported. The fast method is also timed alone on a bigger suffix
(--fast-paths), and split into path values and readout.

CUDA (--device cuda): an OLMo-2-1B-shaped random model (16 layers, d=2048, 20 tokens) traced with the Triton
kernels and with the plain-torch ops (each in its own process), and a 7B-shaped model's peak memory and time.
Random weights give near-uniform attention, so the argmax graph is far denser than a trained model's: the traced
sources are again the longest suffix within the path budget (--gpu-paths).

    python benchmarks/bench_paths.py
    python benchmarks/bench_paths.py --device cuda
    python benchmarks/bench_paths.py --device cpu --gpu-shapes tiny   # smoke-test the CUDA section on a CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from common import (
    RESULTS,
    SHAPES,
    PeakMemory,
    Shape,
    finish_worker,
    fmt_bytes,
    machine,
    run_worker,
    save_result,
    shape_dict,
    sync,
    timeit,
    worker_spec,
)

from olmo_iv import reference as R
from olmo_iv.analysis import paths as P
from olmo_iv.model import ModelConfig, OLMo2

CPU_SHAPE = Shape("paths-small", 8, 256, 8, 1024)  # 8 layers, d=256, the real 100352-token vocabulary
ALL_SHAPES = {**SHAPES, "paths-small": CPU_SHAPE}


def random_model(shape: Shape, device: str, seed: int = 0) -> OLMo2:
    """Random OLMo-2 of this shape built directly on `device` (a 7B model fills in seconds on a GPU): matrices
    N(0, 0.02) (o_proj, down_proj scaled by 1/sqrt(2L) as init_weights does), norm weights 1 + N(0, 0.1)."""
    cfg = ModelConfig(vocab_size=shape.vocab_size, d_model=shape.d_model, n_layers=shape.n_layers,
                      n_heads=shape.n_heads, n_kv_heads=shape.n_heads, d_mlp=shape.d_mlp, rope_theta=500000.0)
    with torch.device("meta"):
        model = OLMo2(cfg)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
            else:
                p.normal_(0.0, 0.02, generator=gen)
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.mul_((2 * shape.n_layers) ** -0.5)
    return model


def suffix_sources(counts: list[int], budget: int) -> str:
    """The longest suffix 'A:' of source positions whose paths number at most `budget` (at least the last one)."""
    total, start = 0, len(counts) - 1
    for s in range(len(counts) - 1, -1, -1):
        if total + counts[s] > budget and s < len(counts) - 1:
            break
        total, start = total + counts[s], s
    return f"{start}:"


def prompt(model: OLMo2, name: str, n_tokens: int, seed: int) -> tuple[torch.Tensor, int, str]:
    """(ids, answer id, description): the first adj_comp sample for a model with a tokenizer, else random ids."""
    if model.tokenizer is not None:
        from olmo_iv import tasks

        enc = tasks.encode(tasks.samples("adjectives/adj_comp", n=1), model.tokenizer)[0]
        return torch.tensor(enc.clean_ids), enc.answer_id, f"adj_comp sample 0 ({len(enc.clean_ids)} tokens)"
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n_tokens,), generator=g)
    return ids, int(torch.randint(0, model.config.vocab_size, (1,), generator=g)), f"random ids ({n_tokens} tokens)"


def ranks_agree(model: OLMo2, obs: P.Observation, fast: P.PathResult, direct: P.PathResult, atol: float) -> bool:
    """Ranks equal, except where the path's logits hold values within atol of the answer's: fp32 rounding in a
    different summation order may then order them differently (over 100k logits, near-ties are common)."""
    sur = P.linearize(model, obs)
    for i in (fast.rank != direct.rank).nonzero().flatten().tolist():
        v = R.path_value_direct(model, obs, sur, direct.graph, direct.tokens[i].tolist(), fast.config.mode)
        z = model.lm_head.weight @ (sur.s_fin * v)
        ties = int(((z - z[direct.answer]).abs() <= atol).sum()) - 1
        if abs(int(fast.rank[i]) - int(direct.rank[i])) > ties:
            return False
    return True


def compare_cpu(model: OLMo2, label: str, args) -> dict:
    """Direct and fast on the same sources, keeping every path (threshold = vocabulary size) so that every path's
    rank and logit is compared; then fast alone on a bigger suffix at --threshold."""
    ids, answer, what = prompt(model, label, args.tokens, args.seed)
    obs = P.observe(model, ids)
    counts = P.AttnGraph(obs.argmax, obs.amax).count_paths()
    every = model.config.vocab_size
    small = P.PathConfig(mode=args.mode, threshold=every, sources=suffix_sources(counts, args.direct_paths))
    big = P.PathConfig(mode=args.mode, threshold=args.threshold, sources=suffix_sources(counts, args.fast_paths))
    t0 = time.perf_counter()
    direct = R.trace_direct(model, ids, answer, small)
    t_direct = time.perf_counter() - t0
    fast_t = timeit(lambda: P.trace(model, ids, answer, small), "cpu", warmup=1, repeats=3)
    fast = P.trace(model, ids, answer, small)
    n_small = sum(direct.total)
    agree = (len(fast.tokens) == n_small and torch.equal(fast.tokens, direct.tokens)
             and torch.allclose(fast.logit, direct.logit, atol=args.atol, rtol=0)
             and ranks_agree(model, obs, fast, direct, args.atol))
    if not agree:
        raise SystemExit(f"{label}: the fast and the direct trace disagree; not reporting timings")
    big_result = P.trace(model, ids, answer, big)
    n_big = sum(big_result.total)
    big_t = timeit(lambda: P.trace(model, ids, answer, big), "cpu", warmup=0, repeats=2)
    sur = P.linearize(model, obs)
    graph = P.AttnGraph(obs.argmax, obs.amax)
    values_t = timeit(lambda: [None for _ in P.iter_path_values(model, obs, sur, graph, big.source_positions(len(ids)),
                                                                args.mode, big.chunk)], "cpu", warmup=0, repeats=2)
    return {"model": label, "prompt": what, "mode": args.mode, "paths_per_source": counts,
            "direct": {"sources": small.sources, "paths": n_small, "seconds": round(t_direct, 4),
                       "paths_per_s": round(n_small / t_direct, 1),
                       "kept_at_threshold": int((direct.rank <= args.threshold).sum()),
                       "ranks_differing_by_near_ties": int((fast.rank != direct.rank).sum())},
            "fast_same_sources": {"seconds": round(fast_t["best_s"], 4), "paths_per_s": round(n_small / fast_t["best_s"], 1)},
            "speedup": round(t_direct / fast_t["best_s"], 1),
            "fast_big": {"sources": big.sources, "paths": n_big, "seconds": round(big_t["best_s"], 4),
                         "paths_per_s": round(n_big / big_t["best_s"], 1), "kept": len(big_result.tokens),
                         "values_only_seconds": round(values_t["best_s"], 4)}, "agree": agree}


def worker(spec: dict) -> None:
    """One GPU (or smoke-test) measurement in its own process: build, count, trace with timing and peak memory."""
    device, shape = spec["device"], ALL_SHAPES[spec["shape"]]
    from olmo_iv.kernels import TRITON_ON_CUDA

    torch.manual_seed(0)
    model = random_model(shape, device, spec["seed"])
    ids, answer, what = prompt(model, shape.name, spec["tokens"], spec["seed"])
    obs = P.observe(model, ids)
    counts = P.AttnGraph(obs.argmax, obs.amax).count_paths()
    cfg = P.PathConfig(mode=spec["mode"], threshold=spec["threshold"], sources=suffix_sources(counts, spec["budget"]),
                       chunk=spec["chunk"], readout_chunk=spec["readout_chunk"])
    warm = P.PathConfig(mode=cfg.mode, sources=f"{len(ids) - 1}:", chunk=cfg.chunk)
    P.trace(model, ids, answer, warm)  # compiles the Triton kernels / warms cuBLAS
    sync(device)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        r = P.trace(model, ids, answer, cfg)
        sync(device)
        seconds = time.perf_counter() - t0
    n = sum(r.total)
    finish_worker(spec, {"shape": shape_dict(shape), "prompt": what, "triton": TRITON_ON_CUDA, "sources": cfg.sources,
                         "paths": n, "kept": len(r.tokens), "seconds": round(seconds, 4),
                         "paths_per_s": round(n / seconds, 1), "peak_bytes": mem.bytes, "peak": fmt_bytes(mem.bytes),
                         "peak_method": mem.method, "chunk": cfg.chunk, "readout_chunk": cfg.readout_chunk,
                         "paths_per_source": counts})


def gpu_runs(args) -> list[dict]:
    rows = []
    for shape_name in args.gpu_shapes.split(","):
        for triton_on in ("1", "0") if args.device.startswith("cuda") else ("0",):
            os.environ["OLMO_IV_TRITON"] = triton_on
            spec = {"device": args.device, "shape": shape_name, "seed": args.seed, "tokens": args.tokens,
                    "mode": args.mode, "threshold": args.threshold, "budget": args.gpu_paths, "chunk": args.chunk,
                    "readout_chunk": args.readout_chunk, "method": f"{shape_name} triton={triton_on}"}
            rows.append({"shape_name": shape_name, **run_worker(Path(__file__), spec)})
    os.environ.pop("OLMO_IV_TRITON", None)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", default="reference", choices=P.MODES)
    p.add_argument("--threshold", type=int, default=100)
    p.add_argument("--tokens", type=int, default=20, help="prompt length of the random models")
    p.add_argument("--direct-paths", type=int, default=300, help="path budget of the direct-vs-fast comparison")
    p.add_argument("--fast-paths", type=int, default=5000, help="path budget of the fast-only CPU run")
    p.add_argument("--gpu-paths", type=int, default=1_000_000, help="path budget of the shaped (GPU) runs")
    p.add_argument("--gpu-shapes", default=None, help="shapes of the shaped runs (default 1b,7b on CUDA, none on CPU)")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--readout-chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores this process may use)")
    p.add_argument("--atol", type=float, default=1e-4, help="allowed |logit difference| between fast and direct")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.gpu_shapes = args.gpu_shapes if args.gpu_shapes is not None else ("1b,7b" if cuda else "")
    payload: dict = {"cpu": [], "shaped": []}
    if not cuda:
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
        payload["cpu"].append(compare_cpu(random_model(CPU_SHAPE, "cpu", args.seed), "random paths-small", args))
        toy = Path(P.__file__).parent / "models" / "toy"
        if (toy / "config.json").exists():
            import olmo_iv

            payload["cpu"].append(compare_cpu(olmo_iv.load("toy"), "toy", args))
    if args.gpu_shapes:
        payload["shaped"] = gpu_runs(args)
    for row in payload["cpu"]:
        d, f, b = row["direct"], row["fast_same_sources"], row["fast_big"]
        print(f"{row['model']:>20} | {row['prompt']} | {row['mode']}\n"
              f"{'':>20} | direct {d['paths']} paths (sources {d['sources']}): {d['seconds']:.3f} s, "
              f"{d['paths_per_s']:.0f} paths/s | fast: {f['seconds']:.4f} s, {f['paths_per_s']:.0f} paths/s | "
              f"speed-up {row['speedup']}x\n"
              f"{'':>20} | fast {b['paths']} paths (sources {b['sources']}): {b['seconds']:.3f} s, "
              f"{b['paths_per_s']:.0f} paths/s (values alone {b['values_only_seconds']:.3f} s)")
    for row in payload["shaped"]:
        print(f"{row['shape_name']:>8} triton={row['triton']}: {row['paths']} paths (sources {row['sources']}), "
              f"{row['seconds']:.3f} s, {row['paths_per_s']:.0f} paths/s, peak {row['peak']}")
    out = args.out or RESULTS / f"paths-{args.device.split(':')[0]}{f'-{args.threads}t' if args.threads else ''}.json"
    save_result(out, "paths", vars(args) | {"out": str(out)}, payload, args.device)
    print(f"machine: {machine(args.device)}\nwrote {out}")


if __name__ == "__main__":
    spec = worker_spec(sys.argv)
    if spec is not None:
        worker(spec)
    else:
        main()
