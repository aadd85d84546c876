"""Issue 16: SAE training throughput and peak memory of olmo_iv against SAELens's trainer and sparsify, and the
cost of harvesting activations at layer L.

One set of cached activations (a random OLMo-2 of the `small` shape: 16 layers, d = 512, the real vocabulary;
`blocks.3.hook_resid_post` over random token windows) feeds every side. Each side trains the same TopK SAE (d_in
512, 8x expansion = 4096 latents, k 32, AuxK on, Adam, 4096-token batches) with its own code, in its own process,
at one torch thread:

- olmo_iv: `olmo_iv.sae.train.train_sae` on a TensorStream.
- SAELens: `sae_lens.training.sae_trainer.SAETrainer.fit()` with a `TopKTrainingSAE`, the activations as its
  data provider.
- sparsify: its `SparseCoder` forward (fused encoder, FVU + AuxK loss), `remove_gradient_parallel_to_decoder_
  directions`, Adam, `set_decoder_norm_to_unit_norm`: the body of its Trainer's step, whose outer loop needs a
  model and a dataset. On CPU its eager decoder is used (its Triton one needs a GPU).

Each worker warms up for 2 steps, then times `--steps` steps; tokens/s = steps x batch / time. Peak memory is the
process's peak RSS above the RSS before the timed steps (benchmarks/common.PeakMemory). The FVU printed is the
last step's (SAELens: on the next batch), a sanity check that each side trains, not a quality comparison: the
sides start from different initialisations.

    python benchmarks/bench_sae.py                      # CPU, 1 thread, writes benchmarks/results/sae-cpu-1t.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    RESULTS,
    SHAPES,
    PeakMemory,
    finish_worker,
    fmt_bytes,
    make_checkpoint,
    run_worker,
    save_result,
    worker_spec,
)

D_IN, EXPANSION, K, BATCH = 512, 8, 32, 4096
HOOK_LAYER = 3
AUXK_ALPHA = 1 / 32
LR = 2e-4 / (D_IN * EXPANSION / 2**14) ** 0.5  # sparsify's rule, for every side


def _acts(spec: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(spec["acts"])["acts"]


def _batches(acts: torch.Tensor):
    """An endless iterator of BATCH-token slices, reshuffled each pass (the same for every side)."""
    gen = torch.Generator().manual_seed(0)
    if acts.shape[0] < BATCH:  # a small smoke-test set: repeat it
        acts = acts.repeat((BATCH + acts.shape[0] - 1) // acts.shape[0], 1)
    while True:
        perm = torch.randperm(acts.shape[0], generator=gen)
        for i in range(0, acts.shape[0] - BATCH + 1, BATCH):
            yield acts[perm[i:i + BATCH]]


def worker_olmo_iv(spec: dict) -> dict:
    from olmo_iv.sae.data import TensorStream
    from olmo_iv.sae.train import TrainConfig, new_state, train_sae

    acts = _acts(spec)
    steps = spec["steps"]
    cfg = TrainConfig(expansion=EXPANSION, k=K, batch_size=BATCH, steps=2, lr=LR, auxk_alpha=AUXK_ALPHA,
                      dead_tokens=4 * BATCH, log_every=1, init_batches=1)  # the last report = the last step
    stream = TensorStream(acts)
    state = new_state(stream, cfg)
    train_sae(stream, cfg, state=state)  # warm-up
    cfg.steps = 2 + steps
    with PeakMemory("cpu") as mem:
        t = time.perf_counter()
        result = train_sae(stream, cfg, state=state)
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_bytes": mem.bytes, "fvu": result.final["fvu"]}


def worker_saelens(spec: dict) -> dict:
    import warnings

    from sae_lens import LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    warnings.simplefilter("ignore")
    acts = _acts(spec)
    steps = spec["steps"]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_IN * EXPANSION, k=K, aux_loss_coefficient=AUXK_ALPHA))
    batches = _batches(acts)
    cfg = SAETrainerConfig(total_training_samples=(2 + steps) * BATCH, train_batch_size_samples=BATCH, lr=LR, lr_end=LR,
                           device="cpu", logger=LoggingConfig(log_to_wandb=False), dead_feature_window=4,
                           feature_sampling_window=1000, n_checkpoints=0)
    trainer = SAETrainer(cfg, sae, batches)
    for _ in range(2):  # warm-up, through the trainer's own step
        trainer.step(next(batches))
        trainer.n_training_steps += 1
    with PeakMemory("cpu") as mem:
        t = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - t
    x = next(batches)
    with torch.no_grad():
        recon = sae.decode(sae.encode(x))
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return {"seconds": seconds, "peak_bytes": mem.bytes, "fvu": fvu}


def worker_sparsify(spec: dict) -> dict:
    import sparsify.sparse_coder
    import sparsify.utils
    from sparsify import SparseCoder, SparseCoderConfig

    sparsify.sparse_coder.decoder_impl = sparsify.utils.eager_decode  # its Triton decoder needs a GPU
    acts = _acts(spec)
    steps = spec["steps"]
    torch.manual_seed(0)
    sae = SparseCoder(D_IN, SparseCoderConfig(expansion_factor=EXPANSION, k=K))
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    batches = _batches(acts)

    def step(x: torch.Tensor) -> float:
        dead = since_fired > 4 * BATCH
        out = sae(x, dead_mask=dead)
        loss = out.fvu + AUXK_ALPHA * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        since_fired.add_(x.shape[0])
        since_fired[out.latent_indices.flatten().unique()] = 0
        return float(out.fvu.detach())

    for _ in range(2):
        step(next(batches))
    with PeakMemory("cpu") as mem:
        t = time.perf_counter()
        for _ in range(steps):
            fvu = step(next(batches))
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_bytes": mem.bytes, "fvu": fvu}


def worker_harvest(spec: dict) -> dict:
    """Tokens/s of harvesting each layer's resid_post (olmo_iv stops after the hooked block), and of the full
    forward with logits, on the same windows."""
    import olmo_iv
    from olmo_iv.sae.data import window_activations

    model = olmo_iv.load(spec["checkpoint"]).eval()
    gen = torch.Generator().manual_seed(1)
    windows = torch.randint(0, model.config.vocab_size, (spec["windows"], spec["context"]), generator=gen).tolist()
    n_tokens = spec["windows"] * spec["context"]
    out = {"layers": {}, "tokens": n_tokens}
    window_activations(model, windows[:2], "blocks.0.hook_resid_post")  # warm-up
    for layer in spec["layers"]:
        t = time.perf_counter()
        window_activations(model, windows, f"blocks.{layer}.hook_resid_post", batch_size=8)
        out["layers"][str(layer)] = {"seconds": time.perf_counter() - t}
    # the training set every side reads: more windows at the benchmark's hook
    train_windows = torch.randint(0, model.config.vocab_size, (spec["train_windows"], spec["context"]),
                                  generator=gen).tolist()
    t = time.perf_counter()
    acts = window_activations(model, train_windows, f"blocks.{HOOK_LAYER}.hook_resid_post", batch_size=8)
    out["train_set"] = {"tokens": int(acts.shape[0]), "seconds": time.perf_counter() - t}
    from safetensors.torch import save_file

    save_file({"acts": acts.contiguous()}, spec["acts"])
    with torch.inference_mode():
        t = time.perf_counter()
        for i in range(0, len(windows), 8):
            model(torch.tensor(windows[i:i + 8]))
        out["full_forward_seconds"] = time.perf_counter() - t
    return out


WORKERS = {"olmo_iv": worker_olmo_iv, "saelens": worker_saelens, "sparsify": worker_sparsify, "harvest": worker_harvest}


def main() -> None:
    spec = worker_spec(sys.argv)
    if spec is not None:
        torch.set_num_threads(spec["threads"])
        finish_worker(spec, WORKERS[spec["method"]](spec))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed training steps per side")
    p.add_argument("--windows", type=int, default=16, help="token windows harvested per layer, for the harvest timing")
    p.add_argument("--train-windows", type=int, default=128, help="token windows harvested for the training set")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sides", default="olmo_iv,sparsify,saelens")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    shape = SHAPES["small"]
    here = Path(__file__)
    with tempfile.TemporaryDirectory(prefix="olmo_iv_sae_bench_") as tmp:
        ckpt = make_checkpoint(shape, seed=0)
        acts_path = str(Path(tmp) / "acts.safetensors")
        layers = sorted({0, 1, HOOK_LAYER, 7, shape.n_layers - 1})
        harvest = run_worker(here, {"method": "harvest", "checkpoint": str(ckpt), "windows": args.windows,
                                    "context": args.context, "layers": layers, "acts": acts_path,
                                    "train_windows": args.train_windows,
                                    "threads": args.threads})
        n = harvest["tokens"]
        print(f"harvest ({args.windows} x {args.context} tokens, small shape, {shape.n_layers} layers):")
        for layer, r in harvest["layers"].items():
            print(f"  blocks.{layer}.hook_resid_post: {n / r['seconds']:8.0f} tokens/s ({r['seconds']:.2f} s)")
        print(f"  full forward with logits: {n / harvest['full_forward_seconds']:8.0f} tokens/s")
        train = {}
        for side in args.sides.split(","):
            r = run_worker(here, {"method": side, "acts": acts_path, "steps": args.steps, "threads": args.threads})
            r["tokens_per_s"] = args.steps * BATCH / r["seconds"]
            train[side] = r
            print(f"train {side:9s}: {r['tokens_per_s']:9.0f} tokens/s  peak {fmt_bytes(r['peak_bytes'])}  "
                  f"(FVU at step {args.steps + 2}: {r['fvu']:.3f})")
    ratios = {f"olmo_iv_over_{s}": train["olmo_iv"]["tokens_per_s"] / train[s]["tokens_per_s"]
              for s in train if s != "olmo_iv" and "olmo_iv" in train}
    print("ratios:", {k: round(v, 2) for k, v in ratios.items()})
    settings = {"d_in": D_IN, "expansion": EXPANSION, "d_sae": D_IN * EXPANSION, "k": K, "batch": BATCH,
                "steps": args.steps, "lr": LR, "auxk_alpha": AUXK_ALPHA, "threads": args.threads,
                "hook": f"blocks.{HOOK_LAYER}.hook_resid_post", "shape": "small", "harvest_windows": args.windows, "train_windows": args.train_windows,
                "context": args.context}
    versions = {}
    for name in ("sae-lens", "eai-sparsify", "transformer-lens"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001  (a side that was not installed)
            pass
    out = args.out or RESULTS / f"sae-cpu-{args.threads}t.json"
    save_result(out, "sae", settings, {"harvest": harvest, "train": train, "ratios": ratios, "peers": versions}, "cpu")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
