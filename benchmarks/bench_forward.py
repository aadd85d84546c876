"""Issue 2: forward throughput and peak memory of olmo_iv's OLMo2 against transformers' Olmo2ForCausalLM.

Both read the same random checkpoint written by transformers' save_pretrained. Each (implementation, logits)
pair runs in its own process: load, one warm-up, `--repeats` timed forwards under torch.inference_mode, peak
memory of one forward above the memory in use after loading. The outputs are compared (max |logit difference|)
before any timing is reported; `--rounds` repeats the whole set of processes, and the median of all timed
forwards is reported.

    python benchmarks/bench_forward.py                                   # CPU: 1B widths, 2 layers, 4 x 128, fp32
    python benchmarks/bench_forward.py --device cuda --dtype bf16        # GPU: the real 16-layer 1B shape
"""

from __future__ import annotations

import argparse
import statistics
import sys
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
    timeit,
    worker_spec,
)

METHODS = {  # name -> (implementation, logits)
    "ours": ("ours", "full"),
    "hf": ("hf", "full"),
    "ours-last": ("ours", "last"),
    "hf-last": ("hf", "last"),
}


def worker(spec: dict) -> None:
    """One implementation in this process: returns timings, peak memory and its logits for the agreement check."""
    impl, logits = METHODS[spec["method"]]
    device, dtype = spec["device"], DTYPES[spec["dtype"]]
    torch.set_grad_enabled(False)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if impl == "ours":
        import olmo_iv

        model = olmo_iv.load(spec["checkpoint"], dtype=dtype, device=device)
        fwd = (lambda ids: model(ids)) if logits == "full" else (lambda ids: model(ids, logits_at=-1))
    else:
        model = load_hf(Path(spec["checkpoint"]), dtype, device)
        if logits == "full":
            fwd = lambda ids: model(input_ids=ids, use_cache=False).logits  # noqa: E731
        else:  # transformers' own way to skip the unembedding of all but the last position
            fwd = lambda ids: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]  # noqa: E731
    gen = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, spec["vocab_size"], (spec["batch"], spec["seq_len"]), generator=gen).to(device)
    with torch.inference_mode():
        out = fwd(ids).float().cpu()  # the warm-up, and the output compared across implementations
        with PeakMemory(device) as mem:
            fwd(ids)
        t = timeit(lambda: fwd(ids), device, warmup=0, repeats=spec["repeats"])
    finish_worker(spec, {"method": spec["method"], "timing": t, "peak_bytes": mem.bytes, "memory_method": mem.method},
                  {"logits": out})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="blocks (default: 2 on CPU, the shape's on a GPU)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per process (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="times the whole set of processes is run")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in every worker (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=None, help="allowed max |logit diff| (default 1e-4 fp32, 0.1 else)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where random checkpoints are kept")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/forward-...json)")
    args = p.parse_args()
    device, dtype = args.device, DTYPES[args.dtype]
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch")
    base = SHAPES[args.shape]
    shape = base.with_layers(args.layers or (2 if device == "cpu" else base.n_layers))
    methods = args.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        sys.exit(f"unknown methods {sorted(unknown)}: choose from {', '.join(METHODS)}")
    atol = args.atol if args.atol is not None else (1e-4 if dtype == torch.float32 else 0.1)

    ckpt = make_checkpoint(shape, seed=args.seed, dtype=dtype, device=device, cache_dir=args.cache_dir)
    if args.threads:  # the matmul probe and the recorded machine use the workers' thread count
        torch.set_num_threads(args.threads)
    print(f"machine: {machine(device)}", flush=True)
    mm = matmul_gflops(device, dtype)
    print(f"matmul throughput: {mm['gflops']} GFLOP/s ({mm['n']}x{mm['n']} {mm['dtype']})", flush=True)
    spec = dict(checkpoint=str(ckpt), device=device, dtype=args.dtype, batch=args.batch, seq_len=args.seq_len,
                vocab_size=shape.vocab_size, seed=args.seed, repeats=args.repeats, threads=args.threads)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in methods:
            print(f"round {r + 1}/{args.rounds}: {m}", flush=True)
            runs[m].append(run_worker(__file__, {**spec, "method": m}))

    # agreement: each implementation against the other, and last-position logits against the full ones
    outs = {m: runs[m][0].pop("tensors")["logits"] for m in methods}
    for rs in runs.values():
        for r in rs[1:]:
            r.pop("tensors", None)
    last = {m: (o[:, -1] if METHODS[m][1] == "full" else o) for m, o in outs.items()}
    ref = "hf" if "hf" in last else next(iter(last))
    agree = {}
    for m in methods:
        if m != ref:
            agree[f"{m} vs {ref} (last position)"] = float((last[m] - last[ref]).abs().max())
    if "ours" in outs and "hf" in outs:
        agree["ours vs hf (all positions)"] = float((outs["ours"] - outs["hf"]).abs().max())
    bad = {k: v for k, v in agree.items() if not v <= atol}

    rows = {}
    tokens = args.batch * args.seq_len
    for m in methods:
        times = [t for r in runs[m] for t in r["timing"]["runs_s"]]
        med = statistics.median(times)
        logit_positions = args.seq_len if METHODS[m][1] == "full" else 1
        flops = gemm_flops(shape, [Run(args.batch, args.seq_len, shape.n_layers, logit_positions)])
        rows[m] = {"median_s": round(med, 4), "best_s": round(min(times), 4), "runs_s": times,
                   "tokens_per_s": round(tokens / med, 1),
                   "peak_bytes": int(statistics.median(r["peak_bytes"] for r in runs[m])),
                   "gemm_gflop": round(flops / 1e9, 2), "gflops": round(flops / med / 1e9, 1),
                   "pct_of_matmul": round(100 * flops / med / 1e9 / mm["gflops"], 1)}
    _print_table(rows, agree, atol)
    settings = {**vars(args), "shape": shape_dict(shape), "checkpoint": str(ckpt), "atol": atol,
                "cache_dir": str(args.cache_dir) if args.cache_dir else None, "out": None,
                "memory_method": runs[methods[0]][0]["memory_method"], "methods": methods}
    suffix = f"-{args.threads}t" if args.threads else ""
    out = args.out or RESULTS / f"forward-{device.split(':')[0]}-{shape.name}-{args.dtype}{suffix}.json"
    save_result(out, "forward", settings, {"matmul": mm, "results": rows, "max_abs_logit_diff": agree,
                                           "agree": not bad}, device)
    print(f"wrote {out}")
    if bad:
        sys.exit(f"outputs disagree beyond {atol}: {bad}")


def _print_table(rows: dict, agree: dict, atol: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="forward: olmo_iv vs transformers")
    for col in ("method", "median s", "best s", "tokens/s", "peak memory", "GEMM GFLOP", "GFLOP/s", "% matmul"):
        t.add_column(col, justify="right" if col != "method" else "left")
    for m, r in rows.items():
        t.add_row(m, f"{r['median_s']:.3f}", f"{r['best_s']:.3f}", f"{r['tokens_per_s']:.0f}",
                  fmt_bytes(r["peak_bytes"]),
                  f"{r['gemm_gflop']:.1f}", f"{r['gflops']:.1f}", f"{r['pct_of_matmul']:.0f}")
    con = Console(width=140)
    con.print(t)
    for k, v in agree.items():
        con.print(f"max |logit diff| {k}: {v:.2e} ({'ok' if v <= atol else 'EXCEEDS ' + str(atol)})")
    for a, b in (("ours", "hf"), ("ours-last", "hf-last")):
        if a in rows and b in rows:
            con.print(f"{a} / {b} speed: {rows[b]['median_s'] / rows[a]['median_s']:.2f}x, "
                      f"memory: {rows[a]['peak_bytes'] / max(1, rows[b]['peak_bytes']):.2f}x of {b}'s")


if __name__ == "__main__":
    if (s := worker_spec(sys.argv)) is not None:
        worker(s)
    else:
        main()
