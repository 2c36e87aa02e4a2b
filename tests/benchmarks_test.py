"""The decode and train benchmarks run end to end on small cases (their numbers are in
BENCHMARKS.md and PERFORMANCE.md)."""

import pytest

from llama4_jax.tools import benchmarks


@pytest.mark.reference
@pytest.mark.slow
def test_decode_speed_times_both_implementations_on_the_same_model():
  rows = benchmarks.decode_speed(
      names=('tiny',), batches=(1, 2), prompt_len=8, new_tokens=4, repeats=1
  )
  assert [(r.config, r.batch) for r in rows] == [('tiny', 1), ('tiny', 2)]
  for r in rows:
    assert r.params > 1_000_000 and r.ours_tokens_per_sec > 0 and r.transformers_tokens_per_sec > 0
    assert abs(r.ratio - r.ours_tokens_per_sec / r.transformers_tokens_per_sec) < 1e-6 * r.ratio


@pytest.mark.slow
def test_decode_step_time_by_position():
  by_position = benchmarks.decode_step_seconds_by_position(
      'tiny', positions=(4, 60), cache_len=64, repeats=1
  )
  assert set(by_position) == {4, 60} and all(s > 0 for s in by_position.values())


@pytest.mark.reference
@pytest.mark.slow
def test_train_speed_times_ours_then_transformers_in_a_process_of_its_own():
  (row,) = benchmarks.train_speed(names=('tiny',), repeats=1)
  assert row.config == 'tiny' and row.tokens_per_step == 16 * 256
  assert row.ours_step_seconds > 0 and row.transformers_step_seconds > 0 and row.peak_flops > 0
  assert abs(row.ratio - row.transformers_step_seconds / row.ours_step_seconds) < 1e-9
  assert row.ours_step_memory_mib > 10 and row.transformers_step_memory_mib > 10


def test_moe_tokens_must_fill_whole_rows():
  """--tokens=1000 at rows of 1024 would have timed an empty batch."""
  with pytest.raises(ValueError, match='--tokens=1000: must be a multiple of the rows of 1024'):
    benchmarks.moe_scaling(tokens=1000)
