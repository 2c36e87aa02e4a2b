"""Benchmarks with their baseline measured in the same run; prints a table, writes JSON.

  python scripts/benchmark.py moe [--output=moe.json]
  python scripts/benchmark.py decode [--output=decode.json]

moe: forward + backward time of one top-1 MoE layer for E = 4, 16, 64 experts at
fixed active parameters, for the dropless and capacity dispatches and the
run-every-expert reference (`dense`, what transformers does).
decode: generation tokens/s at batch 1 and 8 (prompt 128, 128 new tokens) for
the tiny config and a ~95M-parameter config, with transformers' generate on the
same converted model in the same run; and one decode step's time at several
positions of the cache.
"""

import dataclasses
import json

import jax
from absl import app, flags

from llama4_jax import benchmarks

_OUTPUT = flags.DEFINE_string('output', None, 'Write the results as JSON here.')
_TOKENS = flags.DEFINE_integer('tokens', 16384, 'moe: tokens per step.')


def moe():
  rows = benchmarks.moe_scaling(tokens=_TOKENS.value)
  by = {(r.experts, r.mode): r.seconds for r in rows}
  smallest = min(r.experts for r in rows)
  print(f'MoE layer forward+backward, top-1, {_TOKENS.value} tokens, {jax.devices()[0].device_kind}')
  print(f'{"E":>4} {"mode":>9} {"seconds":>9} {"vs E=" + str(smallest):>8} {"dense/this":>10} {"dropped":>8}')
  for r in rows:
    print(f'{r.experts:>4} {r.mode:>9} {r.seconds:>9.4f} {r.seconds / by[(smallest, r.mode)]:>8.2f} '
          f'{by[(r.experts, "dense")] / r.seconds:>10.1f} {r.dropped_fraction:>8.3f}')
  return {'tokens': _TOKENS.value, 'device': jax.devices()[0].device_kind,
          'rows': [dataclasses.asdict(r) for r in rows]}


def decode():
  rows = benchmarks.decode_speed()
  print(f'Decode tokens/s (prompt 128, 128 new tokens, greedy), {jax.devices()[0].device_kind}')
  print(f'{"config":>7} {"params":>12} {"batch":>5} {"ours":>10} {"transformers":>13} {"ratio":>6}')
  for r in rows:
    print(f'{r.config:>7} {r.params:>12,} {r.batch:>5} {r.ours_tokens_per_sec:>10.1f} '
          f'{r.transformers_tokens_per_sec:>13.1f} {r.ratio:>6.1f}')
  by_position = benchmarks.decode_step_seconds_by_position()
  print('one decode step of the 100m config (cache of 2048) at position:')
  for position, seconds in by_position.items():
    print(f'  {position:>5}: {1000 * seconds:.2f} ms')
  return {'device': jax.devices()[0].device_kind, 'rows': [dataclasses.asdict(r) for r in rows],
          'step_seconds_by_position': by_position}


BENCHMARKS = {'moe': moe, 'decode': decode}


def main(argv):
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    raise app.UsageError(f'usage: benchmark.py {{{",".join(BENCHMARKS)}}} [--output=FILE]')
  result = BENCHMARKS[argv[1]]()
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  app.run(main)
