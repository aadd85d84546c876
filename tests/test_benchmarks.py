"""The benchmarks measure what they claim: nnsight's patching (both structures) gives the engine's results, the
analytic GEMM FLOP counts equal torch's own count, and the peak-memory probe sees an allocation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import olmo_iv
from olmo_iv.interventions.patching import layer_grid, patch_layers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from common import SHAPES, PeakMemory, Run, gemm_flops, make_checkpoint  # noqa: E402

SHAPE = SHAPES["tiny"]  # 4 layers, d 64, vocab 300


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(SHAPE, seed=1, cache_dir=tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def ours(checkpoint):
    return olmo_iv.load(checkpoint)


def _samples(n=3):
    from bench_patching import make_samples

    return make_samples(n, SHAPE.vocab_size, source_len=6, target_len=5, seed=2)


def test_forward_flops_equal_torch_count(ours):
    ids = torch.randint(0, SHAPE.vocab_size, (3, 7))
    with FlopCounterMode(display=False) as fc:
        ours(ids)
    assert fc.get_total_flops() == gemm_flops(SHAPE, [Run(3, 7, SHAPE.n_layers, 7)], attention=False)
    with FlopCounterMode(display=False) as fc:
        ours(ids, logits_at=-1)
    assert fc.get_total_flops() == gemm_flops(SHAPE, [Run(3, 7, SHAPE.n_layers, 1)], attention=False)


def test_engine_flops_equal_torch_count(ours):
    """The benchmark's model of the engine's work (source runs, two target runs, the set tree) is exact."""
    from bench_patching import flops_per_sample

    sources, targets, answers = _samples()
    sets = layer_grid(SHAPE.n_layers, 2)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        patch_layers(ours, sources, targets, answers, sets)
    expected = 3 * flops_per_sample("ours", SHAPE, sets, [len(s) for s in sources], 5, attention=False)
    assert fc.get_total_flops() == expected


@pytest.mark.parametrize("method", ["nnsight-a", "nnsight-b", "nnsight-b-last"])
def test_nnsight_patching_equals_engine(checkpoint, ours, method):
    pytest.importorskip("nnsight", reason="nnsight is a benchmark extra: pip install -e '.[bench]'")
    from bench_patching import flops_per_sample, nnsight_model, nnsight_run

    sources, targets, answers = _samples()
    sets = [tuple(sorted(set(s))) for s in layer_grid(SHAPE.n_layers, 2)]
    lm = nnsight_model({"checkpoint": str(checkpoint), "dtype": "fp32", "device": "cpu"})
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        got = nnsight_run(lm, method, (sources, targets, answers), sets, SHAPE.n_layers, 1e-4)
    ref = patch_layers(ours, sources, targets, answers, sets)
    assert got.shape == (3, len(sets), 4)
    assert (got[..., 0] - ref.logit_patched.double()).abs().max() <= 1e-5
    assert torch.equal(got[..., 1].long(), ref.rank_patched)
    # the patches act: most sets move the answer's logit away from the unpatched target's
    assert (ref.logit_patched != ref.logit_target[:, None]).float().mean() > 0.5
    # transformers' count adds only its RoPE frequency product (a few hundred FLOPs) to the analytic one
    expected = 3 * flops_per_sample(method, SHAPE, sets, [len(s) for s in sources], 5, attention=False)
    assert expected <= fc.get_total_flops() <= expected * 1.001


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert mem.bytes >= 60 * 2**20, mem.method
