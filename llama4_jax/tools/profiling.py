"""Where a jitted step's time goes: per-op times from the JAX profiler, grouped.

The model marks its parts with `jax.named_scope` ('attention_core',
'moe_router', 'moe_dispatch', 'expert_matmuls', 'optimizer'); the scope names
survive into each compiled op's metadata (also in the backward pass, as
`transpose(jvp(...))`). `step_breakdown` runs a step under the profiler, reads
the time of every executed op from the trace and sums it per category.
"""

import collections
import glob
import gzip
import json
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


def _op_paths(compiled_text: str) -> dict[str, str]:
  """Compiled HLO instruction name -> the JAX name path in its metadata ('' if none).

  Control flow (while, conditional, call) is left out: counting it would count its body twice.
  """
  paths = {}
  for line in compiled_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = ', line)
    if match and not _CONTROL_FLOW.search(line):
      path = re.search(r'op_name="([^"]*)"', line)
      paths[match.group(1)] = path.group(1) if path else ''
  return paths


def categorize(op: str, path: str) -> str:
  for category, scope in SCOPES:
    if scope in path:
      return category
  if op.startswith(('dot', 'ynn_fusion')) or 'dot_general' in path:
    return DENSE_MATMULS
  return OTHER


def _trace_op_seconds(fn: Callable[[], object]) -> dict[str, float]:
  """Seconds per executed op (summed over calls) of one traced fn()."""
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      jax.block_until_ready(fn())
    trace_file = glob.glob(f'{directory}/**/*.trace.json.gz', recursive=True)[0]
    with gzip.open(trace_file) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  seconds = collections.Counter()
  for event in events:
    if event.get('ph') == 'X':
      seconds[event['name']] += event.get('dur', 0) / 1e6
  return seconds


def step_breakdown(fn: Callable[[], object], compiled_text: str) -> dict[str, float]:
  """Seconds per category of one fn() call; fn runs the executable of compiled_text."""
  paths = _op_paths(compiled_text)
  totals = collections.Counter()
  for op, seconds in _trace_op_seconds(fn).items():
    if op in paths:  # compiled ops only (not the profiler's host-side events)
      totals[categorize(op, paths[op])] += seconds
  return dict(totals.most_common())
