"""KV cache sizing on a GPU (--gpu-memory-utilization), as vLLM sizes it: the figures, the cap at
max_num_seqs, and a clear refusal when not one sequence fits."""
import pytest
import torch

from engram_runtime.kv_budget import bytes_per_sequence, fit_slots

GiB = 2**30


def test_a_sequences_cache_is_k_and_v_of_every_layer():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, bfloat16, 2049 positions
    assert bytes_per_sequence(30, 3, 64, 2049, torch.bfloat16) == 2 * 30 * 3 * 64 * 2049 * 2


def test_slots_fill_the_budget_after_others_and_the_model():
    per = 100 * 2**20
    budget = fit_slots(total=80 * GiB, used_by_others=2 * GiB, model_peak=18 * GiB, per_sequence=per,
                       utilization=0.9, wanted=10_000)
    left = int(80 * GiB * 0.9) - 20 * GiB
    assert budget.slots == left // per and budget.cache_bytes == budget.slots * per
    assert 0 <= budget.free_bytes < per
    assert fit_slots(80 * GiB, 2 * GiB, 18 * GiB, per, 0.9, wanted=64).slots == 64  # max_num_seqs caps it


def test_no_room_is_refused_with_the_figures():
    with pytest.raises(ValueError, match=r"leaves 0.50 GiB after other processes \(1.00 GiB\) and the model "
                                         r"\(2.50 GiB\).*needs 1.000 GiB; lower --max-model-len"):
        fit_slots(total=5 * GiB, used_by_others=GiB, model_peak=int(2.5 * GiB), per_sequence=GiB, utilization=0.8,
                  wanted=8)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        fit_slots(GiB, 0, 0, 1, 1.5, 1)
