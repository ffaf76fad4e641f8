"""Speed options: autocast helper, channels-last and compiled networks compute the same function."""

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TinyNet
from safespot.utils.performance import autocast, check_precision, prepare_net
from safespot.utils.task import ConfigError


def test_autocast_runs_the_forward_pass_in_bf16_and_32_true_does_not():
    net, x = TinyNet().eval(), torch.rand(4, 3, 8, 8)
    seen = []
    net.body[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with autocast("bf16-mixed", torch.device("cpu")):
        net(x)
    with autocast("32-true", torch.device("cpu")):
        net(x)
    assert seen == [torch.bfloat16, torch.float32]
    with pytest.raises(ConfigError, match="precision"):
        check_precision("bf17")


def test_channels_last_network_computes_the_same_outputs_and_input_gradients():
    torch.manual_seed(0)
    net, x = TinyNet().eval(), torch.rand(4, 3, 8, 8, requires_grad=True)
    (g_ref,) = torch.autograd.grad(net(x).sum(), x)
    ref = net(x).detach()
    prepare_net(net, OmegaConf.create({"channels_last": True, "compile": False}))
    assert net.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    (g,) = torch.autograd.grad(net(x).sum(), x)
    assert torch.allclose(net(x), ref, atol=1e-5) and torch.allclose(g, g_ref, atol=1e-5)


def test_an_unknown_compile_mode_is_refused_before_compiling():
    net = TinyNet()
    with pytest.raises(ConfigError, match=r"perf\.compile_mode"):
        prepare_net(net, OmegaConf.create({"compile": True, "compile_mode": "fastest"}))


@pytest.mark.slow
def test_compiled_network_keeps_its_parameter_names_and_outputs():
    torch.manual_seed(0)
    net, x = TinyNet().eval(), torch.rand(4, 3, 8, 8)
    ref, names = net(x).detach(), list(net.state_dict())
    prepare_net(net, OmegaConf.create({"compile": True}))
    assert list(net.state_dict()) == names  # checkpoints written from it load anywhere
    assert torch.allclose(net(x), ref, atol=1e-5)
