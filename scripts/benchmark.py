"""Benchmarks with their baseline measured in the same run; prints a table, writes JSON.

  python scripts/benchmark.py moe [--output=moe.json]
  python scripts/benchmark.py decode [--output=decode.json]
  python scripts/benchmark.py train [--train_configs=tiny,80m-e8,80m-e32] [--output=train.json]
      [--maxtext_python=PYTHON]

moe: forward + backward time of one top-1 MoE layer for E = 4, 16, 64 experts at
fixed active parameters, for the dropless and capacity dispatches and the
run-every-expert reference (`dense`, what transformers does), all timed in turns.
decode: generation tokens/s at batch 1 and 8 (prompt 128, 128 new tokens) for
the tiny config and a ~95M-parameter config, with transformers' generate on the
same converted model in the same run; and one decode step's time at several
positions of the cache.
train: the full training step (forward, backward, AdamW) of llama4_jax and of
transformers' Llama4ForCausalLM (PyTorch, float32, AdamW) on the same
architecture and batch, alternating between them: median step time, tokens/s,
the ratio, MFU against the matmul peak measured in the same run, and the
memory each step takes above its resident state; with --maxtext_python, MaxText's step
on the same shapes too.
"""

import dataclasses
import json

import jax
from absl import flags

from llama4_jax import cli, host_memory
from llama4_jax.tools import benchmarks

_OUTPUT = flags.DEFINE_string('output', None, 'Write the results as JSON here.')
_TOKENS = flags.DEFINE_integer('tokens', 16384, 'moe: tokens per step.', lower_bound=1)
_TRAIN_CONFIGS = flags.DEFINE_list(
    'train_configs', list(benchmarks.TRAIN_CONFIGS), 'train: configs to measure.'
)
_REPEATS = flags.DEFINE_integer(
    'repeats', 3, 'train, decode: timed runs per implementation (in turns).', lower_bound=1
)
_PROFILE = flags.DEFINE_bool('profile', False, 'train: also profile one step of ours, by part.')
_MAXTEXT_PYTHON = flags.DEFINE_string(
    'maxtext_python',
    None,
    "train: also time MaxText's step on the same shapes, run by this Python (one with "
    'MaxText installed; llama4_jax/tools/maxtext_baseline.py).',
)
_TRANSFORMERS_KEEPS_FREED_MEMORY = flags.DEFINE_bool(
    'transformers_keeps_freed_memory',
    False,
    'train: transformers keeps freed memory for its next step too (as ours does on CPU); '
    'at 80m-e32 its process then outgrows 20 GB.',
)


def moe():
  rows = benchmarks.moe_scaling(tokens=_TOKENS.value)
  by = {(r.experts, r.mode): r.seconds for r in rows}
  smallest = min(r.experts for r in rows)
  print(
      f'MoE layer forward+backward, top-1, {_TOKENS.value} tokens, {jax.devices()[0].device_kind}'
  )
  print(
      f'{"E":>4} {"mode":>9} {"seconds":>9} {"vs E=" + str(smallest):>8} {"dense/this":>10} {"dropped":>8}'
  )
  for r in rows:
    print(
        f'{r.experts:>4} {r.mode:>9} {r.seconds:>9.4f} {r.seconds / by[(smallest, r.mode)]:>8.2f} '
        f'{by[(r.experts, "dense")] / r.seconds:>10.1f} {r.dropped_fraction:>8.3f}'
    )
  return {
      'tokens': _TOKENS.value,
      'device': jax.devices()[0].device_kind,
      'rows': [dataclasses.asdict(r) for r in rows],
  }


def decode():
  rows = benchmarks.decode_speed(repeats=_REPEATS.value)
  print(f'Decode tokens/s (prompt 128, 128 new tokens, greedy), {jax.devices()[0].device_kind}')
  print(f'{"config":>7} {"params":>12} {"batch":>5} {"ours":>10} {"transformers":>13} {"ratio":>6}')
  for r in rows:
    print(
        f'{r.config:>7} {r.params:>12,} {r.batch:>5} {r.ours_tokens_per_sec:>10.1f} '
        f'{r.transformers_tokens_per_sec:>13.1f} {r.ratio:>6.1f}'
    )
  by_position = benchmarks.decode_step_seconds_by_position()
  print('one decode step of the 100m config (cache of 2048) at position:')
  for position, seconds in by_position.items():
    print(f'  {position:>5}: {1000 * seconds:.2f} ms')
  return {
      'device': jax.devices()[0].device_kind,
      'rows': [dataclasses.asdict(r) for r in rows],
      'step_seconds_by_position': by_position,
  }


def train():
  unknown = set(_TRAIN_CONFIGS.value) - set(benchmarks.TRAIN_CONFIGS)
  if unknown:
    raise ValueError(
        f'--train_configs: unknown {sorted(unknown)}; ' f'known: {sorted(benchmarks.TRAIN_CONFIGS)}'
    )
  rows = benchmarks.train_speed(
      _TRAIN_CONFIGS.value,
      repeats=_REPEATS.value,
      profile=_PROFILE.value,
      transformers_keeps_freed_memory=_TRANSFORMERS_KEEPS_FREED_MEMORY.value,
      maxtext_python=_MAXTEXT_PYTHON.value,
  )
  print(
      f'Train step (forward, backward, AdamW), {rows[0].device}; peak {rows[0].peak_flops / 1e9:.1f} '
      f'GFLOP/s ({rows[0].peak_source})'
  )
  print(
      f'{"config":>8} {"params":>12} {"tokens":>6} | {"ours s":>7} {"tok/s":>7} {"MFU":>5} '
      f'{"MiB":>6} | {"hf s":>7} {"tok/s":>7} {"MFU":>5} {"MiB":>6} | {"ratio":>5}'
  )
  fmt = lambda value, spec: '-' if value is None else format(value, spec)
  for r in rows:
    print(
        f'{r.config:>8} {r.params:>12,} {r.tokens_per_step:>6} | {r.ours_step_seconds:>7.2f} '
        f'{r.ours_tokens_per_sec:>7.0f} {r.ours_mfu:>5.0%} {r.ours_step_memory_mib:>6.0f} | '
        f'{fmt(r.transformers_step_seconds, ">7.2f")} {fmt(r.transformers_tokens_per_sec, ">7.0f")} '
        f'{fmt(r.transformers_mfu, ">5.0%")} {fmt(r.transformers_step_memory_mib, ">6.0f")} | '
        f'{fmt(r.ratio, ">5.1f")}'
    )
  if _MAXTEXT_PYTHON.value:
    print('MaxText on the same shapes (maxtext_baseline.SETTINGS):')
    for r in rows:
      print(
          f'{r.config:>8} | {fmt(r.maxtext_step_seconds, ">7.2f")} s {fmt(r.maxtext_mfu, ">5.0%")} '
          f'| MaxText / ours {fmt(r.maxtext_ratio, ">5.1f")}'
      )
  for r in rows:
    if r.ours_breakdown:
      total = sum(r.ours_breakdown.values())
      print(
          f'{r.config}: one step of llama4_jax by part ({total:.2f} s of op time; matmul GFLOP/s '
          'per second of op time, against the peak when run on one core)'
      )
      for part, seconds in r.ours_breakdown.items():
        gflop = r.ours_breakdown_matmul_gflop[part]
        rate = f'{gflop / seconds:6.1f} GFLOP/s' if gflop and seconds else ' ' * 13
        print(f'  {seconds:7.2f} s {seconds / total:5.1%} {rate}  {part}')
  return {'rows': [dataclasses.asdict(r) for r in rows]}


BENCHMARKS = {'moe': moe, 'decode': decode, 'train': train}


def main(argv):
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    raise ValueError(f'usage: benchmark.py {{{",".join(BENCHMARKS)}}} [--output=FILE]')
  result = BENCHMARKS[argv[1]]()
  result['freed_memory_kept'] = host_memory.freed_memory_kept()  # CPU speed depends on it
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  cli.run_main(main, repeats_steps=True)
