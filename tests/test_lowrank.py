"""LowRankLinear: construction from factors, forward, merge, parameter count, state-dict names; finding the
low-rank modules of a model."""
import pytest
import torch
from torch import nn

from lowrank_core.decompose import Factors, svd_factors
from lowrank_core.lowrank import LowRankLinear, low_rank_modules, ranks_of


def test_from_factors_forward_and_merge():
    torch.manual_seed(0)
    up, down, bias = torch.randn(12, 3), torch.randn(3, 20), torch.randn(12)
    m = LowRankLinear.from_factors(Factors(up, down, bias))
    assert (m.in_features, m.out_features, m.rank) == (20, 12, 3)
    x = torch.randn(5, 7, 20)
    torch.testing.assert_close(m(x), x @ (up @ down).T + bias)
    torch.testing.assert_close(m.merged_weight(), up @ down)
    dense = m.to_linear()
    assert isinstance(dense, nn.Linear)
    torch.testing.assert_close(dense(x), m(x), rtol=1e-5, atol=1e-5)
    assert m.num_parameters() == 3 * (20 + 12) + 12
    assert set(m.state_dict()) == {"down.weight", "up.weight", "up.bias"}
    assert "rank=3" in repr(m) and "bias=True" in repr(m)


def test_factors_are_copied_not_aliased_and_dtype_applies():
    f = Factors(torch.randn(6, 2), torch.randn(2, 4))
    m = LowRankLinear.from_factors(f, dtype=torch.bfloat16)
    assert m.up.weight.dtype == torch.bfloat16 and m.up.bias is None and m.bias is None
    with torch.no_grad():
        m.up.weight.zero_()
    assert f.up.abs().sum() > 0
    assert m.num_parameters() == 2 * (6 + 4)


def test_replaces_a_linear_at_full_rank():
    torch.manual_seed(1)
    lin = nn.Linear(16, 24)
    m = LowRankLinear.from_factors(svd_factors(lin.weight, 16, bias=lin.bias))
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), lin(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [{"rank": 0}, {"in_features": -1}, {"rank": 2.5}])
def test_bad_sizes_raise(bad):
    kw = {"in_features": 4, "out_features": 4, "rank": 2, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        LowRankLinear(**kw)


def test_factors_that_do_not_chain_raise():
    with pytest.raises(ValueError, match="do not chain"):
        LowRankLinear.from_factors(Factors(torch.randn(6, 2), torch.randn(3, 4)))


def test_low_rank_modules_and_ranks_are_found_by_their_down_and_up_linears():
    class Pair(nn.Module):   # not a LowRankLinear: a factorized export's own class has the same shape
        def __init__(self):
            super().__init__()
            self.down, self.up = nn.Linear(6, 2, bias=False), nn.Linear(2, 5)

    model = nn.Sequential(nn.Linear(6, 6), LowRankLinear(6, 6, 3), nn.Sequential(Pair()))
    found = low_rank_modules(model)
    assert list(found) == ["1", "2.0"] and found["1"] is model[1]
    assert ranks_of(model) == {"1": 3, "2.0": 2}
    assert low_rank_modules(nn.Linear(4, 4)) == {} and ranks_of(nn.Linear(4, 4)) == {}

    from lowrank_core import export
    assert export.low_rank_modules is low_rank_modules   # still importable from export
