"""The workload: prompts are exact and reproducible; the arrival schedule has the
requested mean rate and burstiness."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loadtest.workload import BUILTIN_PROMPTS, WorkloadConfig, WorkloadError, arrival_offsets, build_requests


def test_random_prompts_have_exact_lengths_and_are_reproducible():
    cfg = WorkloadConfig(num_prompts=20, input_len=37, output_len=5, seed=3)
    reqs = build_requests(cfg)
    assert [len(r.prompt) for r in reqs] == [37] * 20
    assert all(r.prompt_len == 37 and r.output_len == 5 for r in reqs)
    assert all(1000 <= t < 30000 for r in reqs for t in r.prompt)
    assert [r.prompt for r in build_requests(cfg)] == [r.prompt for r in reqs]
    other = build_requests(WorkloadConfig(num_prompts=20, input_len=37, output_len=5, seed=4))
    assert other[0].prompt != reqs[0].prompt


def test_range_ratio_bounds_lengths():
    reqs = build_requests(WorkloadConfig(num_prompts=300, input_len=100, output_len=50,
                                         range_ratio=0.5, seed=1))
    ins = np.array([r.prompt_len for r in reqs])
    outs = np.array([r.output_len for r in reqs])
    assert ins.min() >= 50 and ins.max() <= 150 and ins.std() > 10
    assert outs.min() >= 25 and outs.max() <= 75


def test_builtin_and_file_datasets(tmp_path):
    reqs = build_requests(WorkloadConfig(dataset="builtin", num_prompts=40, output_len=7))
    assert len(reqs) == 40 and {r.prompt for r in reqs} == set(BUILTIN_PROMPTS)
    assert all(r.prompt_len is None and r.output_len == 7 for r in reqs)

    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\nsecond prompt\n")
    assert {r.prompt for r in build_requests(WorkloadConfig(dataset=str(txt), num_prompts=4))} \
        == {"first prompt", "second prompt"}

    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "a", "output_len": 3}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    reqs = build_requests(WorkloadConfig(dataset=str(jl), num_prompts=2, output_len=9))
    assert sorted((r.prompt, r.output_len) for r in reqs) == [("a", 3), ("b", 9)]


@pytest.mark.parametrize("content, message", [
    (None, "not found"), ("", "no prompts"), ("{bad\n", "not JSON"), ('{"text": "x"}\n', "'prompt'"),
])
def test_bad_dataset_files_are_named(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(WorkloadError, match=message) as err:
        build_requests(WorkloadConfig(dataset=str(path), num_prompts=1))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("rate", [2.0, 50.0])
@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_schedule_has_requested_mean_rate_and_burstiness(rate, burstiness):
    # 20000 gaps: the sample mean's relative standard error is 1/sqrt(b * 20000),
    # at most 1% here, so the 4% tolerance is >= 4 sigma (and the seed is fixed).
    n = 20001
    offsets = arrival_offsets(n, rate, burstiness, seed=11)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert abs((n - 1) / offsets[-1] - rate) / rate < 0.04
    # gamma(shape=b): coefficient of variation 1/sqrt(b); Poisson (b=1) has CV 1
    assert abs(gaps.std() / gaps.mean() - 1 / math.sqrt(burstiness)) < 0.05


def test_infinite_rate_sends_everything_at_once_and_bad_rates_fail():
    assert np.all(arrival_offsets(10, math.inf) == 0)
    np.testing.assert_array_equal(arrival_offsets(50, 3.0, seed=1), arrival_offsets(50, 3.0, seed=1))
    with pytest.raises(WorkloadError, match="rate"):
        arrival_offsets(5, 0.0)
    with pytest.raises(WorkloadError, match="burstiness"):
        arrival_offsets(5, 1.0, burstiness=0)

