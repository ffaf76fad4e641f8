import numpy as np
import pytest
import torch
from scipy import stats

from safespot.utils.rng import seeded_normal, seeded_uniform, seeded_words

MASK = 2**64 - 1


def _splitmix_mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def _reference_words(seed: int, count: int, stream: int) -> list[int]:
    """SplitMix64 in plain Python integers: key = mix(seed ^ mix(stream + 1)), word j = mix(key + (j + 1) * gamma)."""
    key = _splitmix_mix((seed & MASK) ^ _splitmix_mix(stream + 1))
    return [_splitmix_mix((key + (j + 1) * 0x9E3779B97F4A7C15) & MASK) for j in range(count)]


@pytest.mark.parametrize("stream", [0, 3])
def test_seeded_words_match_a_plain_python_splitmix64(stream):
    seeds = [0, 1, 12345, 2**40 + 7, 2**63 + 5, 2**64 - 1]
    words = seeded_words(seeds, 9, stream=stream)
    got = [[w % 2**64 for w in row] for row in words.tolist()]
    assert got == [_reference_words(s, 9, stream) for s in seeds]


def test_seeded_uniform_is_uniform_and_streams_differ():
    u = seeded_uniform(torch.arange(200), 500).flatten().numpy()
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    v = seeded_uniform(torch.arange(200), 500, stream=1).flatten().numpy()
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.01
    assert seeded_uniform(torch.arange(4), 8, dtype=torch.float64).dtype == torch.float64


def test_seeded_normal_is_standard_normal_and_prefix_stable():
    z = seeded_normal(torch.arange(100), 1000)
    assert stats.kstest(z.flatten().numpy(), "norm").pvalue > 1e-3
    # neighbouring seeds are uncorrelated, and a longer stream extends a shorter one
    assert abs(np.corrcoef(z[0].numpy(), z[1].numpy())[0, 1]) < 0.15
    assert torch.equal(seeded_normal(torch.arange(100), 10), z[:, :10])


def test_named_streams_are_batch_independent_and_never_collide():
    """One seed-stream API: per-image seeds by mixing (run seed, dataset index), derived per
    named purpose and counters; no two purposes or counters share seeds, and a batch's seeds
    are those of its images alone."""
    from safespot.utils.rng import PURPOSES, derive, host_seed, image_seeds, streams

    index = torch.arange(64)
    base = image_seeds(0, index)
    assert torch.equal(image_seeds(0, index[10:20]), base[10:20]) and base.unique().numel() == 64
    assert not torch.equal(image_seeds(1, index), base)
    derived = {(p, c): derive(base, p, c) for p in PURPOSES for c in (0, 1)}
    everything = torch.cat([base, *derived.values()])
    assert everything.unique().numel() == everything.numel()  # no collision between purposes/counters
    per_row = derive(base, "outer_iteration", torch.full((64,), 3))
    assert torch.equal(per_row, derive(base, "outer_iteration", 3))
    assert torch.equal(streams(0, index[5:9], "restart", 2), derive(base[5:9], "restart", 2))
    seeds = {host_seed(7, p, e) for p in PURPOSES for e in range(3)}
    assert len(seeds) == 3 * len(PURPOSES) and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="purpose"):
        derive(base, "nonsense")


def test_no_seed_stride_constants_outside_rng():
    """Seeds are derived through safespot.utils.rng only: no hand-picked stride constants."""
    import re
    from pathlib import Path

    import safespot

    package = Path(safespot.__file__).parent
    stride = re.compile(r"^_?[A-Z_]*(STRIDE|_SALT)\s*=", re.M)
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py") if stride.search(p.read_text())]
    assert offenders == []
