"""Loading checkpoints safely: every checkpoint a command reads (``train.py``'s resume
``ckpt_path`` and ``init_from``, the checkpoint of ``evaluate.py``, ``robustify.py`` and
``ood.py``, a transfer attack's source, an OOD detector's own checkpoint, and the checkpoints
Lightning itself restores, through :class:`SafeCheckpointIO`) is read by :func:`read_checkpoint`
and, where it must be a checkpoint of ``train.py``, checked by :func:`load_checkpoint`.

It calls ``torch.load(weights_only=True)`` with the argument given explicitly, so that neither
an old torch default nor ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` can turn it into a full
unpickling: a checkpoint cannot execute code. Every setting it carries is stored as plain
Python types. A refused file is a :class:`CheckpointError` (a
:class:`~safespot.errors.ConfigError`: one ``error:`` line, exit status 2) naming the setting
and the reason: missing, a directory, empty, not a file ``torch.save`` wrote (or a damaged
one), holding objects that could run code, not a Lightning checkpoint of ``train.py``, or a
classifier head whose class count differs from the stored config's."""

from __future__ import annotations

import pickle
import pickletools
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch._weights_only_unpickler as weights_only_unpickler
from lightning.fabric.plugins import TorchCheckpointIO

from safespot.errors import ConfigError


class CheckpointError(ConfigError):
    """A missing, unsafe or incompatible checkpoint."""


#: what ``torch.load(weights_only=True)`` says when a pickle names a global it does not allow
_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _named(path: Path, setting: str) -> str:
    return f"{setting}={str(path)!r}"


def _reason(err: Exception) -> str:
    """A short reason from a ``torch.load`` error: its first informative line."""
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:  # the weights-only unpickler met an opcode it does not know
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    if isinstance(err, KeyError) or not text:  # a KeyError's message is a bare key
        return type(err).__name__
    return text.splitlines()[0].split(". ")[0].strip()


def _pickle_globals(data: bytes) -> list[str]:
    """The globals (``module.name``) a pickle names, read without running it
    (:func:`pickletools.genops`; ``STACK_GLOBAL`` takes the last two strings pushed or fetched
    from the memo). Raises ``ValueError`` when ``data`` holds no complete pickle."""
    names: list[str] = []
    strings: list[str] = []
    memo: dict[int, Any] = {}
    last: Any = None
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("BINGET", "LONG_BINGET", "GET"):
            last = memo.get(int(arg))
        elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = last
        elif opcode.name == "MEMOIZE":
            memo[len(memo)] = last
        else:
            last = arg
        if isinstance(last, str) and opcode.name not in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
            strings.append(last)
        if opcode.name == "GLOBAL":
            names.append(str(arg).replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(".".join(strings[-2:]))
    return names


def unsafe_globals(path: Path) -> list[str]:
    """The globals a checkpoint's pickle names beyond those ``torch.load(weights_only=True)``
    allows (objects whose loading could run code), read without loading it: of the pickle of a
    ``torch.save`` archive or of a file that is one pickle. Empty when there are none or the file
    holds no pickle that can be read."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(member) if member else b""
        else:
            data = path.read_bytes()
        names = _pickle_globals(data)
    except Exception:  # not a pickle: random bytes, text, a damaged archive
        return []
    allowed = set(getattr(weights_only_unpickler, "_get_allowed_globals", dict)())
    return sorted({name for name in names if name not in allowed})


def read_checkpoint(path: str | Path, setting: str = "ckpt_path") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, each failure a :class:`CheckpointError`
    naming ``setting`` and the reason (the safe read of :func:`load_checkpoint`, without its
    checks of the content)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{_named(path, setting)} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{_named(path, setting)} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{_named(path, setting)} is an empty file, not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = _BLOCKED_GLOBAL.search(str(err))
        unsafe = [blocked.group(1)] if blocked else unsafe_globals(path)
        if unsafe:
            raise CheckpointError(
                f"{_named(path, setting)} was refused: it holds objects other than tensors and plain "
                f"Python types ({', '.join(unsafe[:3])}), which could run code when loaded"
            ) from None
        raise _unreadable(path, setting, err) from None
    except Exception as err:  # truncated zip, text, random bytes
        raise _unreadable(path, setting, err) from None


def _unreadable(path: Path, setting: str, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{_named(path, setting)} is not a readable checkpoint: not a file torch.save wrote, "
        f"or a damaged one ({_reason(err)})"
    )


def head_classes(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The class count of a classifier's weights: the output size of the last 2-D ``weight``
    (the final linear layer of every model of :mod:`safespot.models`), ``None`` without one."""
    matrices = [
        v for k, v in state_dict.items() if k.endswith("weight") and isinstance(v, torch.Tensor) and v.dim() == 2
    ]
    return int(matrices[-1].shape[0]) if matrices else None


def check_head(checkpoint: dict[str, Any], path: Path | str, setting: str) -> None:
    """Refuse a checkpoint whose classifier head and stored ``data.num_classes`` disagree (its
    model would score labels it has no logit for)."""
    data = checkpoint["safespot_config"].get("data")
    stored = data.get("num_classes") if isinstance(data, dict) else None
    found = head_classes(net_state_dict(checkpoint))
    if stored is not None and found is not None and int(stored) != found:
        raise CheckpointError(
            f"{_named(Path(path), setting)}: its classifier head has {found} outputs but its stored config "
            f"says data.num_classes={stored}; the checkpoint is inconsistent"
        )


def load_checkpoint(path: str | Path, setting: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint at ``path``, read safely (module docstring) and checked: a Lightning
    checkpoint (``state_dict``) written by ``train.py`` (``safespot_config``) whose head fits
    its stored class count. ``setting`` names the option the path came from in errors."""
    path = Path(path)
    checkpoint = read_checkpoint(path, setting)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{_named(path, setting)} has no 'state_dict'; is it a Lightning checkpoint?")
    if not isinstance(checkpoint.get("safespot_config"), dict):
        raise CheckpointError(f"{_named(path, setting)} carries no run config; was it written by train.py?")
    check_head(checkpoint, path, setting)
    return checkpoint


#: what Lightning needs to resume a run from a checkpoint (``ModelCheckpoint(save_weights_only=True)``
#: writes none of the training state)
RESUME_KEYS = ("epoch", "global_step", "loops", "optimizer_states")


def check_resumable(checkpoint: dict[str, Any], path: str | Path, setting: str = "ckpt_path") -> None:
    """Refuse a checkpoint that holds weights but not the training state a resume restores."""
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{_named(Path(path), setting)} cannot resume a run: it lacks the training state {missing} "
            "(a weights-only checkpoint; start from its weights with init_from instead)"
        )


def check_weights_fit(net: torch.nn.Module, checkpoint: dict[str, Any], path: str | Path, setting: str) -> None:
    """Refuse a checkpoint whose network weights do not have exactly the names and shapes of
    ``net``'s (checked before any work; Lightning would fail at the first step)."""
    saved, expected = net_state_dict(checkpoint), net.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and tuple(saved[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        details = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else ""]
        details.append(f"shapes (checkpoint vs model) {shapes[:3]}" if shapes else "")
        raise CheckpointError(
            f"{_named(Path(path), setting)}: its weights do not fit the model config: "
            + ", ".join(d for d in details if d)
        )


def net_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The classifier's weights (the ``net.`` entries of the module's state dict)."""
    return {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin with every load read by :func:`read_checkpoint` (weights
    only, whatever torch's default): the restore of ``trainer.fit(ckpt_path=...)``, of
    ``trainer.test(ckpt_path=...)``, and the weights ``ddp_spawn`` hands from its workers to the
    main process (a bare state dict, hence no check of the content here; ``train.py`` checks a
    resume checkpoint with :func:`load_checkpoint` before it starts). Saving is Lightning's."""

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(path)


#: what a kept checkpoint leaves out: the state that only resuming the training needs (the
#: optimizer's momentum is as large as the weights); the weights, the hyper-parameters, the
#: epoch and the callbacks' states stay
TRAINING_STATE = ("optimizer_states", "lr_schedulers")


def keep_weights(ckpt: Path, target: Path) -> None:
    """Keep checkpoint ``ckpt`` as ``target`` without :data:`TRAINING_STATE`: a kept checkpoint is
    evaluated or fine-tuned from, never resumed."""
    state = read_checkpoint(ckpt)
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(state, dict) and any(k in state for k in TRAINING_STATE):
        torch.save({k: v for k, v in state.items() if k not in TRAINING_STATE}, target)
    else:
        shutil.copy2(ckpt, target)
