"""Issue 15: steered greedy generation, side by side in one run, on a random 16-layer d512 OLMo-2 (OLMo-2's
vocabulary):

  ours        olmo_iv.interventions.steering.generate_steered: batched, left-padded, KV cache; the hook edits the
              prompt during prefill and each new token after it
  recompute   the authors' procedure: the whole sequence recomputed, and re-steered, for every new token
              (generate_steered(use_cache=False), which the tests show equals a per-prompt implementation)
  hf          transformers' Olmo2ForCausalLM.generate with a forward hook on the layer (same cache, same outputs)

All three add c·u at one layer's resid_post at every position and must return the same tokens; the script checks
that before it reports any time. The full recompute grows with the square of the length: on a CPU,
`--recompute-tokens` runs it on a shorter generation and the ratio is reported at that length, beside the time of
ours at the same length.

    python benchmarks/bench_steer.py                         # CPU: 32 prompts x 128 tokens (recompute: 32)
    python benchmarks/bench_steer.py --device cuda --shape 1b --recompute-tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHAPES, load_hf, machine, make_checkpoint, save_result, timeit  # noqa: E402

import olmo_iv  # noqa: E402
from olmo_iv.interventions.steering import Steer, generate_steered  # noqa: E402


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
    ap.add_argument("--recompute-tokens", type=int, default=32)
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--coef", type=float, default=4.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
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

    def ours(n: int) -> list[list[int]]:
        return generate_steered(model, rows, spec, max_new_tokens=n, batch_size=len(rows), stop_ids=())

    def recompute(n: int) -> list[list[int]]:
        return generate_steered(model, rows, spec, max_new_tokens=n, batch_size=len(rows), stop_ids=(),
                                use_cache=False)

    # correctness first: the same tokens from all three
    with torch.inference_mode():
        a = ours(args.new_tokens)
        b = hf_steered(hf, rows, args.layer, u, args.coef, args.new_tokens)
        c = recompute(args.recompute_tokens)
    same_hf = sum(x == y for x, y in zip(a, b))
    same_recompute = sum(x[: args.recompute_tokens] == y for x, y in zip(a, c))
    # the sides alternate, round after round, so that a busy machine slows them alike; medians are reported
    times: dict[str, list[float]] = {"ours": [], "hf": [], "ours_short": [], "recompute": []}
    with torch.inference_mode():
        for _ in range(args.repeats):
            times["ours"].append(timeit(lambda: ours(args.new_tokens), args.device, warmup=0, repeats=1)["median_s"])
            times["hf"].append(timeit(lambda: hf_steered(hf, rows, args.layer, u, args.coef, args.new_tokens),
                                      args.device, warmup=0, repeats=1)["median_s"])
            times["ours_short"].append(timeit(lambda: ours(args.recompute_tokens), args.device, warmup=0,
                                              repeats=1)["median_s"])
            times["recompute"].append(timeit(lambda: recompute(args.recompute_tokens), args.device, warmup=0,
                                             repeats=1)["median_s"])
    med = {k: statistics.median(v) for k, v in times.items()}
    t_ours, t_hf = {"median_s": med["ours"]}, {"median_s": med["hf"]}
    t_ours_short, t_rec = {"median_s": med["ours_short"]}, {"median_s": med["recompute"]}
    payload = {
        "rows_equal_to_transformers": f"{same_hf}/{len(rows)}",
        "rows_equal_to_recompute": f"{same_recompute}/{len(rows)}",
        "ours_s": t_ours["median_s"], "transformers_hook_s": t_hf["median_s"],
        "ours_vs_transformers": round(t_hf["median_s"] / t_ours["median_s"], 2),
        f"ours_{args.recompute_tokens}tok_s": t_ours_short["median_s"],
        f"recompute_{args.recompute_tokens}tok_s": t_rec["median_s"],
        f"ours_vs_recompute_at_{args.recompute_tokens}tok": round(t_rec["median_s"] / t_ours_short["median_s"], 1),
        "tokens_per_s_ours": round(len(rows) * args.new_tokens / t_ours["median_s"], 1),
        "runs_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "load_average": list(__import__("os").getloadavg()),
    }
    settings = {**vars(args), "out": None, "shape": args.shape}
    out = args.out or RESULTS / f"steer-{args.device}-{args.shape}-{args.threads}t.json"
    save_result(out, "steer", settings, payload, args.device)
    print(f"machine: {machine(args.device).get('cpu', args.device)}")
    for k, v in payload.items():
        print(f"{k:>32}: {v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
