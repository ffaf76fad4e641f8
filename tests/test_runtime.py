"""The runtime of ood.py (safespot.runs): the ``runtime`` block and its
aliases, the Fabric built from it, and the sharding helpers."""

import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from safespot.errors import ConfigError
from safespot.runs import (
    RUNTIME_DEFAULTS,
    build_fabric,
    describe_runtime,
    device_alias,
    leave_together,
    merge_positions,
    runtime_settings,
    shard,
)
from safespot.utils.distributed import gather_objects


def settings(**cfg):
    return runtime_settings(OmegaConf.create(cfg), "robustification")


def test_defaults_and_the_old_aliases():
    assert settings() == RUNTIME_DEFAULTS
    assert settings(runtime=dict(RUNTIME_DEFAULTS), device=None, precision=None) == RUNTIME_DEFAULTS
    assert settings(device="auto") == RUNTIME_DEFAULTS
    assert settings(device="cpu") == {**RUNTIME_DEFAULTS, "accelerator": "cpu", "devices": 1}
    assert settings(precision="bf16-mixed")["precision"] == "bf16-mixed"
    # an alias agreeing with the block, or the block at its default, is fine
    assert settings(runtime={"accelerator": "cpu"}, device="cpu")["accelerator"] == "cpu"
    assert settings(runtime={"precision": "bf16-mixed"}, precision="bf16-mixed")["precision"] == "bf16-mixed"
    assert settings(runtime={"devices": [0, 1], "strategy": "ddp_spawn"})["devices"] == [0, 1]
    assert device_alias("cuda:1") == {"accelerator": "cuda", "devices": [1]}
    assert device_alias("gpu") == {"accelerator": "cuda", "devices": 1}
    assert device_alias("mps") == {"accelerator": "mps", "devices": 1}


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"device": "cpu", "runtime": {"accelerator": "mps"}}, "device=cpu contradicts runtime.accelerator=mps"),
        ({"precision": "bf16-mixed", "runtime": {"precision": "32"}}, "precision=bf16-mixed contradicts"),
        ({"runtime": {"precision": "16-mixed"}}, "runtime.precision=16-mixed is not supported for robustification"),
        ({"precision": "16-mixed"}, r"^precision=16-mixed is not supported"),
        ({"runtime": {"precision": "bf16-true"}}, r"runtime.precision must be one of"),
        ({"precision": "fp8"}, r"^precision must be one of"),
        ({"runtime": {"strategy": "fsdp"}}, "runtime.strategy must be auto or a DDP strategy"),
        ({"runtime": {"device": "cpu"}}, r"runtime has no setting\(s\) \['device'\]"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda, cuda:N or mps"),
        ({"device": "nonsense"}, "device must be auto, cpu, cuda, cuda:N or mps"),
    ],
)
def test_bad_runtime_settings_are_refused_with_the_setting(cfg, message):
    with pytest.raises(ConfigError, match=message):
        runtime_settings(OmegaConf.create(cfg), "robustification")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_names_the_setting():
    with pytest.raises(ConfigError, match=r"device=cuda:1 but CUDA is not available"):
        settings(device="cuda:1")
    with pytest.raises(ConfigError, match=r"runtime.accelerator=gpu but CUDA is not available"):
        settings(runtime={"accelerator": "gpu"})


def test_the_fabric_follows_the_block_and_refusals_name_it():
    fabric = build_fabric(OmegaConf.create({"runtime": {"accelerator": "cpu", "precision": "bf16-mixed"}}), "ood")
    assert fabric.world_size == 1 and fabric.device == torch.device("cpu")
    assert describe_runtime(fabric) == {
        "device": "cpu",
        "world_size": 1,
        "strategy": "SingleDeviceStrategy",
        "precision": "bf16-mixed",
    }
    two = {"runtime": {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}}
    spawn = build_fabric(OmegaConf.create(two), "x")
    assert spawn.world_size == 2  # nothing launched yet
    with pytest.raises(ConfigError, match=r"^runtime \(.*runtime.devices=0.*\): "):
        build_fabric(OmegaConf.create({"runtime": {"accelerator": "cpu", "devices": 0}}), "x")


class _Rank:
    """What :func:`shard` reads of a Fabric."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.global_rank, self.world_size = rank, world_size


def test_shards_cover_every_position_once_and_merge_back_in_order():
    n, world = 7, 3
    shards = [list(shard(n, _Rank(r, world))) for r in range(world)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    gathered = [[(i, f"item{i}") for i in part] for part in shards]
    assert merge_positions(gathered, n) == [f"item{i}" for i in range(n)]
    assert list(shard(2, _Rank(2, 3))) == []  # more processes than items: an empty share
    with pytest.raises(RuntimeError, match="two processes"):
        merge_positions([[(0, "a")], [(0, "b")]], 1)
    with pytest.raises(RuntimeError, match="no process"):
        merge_positions([[(0, "a")]], 2)
    assert gather_objects({"a": 1}) == [{"a": 1}]  # no process group: this process's object


def test_ood_composes_the_runtime_group(make_cfg):
    cfg = make_cfg("ckpt_path=x.ckpt", name="ood")
    assert dict(cfg.runtime) == RUNTIME_DEFAULTS and cfg.device is None and cfg.precision is None
    sim = make_cfg("ckpt_path=x.ckpt", "runtime=ddp_sim", name="ood")
    assert (sim.runtime.accelerator, sim.runtime.devices, sim.runtime.strategy) == ("cpu", 2, "ddp_spawn")


def _slow_writer(fabric, out: Path) -> str:
    """Rank 0 writes its file late; every rank then leaves together and records what it saw."""
    if fabric.is_global_zero:
        time.sleep(1.0)
        (out / "report.csv").write_text("done")
    leave_together(fabric, "test: report written")
    seen = (out / "report.csv").is_file() and not torch.distributed.is_initialized()
    (out / f"rank{fabric.global_rank}.txt").write_text(str(seen))
    return "ok"


def test_no_process_leaves_before_rank_zero_has_written_and_each_leaves_the_group(tmp_path):
    two = {"runtime": {"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}}
    fabric = build_fabric(OmegaConf.create(two), "x")
    assert fabric.launch(_slow_writer, tmp_path) == "ok"
    # rank 1 returned only after rank 0's file existed, and neither process kept its process group
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["True", "True"]
    leave_together(build_fabric(OmegaConf.create({"runtime": {"accelerator": "cpu"}}), "x"), "one process: no-op")
