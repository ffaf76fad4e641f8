import ast
import hashlib
from pathlib import Path

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


# --- Purposes pinned by name ------------------------------------------------------------------
#: Every purpose's number: the streams of the kept records were drawn with these.
PINNED_PURPOSES = {
    "evaluation": 1,
    "restart": 2,
    "outer_iteration": 3,
    "inner_run": 4,
    "grey_box_attack": 5,
    "white_box_attack": 6,
    "reconstruction": 7,
    "rejection_attack": 8,
    "rejection_view": 9,
    "check_before": 10,
    "robustify": 11,
    "check_after": 12,
    "ood_attack": 13,
    "epoch_order": 14,
    "augmentation": 15,
    "outlier_noise": 16,
    "autoattack_vote": 17,
    "file": 18,
    "nattack": 19,
    "smoothing_draw": 20,
    "trades_start": 21,
    "validation_split": 22,
    "train_subset": 23,
    "val_subset": 24,
    "test_subset": 25,
    "outlier_validation_split": 26,
    "outlier_subset": 27,
    "outlier_pairing": 28,
    "test_outliers": 29,
    "ood_fit_subset": 30,
    "ood_tune_subset": 31,
    "ood_outlier_subset": 32,
    "ood_extra_outliers": 33,
    "ood_tune_outliers": 34,
    "synthetic_split": 35,
    "latent": 36,
    "search_start": 37,
    "soft_noise": 38,
    "noisy_noise": 39,
    "injected_noise": 40,
    "monte_carlo_noise": 41,
}


def _purposes_literal() -> ast.expr:
    """The expression assigned to ``PURPOSES`` in the source of :mod:`safespot.utils.rng`."""
    import safespot.utils.rng as rng

    for node in ast.parse(Path(rng.__file__).read_text()).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "PURPOSES":
            return node.value
    raise AssertionError("no PURPOSES in safespot/utils/rng.py")


def test_each_purpose_keeps_its_number_and_its_streams():
    """A purpose's number, hence every stream drawn for it, stays what it was (the streams are
    pinned by the digest of a few seeds of each purpose, taken in the pinned order)."""
    from safespot.utils.rng import PURPOSES, derive, host_seed

    assert {name: PURPOSES[name] for name in PINNED_PURPOSES} == PINNED_PURPOSES
    base = torch.tensor([0, 1, -5, 2**62 + 3], dtype=torch.int64)
    digest = hashlib.sha256()
    for name in sorted(PINNED_PURPOSES):
        digest.update(derive(base, name, 3).numpy().tobytes())
        digest.update(host_seed(11, name, 2).to_bytes(8, "little"))
    assert digest.hexdigest()[:16] == "c297a5d7dcdd2022"


def test_purpose_numbers_are_written_next_to_their_names_and_never_shared():
    """``PURPOSES`` is a literal mapping of names to numbers, so adding a purpose (anywhere in
    it) changes no other purpose's number; and no two purposes share a number (a stream)."""
    from safespot.utils.rng import PURPOSES

    literal = _purposes_literal()
    assert isinstance(literal, ast.Dict), "PURPOSES must map each name to its number literally"
    assert ast.literal_eval(literal) == PURPOSES
    added = ast.Dict(
        keys=[ast.Constant("added"), *literal.keys], values=[ast.Constant(max(PURPOSES.values()) + 1), *literal.values]
    )
    grown = ast.literal_eval(added)
    assert {name: grown[name] for name in PURPOSES} == PURPOSES
    numbers = list(PURPOSES.values())
    assert len(set(numbers)) == len(numbers) and all(isinstance(n, int) and n > 0 for n in numbers)
