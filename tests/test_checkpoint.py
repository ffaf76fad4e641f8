import os
import pickle

import pytest

from safespot.utils.checkpoint import CheckpointError, load_checkpoint

MARKER = "safespot_malicious_marker"


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _RunsCode()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not (tmp_path / MARKER).exists()


def test_missing_and_garbage_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.ckpt")
