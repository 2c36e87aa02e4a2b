"""The one writer of result tables: rows of dicts as Markdown and CSV, and their plots as PNG.

Used by `scripts/eval.py --all_steps` (loss versus step) and the sweep summary (loss versus
each swept value).
"""

import csv
import io
from collections.abc import Sequence
from typing import NamedTuple

from etils import epath


def format_cell(value) -> str:
  """A Markdown cell: floats to 4 decimals (or %g when tiny or huge), None as '-'."""
  if value is None:
    return '-'
  if isinstance(value, float):
    return f'{value:.4f}' if 1e-3 <= abs(value) < 1e4 else f'{value:g}'
  return str(value)


def write_table(rows: Sequence[dict], columns: Sequence[str], base: str) -> list[str]:
  """base.md and base.csv with `columns` (other keys of the rows are left out); their paths.

  `base` may be any epath path (a gs:// workdir).
  """
  text = io.StringIO()
  writer = csv.DictWriter(text, columns, extrasaction='ignore')
  writer.writeheader()
  writer.writerows(rows)
  epath.Path(base + '.csv').write_text(text.getvalue())
  lines = ['| ' + ' | '.join(columns) + ' |', '| ' + ' | '.join('---' for _ in columns) + ' |']
  lines += ['| ' + ' | '.join(format_cell(r.get(c)) for c in columns) + ' |' for r in rows]
  epath.Path(base + '.md').write_text('\n'.join(lines) + '\n')
  return [base + '.md', base + '.csv']


class Series(NamedTuple):
  label: str
  y: Sequence[float]
  style: str = 'o'  # a matplotlib format string: 'o' points, 'o-' points joined


class Panel(NamedTuple):
  """One plot: series of y values against shared x values, numeric or categorical."""

  x: Sequence
  series: Sequence[Series]
  xlabel: str
  ylabel: str
  log_x: bool = False


def is_numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def write_plot(panels: Sequence[Panel], path: str) -> str:
  """The panels side by side in one PNG; returns its path. Non-numeric x values are categories."""
  import matplotlib  # imported here: only the tools that write plots need it

  matplotlib.use('Agg')  # files only, no display
  from matplotlib import pyplot as plt
  from matplotlib import ticker

  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 4), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    x = list(panel.x)
    if is_numeric(x):
      if panel.log_x:
        ax.set_xscale('log')
      elif all(isinstance(v, int) for v in x):
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    else:
      labels = sorted({str(v) for v in x})
      x = [labels.index(str(v)) for v in x]
      ax.set_xticks(range(len(labels)), labels, rotation=30, ha='right')
    for series in panel.series:
      ax.plot(x, series.y, series.style, label=series.label)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if len(panel.series) > 1:
      ax.legend()
  fig.tight_layout()
  with epath.Path(path).open('wb') as f:  # an epath path, as in `write_table`
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)
  return path
