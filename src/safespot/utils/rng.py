"""Random numbers: capture and restore every generator, so that a run resumed from a checkpoint
draws the same random starts and augmentations as an uninterrupted one; and counter-based
per-image streams (:func:`seeded_uniform`, :func:`seeded_normal`) for draws that must depend on
an image's own seed only, drawn for a whole batch at once."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- Counter-based per-image streams --------------------------------------------------------
# SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014):
# element j of the stream with key k is mix(k + (j + 1) * GAMMA). Written with int64 tensor ops
# (multiplication wraps modulo 2^64; logical right shifts are masked arithmetic shifts), so a
# whole batch of per-image streams is drawn in a few vectorised operations, without a Python loop
# over images, and an image's draws depend only on its seed, never on the batch it is in.
Seeds = torch.Tensor | list[int]
Device = torch.device | str
_GAMMA = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values (as unsigned 64-bit words)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _signed64(seeds: Seeds, device: Device) -> torch.Tensor:
    if isinstance(seeds, torch.Tensor):
        return seeds.to(device=device, dtype=torch.int64).reshape(-1)
    return torch.tensor([(int(s) + 2**63) % 2**64 - 2**63 for s in seeds], dtype=torch.int64, device=device)


def seeded_words(seeds: Seeds, count: int, stream: int = 0, device: Device = "cpu") -> torch.Tensor:
    """``count`` pseudo-random 64-bit words (int64) per seed, shape ``(len(seeds), count)``.

    ``stream`` selects an independent stream for the same seeds (e.g. one per purpose).
    """
    keys = _mix64(_signed64(seeds, device) ^ _mix64(torch.tensor(stream + 1, dtype=torch.int64, device=device)))
    counter = torch.arange(1, count + 1, dtype=torch.int64, device=device) * _GAMMA
    return _mix64(keys[:, None] + counter[None, :])


def seeded_uniform(
    seeds: Seeds, count: int, stream: int = 0, device: Device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Uniform draws in [0, 1) from :func:`seeded_words` (24 random bits for float32/16, 53 for float64)."""
    bits = 53 if dtype == torch.float64 else 24
    words = _shr(seeded_words(seeds, count, stream, device), 64 - bits)
    return (words.to(torch.float64 if bits == 53 else torch.float32) * 2.0**-bits).to(dtype)


def seeded_normal(
    seeds: Seeds, count: int, stream: int = 0, device: Device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal draws by the Box-Muller transform of two 24-bit halves of each word."""
    return _box_muller(seeded_words(seeds, count, stream, device)).to(dtype)


def _box_muller(words: torch.Tensor) -> torch.Tensor:
    """One standard normal float32 per 64-bit word: the Box-Muller transform of its two top
    24-bit halves (``u1`` in (0, 1], ``u2`` in [0, 1))."""
    u1 = 1.0 - _shr(words, 40).to(torch.float32) * 2.0**-24
    u2 = (_shr(words, 16) & 0xFFFFFF).to(torch.float32) * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


def _mix64_int(z: int) -> int:
    """:func:`_mix64` of one Python integer, as a signed 64-bit value (computed on the host, so
    a stream key costs no host-to-device copy)."""
    mask = 2**64 - 1
    z &= mask
    z = ((z ^ (z >> 30)) * (_MIX1 & mask)) & mask
    z = ((z ^ (z >> 27)) * (_MIX2 & mask)) & mask
    z ^= z >> 31
    return z - 2**64 if z >= 2**63 else z


def seeded_normal_at(
    seeds: Seeds,
    start: torch.Tensor | int,
    count: int,
    stream: int = 0,
    device: Device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Elements ``start .. start + count - 1`` of the :func:`seeded_normal` streams, shape
    ``(len(seeds), count)``: row ``r`` equals ``seeded_normal(seeds, start[r] + count, stream)[r, start[r]:]``.

    ``start`` is one offset for all rows or one per row (a tensor on ``device``); drawing a
    stream in pieces this way (e.g. Monte Carlo draws split into memory-bounded chunks, or one
    piece per forward pass) gives the same numbers as drawing it at once. Seeds already on
    ``device`` and an integer ``start`` make no host-device transfer (no synchronisation), so
    this can run at every step of an attack.
    """
    keys = _mix64(_signed64(seeds, device) ^ _mix64_int(stream + 1))
    if isinstance(start, torch.Tensor):
        first = start.to(device=device, dtype=torch.int64).reshape(-1, 1)
        counter = (first + torch.arange(1, count + 1, dtype=torch.int64, device=device)[None, :]) * _GAMMA
    else:
        steps = torch.arange(int(start) + 1, int(start) + count + 1, dtype=torch.int64, device=device)
        counter = (steps * _GAMMA)[None, :]
    return _box_muller(_mix64(keys[:, None] + counter)).to(dtype)


# --- Per-image seeds ---------------------------------------------------------------------------
def image_seeds(seed: int, index: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """Per-image integer seeds (int64, on ``index``'s device) from the run seed, the dataset
    index and a salt, by SplitMix64 mixing (no strides that could collide): random starts and
    noise then depend neither on batch composition nor on the number of processes, and are made
    where the images live, so the row indices of a search on the GPU can index them."""
    z = _mix64(torch.full_like(index, _mix64_int(int(seed)), dtype=torch.int64) + (index.to(torch.int64) + 1) * _GAMMA)
    return _mix64(z + ((int(salt) + 1) * _GAMMA + 2**63) % 2**64 - 2**63)


def streams(seed: int, index: torch.Tensor, purpose: str, *counters: int | torch.Tensor) -> torch.Tensor:
    """The seeds of ``purpose`` (:data:`PURPOSES`) for the images ``index`` of a run with ``seed``:
    ``derive(image_seeds(seed, index), purpose, *counters)``."""
    return derive(image_seeds(seed, index), purpose, *counters)


# --- Named derived streams ----------------------------------------------------------------------
#: Every purpose a per-image seed is derived for, with its fixed number. ``derive(seeds, purpose,
#: *counters)`` hashes the seed with the purpose's number and the counters (SplitMix64 mixing,
#: vectorised on the seeds' device), so two purposes or two counters never share a stream, whatever
#: the values: no hand-picked stride constants that could collide. A number belongs to its name for
#: good (the kept records were drawn with these streams): a new purpose takes the next unused number,
#: and a retired one's number is not given again.
PURPOSES: dict[str, int] = {
    "evaluation": 1,  # one stream per evaluation of a run (its position)
    "restart": 2,  # PGD restarts
    "outer_iteration": 3,  # the safe-spot search's outer iterations
    "inner_run": 4,  # the search's N inner attack runs
    "grey_box_attack": 5,  # the attacks on robustified images
    "white_box_attack": 6,  # the adaptive attack, per attack and eps' fraction
    "reconstruction": 7,  # the white-box reconstruction of x_o
    "rejection_attack": 8,  # FLSS rejection: the attack ensemble
    "rejection_view": 9,  # FLSS rejection: the views' sampling
    "check_before": 10,  # robustify.py: the grey-box check on the original
    "robustify": 11,  # robustify.py: the search
    "check_after": 12,  # robustify.py: the grey-box check on the written PNG
    "ood_attack": 13,  # the safe-spot OOD score's attack
    "epoch_order": 14,  # the training order of an epoch (samplers)
    "augmentation": 15,  # in-memory data augmentation (per epoch and process)
    "outlier_noise": 16,  # the Gaussian / uniform outlier images
    "autoattack_vote": 17,  # AutoAttack's vote seeds when the caller gives none
    "file": 18,  # robustify.py: a file's seed from its content
    "nattack": 19,  # NAttack's initial mean and population draws, per iteration
    "smoothing_draw": 20,  # a noise-injected base's own noise in draw j of a smoothed vote
    "trades_start": 21,  # TRADES' KL attack: its start x + 0.001 N(0, I)
    "validation_split": 22,  # data: the training images held out for validation
    "train_subset": 23,  # data.train_subset: the training images kept
    "val_subset": 24,  # data.val_subset
    "test_subset": 25,  # data.test_subset: the test images evaluated
    "outlier_validation_split": 26,  # D_out^train: the outliers held out for validation
    "outlier_subset": 27,  # data.outlier_subset: the training outliers kept
    "outlier_pairing": 28,  # the outlier batches paired with in-distribution batches
    "test_outliers": 29,  # the data's D_out^test sources (noise images, file subsets)
    "ood_fit_subset": 30,  # ood.py: the images the detectors are fitted on
    "ood_tune_subset": 31,  # ood.py: the tuning images (in-distribution and outliers)
    "ood_outlier_subset": 32,  # ood.py: each test outlier set's subset (counter: its position)
    "ood_extra_outliers": 33,  # ood.py: outliers.<name> sources given on the command line
    "ood_tune_outliers": 34,  # ood.py: the tune_outliers source
    "synthetic_split": 35,  # synthetic data: a split's labels and noise (counter: the split)
    "latent": 36,  # FLSS: the latent draws e ~ N(0, I) of a stochastic classifier
    "search_start": 37,  # the safe-spot search's random start in B_delta(x_o)
    "soft_noise": 38,  # the soft smoothed forward's draws (counters: salt, forward pass)
    "noisy_noise": 39,  # the noisy classifier's input noise (counters: salt, forward pass)
    "injected_noise": 40,  # a noise-injected network's own noise (counters: salt, forward pass)
    "monte_carlo_noise": 41,  # a smoothed classifier's votes, PREDICT, CERTIFY (counter: the estimate)
    "attack_latent": 42,  # FLSS: the latent draws inside seeded attacks (counters: salt, forward pass)
    "attack_target": 43,  # multi-targeted attacks: the run towards each target class (counter: its rank)
    "pass_noise": 44,  # a forward pass whose images share a noise-injected network's draw (noise_per=forward)
}


def derive(seeds: torch.Tensor, purpose: str, *counters: int | torch.Tensor) -> torch.Tensor:
    """Per-image seeds for ``purpose`` (a name of :data:`PURPOSES`) and integer ``counters``
    (each an int or a per-image tensor, e.g. the outer iteration of every image), on the seeds'
    device; a function of the image's own seed only (batch- and process-independent)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}; known: {sorted(PURPOSES)}")
    z = _mix64(seeds.to(torch.int64) ^ _mix64_int(PURPOSES[purpose]))
    for counter in counters:
        if isinstance(counter, torch.Tensor):
            offset = (counter.to(device=z.device, dtype=torch.int64) + 1) * _GAMMA  # wraps modulo 2^64
        else:
            offset = ((int(counter) + 1) * _GAMMA + 2**63) % 2**64 - 2**63
        z = _mix64(z + offset)
    return z


def host_seed(seed: int, purpose: str, *counters: int) -> int:
    """One non-negative integer seed for ``purpose`` (:data:`PURPOSES`) and integer ``counters``
    of the run seed ``seed``, mixed on the host (for the seeds of ``torch.Generator``s: epoch
    orders, augmentation, synthetic outlier images)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown seed purpose {purpose!r}; known: {sorted(PURPOSES)}")
    z = _mix64_int(int(seed) ^ _mix64_int(PURPOSES[purpose]))
    for counter in counters:
        z = _mix64_int(z + (int(counter) + 1) * (_GAMMA % 2**64))
    return z % 2**63
