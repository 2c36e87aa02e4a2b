"""Where a jitted step's time goes: per-op times from the JAX profiler, grouped.

The model marks its parts with `jax.named_scope` ('attention_core',
'moe_router', 'moe_dispatch', 'expert_matmuls', 'optimizer'); the scope names
survive into each compiled op's metadata (also in the backward pass, as
`transpose(jvp(...))`). `step_breakdown` runs a step under the profiler, reads
the time of every executed op from the trace and sums it per category, with the
FLOPs of the matmuls each op executed (read off the compiled program's dots): their
ratio is the matmuls' speed, to hold against the machine's peak.
"""

import collections
import glob
import gzip
import json
import math
import re
import tempfile
from collections.abc import Callable

import jax

# (category, substring of the op's name path), first match wins; then by op kind.
SCOPES = (
    ('optimizer (AdamW update, clipping)', 'optimizer'),
    ('MoE expert matmuls', 'expert_matmuls'),
    ('MoE dispatch (sort, gather, scatter, padding)', 'moe_dispatch'),
    ('MoE router', 'moe_router'),
    ('attention core (scores, mask, softmax, values)', 'attention_core'),
)
DENSE_MATMULS = 'matmuls (projections, dense and shared-expert MLPs, lm_head)'
OTHER = 'other (norms, RoPE, loss, residuals, layout copies)'


# A loop's or a branch's own event spans the ops of its body, which are traced as well.
_CONTROL_FLOW = re.compile(r' (?:while|conditional|call)\(%')
# An HLO instruction's line: its name, and its dimensions where its shape is an array.
_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%([\w.\-]+) = (?:\w+\[([\d,]*)\])?')


def _op_paths(compiled_text: str) -> dict[str, str]:
  """Compiled HLO instruction name -> the JAX name path in its metadata ('' if none).

  Control flow (while, conditional, call) is left out: counting it would count its body twice.
  """
  paths = {}
  for line in compiled_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match and not _CONTROL_FLOW.search(line):
      path = re.search(r'op_name="([^"]*)"', line)
      paths[match.group(1)] = path.group(1) if path else ''
  return paths


def _dot_flops(compiled_text: str) -> dict[str, int]:
  """Compiled instruction name -> FLOPs of the dots it runs (in its fused computations too)."""
  dims, computations, current = {}, collections.defaultdict(list), None
  for line in compiled_text.splitlines():
    if line.rstrip().endswith('{') and (header := re.match(r'(?:ENTRY )?%([\w.\-]+) ', line)):
      current = header.group(1)
    elif match := _INSTRUCTION.match(line):
      name, shape = match.groups()
      if shape is not None:  # an array, not a tuple
        dims[name] = [int(d) for d in shape.split(',') if d]
      computations[current].append(line)

  def flops(line: str) -> int:
    if dot := re.search(r' dot\(%([\w.\-]+)', line):
      contracted = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', line).group(1)
      lhs, out = dims[dot.group(1)], dims[_INSTRUCTION.match(line).group(1)]
      return 2 * math.prod(out) * math.prod(lhs[int(d)] for d in contracted.split(',') if d)
    if _CONTROL_FLOW.search(line):  # a loop's body ops are executed (and traced) one by one
      return 0
    return sum(
        flops(inner)
        for called in re.findall(r'calls=%([\w.\-]+)', line)
        for inner in computations[called]
    )

  return {
      _INSTRUCTION.match(line).group(1): f
      for lines in computations.values()
      for line in lines
      if (f := flops(line))
  }


def categorize(op: str, path: str) -> str:
  for category, scope in SCOPES:
    if scope in path:
      return category
  if op.startswith(('dot', 'ynn_fusion')) or 'dot_general' in path:
    return DENSE_MATMULS
  return OTHER


def _trace_op_seconds(fn: Callable[[], object]) -> dict[str, tuple[float, int]]:
  """(seconds summed over calls, calls) per executed op of one traced fn()."""
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      jax.block_until_ready(fn())
    trace_file = glob.glob(f'{directory}/**/*.trace.json.gz', recursive=True)[0]
    with gzip.open(trace_file) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  seconds, calls = collections.Counter(), collections.Counter()
  for event in events:
    if event.get('ph') == 'X':
      seconds[event['name']] += event.get('dur', 0) / 1e6
      calls[event['name']] += 1
  return {name: (seconds[name], calls[name]) for name in seconds}


def step_breakdown(
    fn: Callable[[], object], compiled_text: str
) -> tuple[dict[str, float], dict[str, float]]:
  """Seconds and executed matmul FLOPs per category of one fn() call.

  fn runs the executable of compiled_text. Ops on several cores at once each count
  their own time: for the matmuls' FLOPs per second of op time, profile on one core.
  """
  paths, dot_flops = _op_paths(compiled_text), _dot_flops(compiled_text)
  seconds, matmul_flops = collections.Counter(), collections.Counter()
  for op, (op_seconds, calls) in _trace_op_seconds(fn).items():
    if op in paths:  # compiled ops only (not the profiler's host-side events)
      category = categorize(op, paths[op])
      seconds[category] += op_seconds
      matmul_flops[category] += calls * dot_flops.get(op, 0)
  return dict(seconds.most_common()), {category: matmul_flops[category] for category in seconds}
