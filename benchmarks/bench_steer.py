"""Issue 15: steered greedy generation, side by side in one run, on a random 16-layer d512 OLMo-2 (OLMo-2's
vocabulary):

  ours        olmo_iv.interventions.steering.generate_steered: batched, left-padded, KV cache preallocated for the
              whole generation; the hook edits the prompt during prefill and each new token after it; logits of
              the last position only
  authors     the authors' procedure (olmo_iv.reference.stolfo_generate(all_logits=True)): one prompt at a time,
              the whole sequence re-run for every new token with the hook on every position, and the logits of
              every position, as TransformerLens's forward returns them to their loop
  recompute   a generous version of it: the whole sequence re-run for every new token, but batched, left-padded
              and with the last position's logits only (generate_steered(use_cache=False))
  hf          transformers' Olmo2ForCausalLM.generate with a forward hook on the layer (same cache, same outputs)

All add c·u at one layer's resid_post at every position and must return the same tokens; the script checks that on
the very runs it times and reports the count of equal rows beside every time. The recomputations grow with the
square of the length; `--recompute-tokens N` runs them for N new tokens only (the ratio is then reported at N, beside
ours at N, never extrapolated), `--recompute-repeats` sets their rounds (default 1: about 40 minutes for both at the
full 128 tokens on one CPU thread).

    python benchmarks/bench_steer.py --recompute-tokens 128                # CPU, the issue's measurement
    python benchmarks/bench_steer.py --recompute-tokens 16                 # CPU, a few minutes
    python benchmarks/bench_steer.py --device cuda --recompute-tokens 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHAPES, load_hf, machine, make_checkpoint, save_result, sync  # noqa: E402

import olmo_iv  # noqa: E402
from olmo_iv.interventions.steering import Steer, generate_steered  # noqa: E402
from olmo_iv.reference import stolfo_generate  # noqa: E402


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_steered(hf, rows: list[list[int]], layer: int, u: torch.Tensor, coef: float, new_tokens: int) -> list[list[int]]:
    """transformers' generate, greedy, with a forward hook adding coef*u to the layer's output."""
    T = max(map(len, rows))
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    dev = next(hf.parameters()).device

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + coef * u.to(output[0]),) + output[1:]
        return output + coef * u.to(output)

    handle = hf.model.layers[layer].register_forward_hook(hook)
    try:
        out = hf.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    return out[:, T:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--recompute-tokens", type=int, default=32,
                    help="new tokens for the recomputing sides (default 32; the issue's measurement: 128)")
    ap.add_argument("--recompute", default="authors,recompute",
                    help="recomputing sides to run, comma-separated: authors, recompute (or none)")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--coef", type=float, default=4.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of ours and transformers")
    ap.add_argument("--recompute-repeats", type=int, default=1, help="rounds of each recomputing side")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    folder = make_checkpoint(shape, device=args.device)
    model = olmo_iv.load(folder, device=args.device)
    model.config.eos_token_id = None  # every row generates all its tokens, as min_new_tokens forces in transformers
    hf = load_hf(folder, torch.float32, args.device)
    rows = prompts(args.prompts, shape.vocab_size)
    u = torch.randn(shape.d_model, generator=torch.Generator().manual_seed(1))
    u = u / u.norm()
    spec = [Steer(layer=args.layer, vector=u, coef=args.coef)]
    n, rn = args.new_tokens, min(args.recompute_tokens, args.new_tokens)
    recompute_sides = [x for x in args.recompute.split(",") if x and x != "none"]
    if set(recompute_sides) - {"authors", "recompute"}:
        raise SystemExit(f"--recompute {args.recompute!r}: give authors, recompute or none")

    sides: dict[str, Callable[[], list[list[int]]]] = {
        "ours": lambda: generate_steered(model, rows, spec, max_new_tokens=n, batch_size=len(rows), stop_ids=()),
        "hf": lambda: hf_steered(hf, rows, args.layer, u, args.coef, n),
    }
    if rn != n:
        sides["ours_short"] = lambda: generate_steered(model, rows, spec, max_new_tokens=rn, batch_size=len(rows),
                                                       stop_ids=())
    if "authors" in recompute_sides:
        sides["authors"] = lambda: [stolfo_generate(model, r, args.layer, u, mode="add", coef=args.coef,
                                                    max_new_tokens=rn, all_logits=True) for r in rows]
    if "recompute" in recompute_sides:
        sides["recompute"] = lambda: generate_steered(model, rows, spec, max_new_tokens=rn, batch_size=len(rows),
                                                      stop_ids=(), use_cache=False)
    rounds = {k: args.recompute_repeats if k in ("authors", "recompute") else args.repeats for k in sides}
    # one warm-up call of the cached sides (allocator, thread pools); the recomputations are long enough not to need it
    with torch.inference_mode():
        sides["ours"]()
        sides["hf"]()
    # the sides alternate, round after round, so that a busy machine slows them alike; medians are reported, and the
    # tokens of each side's first timed run are checked against ours
    times: dict[str, list[float]] = {k: [] for k in sides}
    outputs: dict[str, list[list[int]]] = {}
    with torch.inference_mode():
        for r in range(max(rounds.values())):
            for name, fn in sides.items():
                if r >= rounds[name]:
                    continue
                sync(args.device)
                t0 = time.perf_counter()
                out = fn()
                sync(args.device)
                times[name].append(time.perf_counter() - t0)
                outputs.setdefault(name, out)
                print(f"round {r + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ours_at_rn = med["ours"] if rn == n else med["ours_short"]
    ref = [x[:rn] for x in outputs["ours"]]
    payload: dict = {
        "rows_equal_to_transformers": f"{sum(x == y for x, y in zip(outputs['ours'], outputs['hf']))}/{len(rows)}",
        "ours_s": med["ours"], "transformers_hook_s": med["hf"],
        "ours_vs_transformers": round(med["hf"] / med["ours"], 2),
        "tokens_per_s_ours": round(len(rows) * n / med["ours"], 1),
    }
    if rn != n:
        payload[f"ours_{rn}tok_s"] = ours_at_rn
    for name in recompute_sides:
        payload[f"rows_equal_to_{name}"] = f"{sum(x == y for x, y in zip(ref, outputs[name]))}/{len(rows)}"
        payload[f"{name}_{rn}tok_s"] = med[name]
        payload[f"ours_vs_{name}_at_{rn}tok"] = round(med[name] / ours_at_rn, 1)
    payload["runs_s"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
    payload["load_average"] = list(os.getloadavg())
    settings = {**vars(args), "out": None, "shape": args.shape}
    out = args.out or RESULTS / f"steer-{args.device}-{args.shape}-{args.threads}t.json"
    save_result(out, "steer", settings, payload, args.device)
    print(f"machine: {machine(args.device).get('cpu', args.device)}")
    for k, v in payload.items():
        print(f"{k:>32}: {v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
