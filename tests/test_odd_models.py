"""Small architectures that break easy assumptions: no residual between parallel pairs, a
partial sum multiplied by itself, grouped-query attention fed by a row-parallel layer with bias,
a 2-d addmm bias, an unused parameter. Outputs and every gradient must match."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpar
from tests.zoo import simulated_step_alike


class Chain(nn.Module):
    """Linear layers back to back: the all-reduced output of one pair feeds the next pair."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc4(torch.relu(self.fc3(self.fc2(torch.relu(self.fc1(x))))))


class Square(nn.Module):
    """y * y of a row-parallel output: not linear in the partial sums."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        y = self.fc2(torch.relu(self.fc1(x)))
        return y * y


class GQAFromRow(nn.Module):
    """One key/value head for two ranks, the key made by a row-parallel layer with a bias."""

    def __init__(self):
        super().__init__()
        self.q, self.fc = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False)
        self.k, self.v = nn.Linear(32, 8), nn.Linear(16, 8, bias=False)
        self.o = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 8).transpose(1, 2)
        k = self.k(torch.relu(self.fc(x))).view(b, t, 1, 8).transpose(1, 2)
        v = self.v(x).view(b, t, 1, 8).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, t, 32))


class Conv1DStyle(nn.Module):
    """GPT-2's Conv1D: addmm with a (in, out) weight and a bias broadcast over rows."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 32) * 0.1), nn.Parameter(torch.randn(32) * 0.1)
        self.w2, self.b2 = nn.Parameter(torch.randn(32, 8) * 0.1), nn.Parameter(torch.randn(8) * 0.1)
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = torch.addmm(self.b1, x.view(-1, 8), self.w1).relu()
        return torch.addmm(self.b2, h, self.w2).view(x.shape)


class Einsum(nn.Module):
    """Products written as einsum: the split feature index survives into each output."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = self.up(x)
        pairs = torch.einsum("btf,bsf->btsf", h, h)
        return self.down(torch.einsum("btsf,bsf->btf", pairs, torch.relu(h)))


class GroupedScan(nn.Module):
    """A state-space-style mixer: one projection cut into channels | groups, a depthwise causal
    convolution, groups repeated for the heads, the sequence padded."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32 + 2 * 4, bias=False)  # 4 heads x 8 channels | 2 groups x 4
        self.conv = nn.Conv1d(40, 40, 3, groups=40, padding=2)
        self.out = nn.Linear(32, 16, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        h = self.conv(self.inp(x).transpose(1, 2))[..., :t].transpose(1, 2)
        chans, groups = h.split([32, 8], dim=-1)
        per_head = groups.view(b, t, 2, 4).repeat_interleave(2, dim=2)  # 2 groups -> 4 heads
        mixed = chans.view(b, t, 4, 8) * per_head.sum(-1, keepdim=True)
        mixed = F.pad(mixed, (0, 0, 0, 0, 0, 2))[:, :t]  # pad the sequence, then drop it
        return self.out(mixed.reshape(b, t, 32))


CASES = {
    "chain": (Chain, (4, 8)),
    "square": (Square, (4, 8)),
    "gqa_from_row": (GQAFromRow, (2, 4, 16)),
    "conv1d": (Conv1DStyle, (2, 4, 8)),
    "einsum": (Einsum, (2, 4, 8)),
    "grouped_scan": (GroupedScan, (2, 6, 16)),
}


def loss(out):
    return (out * torch.linspace(-1, 1, out.shape[-1])).sum()


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_gradients(name):
    cls, shape = CASES[name]
    torch.manual_seed(0)
    model, x = cls(), torch.randn(*shape)
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (x,))
    assert plan.check(x, loss_fn=loss) > 0
    simulated_step_alike(plan, model, loss, x, what=name)
    assert set(plan.full_state_dict()) == set(model.state_dict())  # unused parameters too


def _identity(x, group="tp"):
    return x


def test_check_finds_a_missing_backward_all_reduce():
    torch.manual_seed(0)
    model, x = Chain(), torch.randn(4, 8)
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), (x,))
    sums = [n for n in plan.graph_module.graph.nodes if n.meta.get("fxpar_comm") and n.meta["fxpar_comm"].kind == "copy_to_tp"]
    sums[1].target = _identity  # forward is unchanged: only gradients can tell
    plan.graph_module.recompile()
    assert plan.check(x) > 0
    with pytest.raises(fxpar.DivergenceError, match="gradient"):
        plan.check(x, loss_fn=loss)
