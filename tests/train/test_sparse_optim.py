"""Sparse table optimizers: only looked-up rows move, state stays small, maths is exact."""
import pytest
import torch

from train.sparse_optim import RowWiseAdagrad, SparseAdam, make_sparse_optimizer


def test_rowwise_adagrad_touches_only_given_rows_and_matches_formula():
    torch.manual_seed(0)
    table = torch.randn(1000, 16)
    before = table.clone()
    opt = RowWiseAdagrad(table, lr=0.1)
    rows = torch.tensor([3, 17, 999])
    grad = torch.randn(3, 16)
    opt.step(rows, grad)
    changed = (table != before).any(dim=1).nonzero().flatten()
    assert changed.tolist() == [3, 17, 999]
    acc = grad.pow(2).mean(dim=1)
    expected = before[rows] - 0.1 * grad / (acc.sqrt() + 1e-8).unsqueeze(1)
    torch.testing.assert_close(table[rows], expected)
    assert opt.sum_sq[rows].tolist() == pytest.approx(acc.tolist())
    assert opt.sum_sq.count_nonzero() == 3


def test_rowwise_adagrad_state_is_one_float_per_row():
    table = torch.zeros(4096, 64, dtype=torch.bfloat16)
    opt = RowWiseAdagrad(table)
    assert opt.state_bytes() == 4096 * 4
    assert opt.state_bytes() * 32 == table.numel() * 2   # 1/32 of the bf16 table
    assert SparseAdam(torch.zeros(4096, 64)).state_bytes() > 2 * 4096 * 64 * 4


def test_bf16_table_is_updated_in_place_and_rounded():
    table = torch.ones(10, 8, dtype=torch.bfloat16)
    opt = make_sparse_optimizer("adagrad", table, lr=0.5)
    opt.step(torch.tensor([2]), torch.ones(1, 8))
    assert table.dtype == torch.bfloat16
    assert table[2].float().tolist() == pytest.approx([0.5] * 8)
    assert table[3].float().tolist() == [1.0] * 8


def test_sparse_adam_lazy_rows_and_bias_correction():
    table = torch.zeros(50, 4)
    opt = SparseAdam(table, lr=0.01)
    opt.step(torch.tensor([1, 2]), torch.ones(2, 4))
    # first Adam step moves by lr * sign(g) (bias-corrected m/sqrt(v) = 1)
    assert table[1].tolist() == pytest.approx([-0.01] * 4, rel=1e-4)
    opt.step(torch.tensor([2]), torch.ones(1, 4))
    assert opt.steps[:3].tolist() == [0, 1, 2]
    assert table[0].abs().sum() == 0


def test_state_roundtrip_and_shape_check():
    t1 = torch.randn(20, 4)
    a = RowWiseAdagrad(t1, lr=0.1)
    a.step(torch.tensor([0, 5]), torch.randn(2, 4))
    b = RowWiseAdagrad(t1.clone(), lr=0.1)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    assert torch.equal(a.sum_sq, b.sum_sq)
    with pytest.raises(ValueError, match="sum_sq"):
        RowWiseAdagrad(torch.zeros(21, 4)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="unknown table optimizer"):
        make_sparse_optimizer("sgd", t1, 0.1)
