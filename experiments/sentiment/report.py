"""The sentiment report: table, win-rate-versus-KL plots, matched-KL verdicts.

Each method's measured curve is its evaluated runs sorted by KL, starting at
the reference policy itself (KL 0, every win rate 1/2, standard error 0),
which is the limit of every method as beta grows.

Methods are compared at matched KL by linear interpolation along the
baseline's curve. The comparison takes each KL at which the challenger was
measured, if it lies inside the baseline's measured KL range. There the
baseline's win rate and standard error are interpolated linearly between its
two neighbouring points, and the difference is divided by
sqrt(se_challenger^2 + se_baseline^2). The KL estimates' own standard errors
are left out of that ratio.
"""

from collections.abc import Mapping, Sequence
import json
import math
from typing import Any

import matplotlib

matplotlib.use('Agg')
from etils import epath  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

# (metric key, label in tables and plots, plot file stem). The procedure N is
# filled in from the evaluation config.
METRICS = (
    ('w1', 'W_1', 'w1_vs_kl'),
    ('bon', 'W_BoN,{n}', 'bon{n}_vs_kl'),
    ('won', 'W_WoN,{n}', 'won{n}_vs_kl'),
)
COLORS = {
    'baseline': 'tab:gray',
    'identity': 'tab:blue',
    'exp': 'tab:green',
    'neg_exp': 'tab:red',
}
# A difference counts as a clear win only beyond this many standard errors.
CLEAR_WIN_STANDARD_ERRORS = 2.0


def measured_curve(
    rows: Sequence[Mapping[str, Any]], method: str, metric: str
) -> dict[str, np.ndarray]:
  """Return the method's points sorted by KL, with the reference prepended."""
  points = [(0.0, 0.5, 0.0)]
  for row in rows:
    if row['method'] == method:
      points.append((row['kl'], row[metric], row[f'{metric}_se']))
  points.sort(key=lambda point: point[0])
  kl, value, standard_error = (
      np.asarray(column) for column in zip(*points, strict=True)
  )
  return {'kl': kl, 'value': value, 'se': standard_error}


def compare_at_matched_kl(
    rows: Sequence[Mapping[str, Any]],
    *,
    challenger: str,
    baseline: str,
    metric: str,
    label: str,
) -> dict[str, Any]:
  """Compare two methods' `metric` at the challenger's measured KLs.

  Returns:
    A dict with `points` (one per matched KL: kl, both values and standard
    errors, difference, difference in standard errors), `verdict` (one of
    'beat', 'ahead_within_noise', 'mixed', 'behind_within_noise', 'behind',
    'no_overlap') and
    `statement`, a plain sentence for the report.
  """
  base = measured_curve(rows, baseline, metric)
  challenger_rows = sorted(
      (row for row in rows if row['method'] == challenger),
      key=lambda row: row['kl'],
  )
  points = []
  for row in challenger_rows:
    kl = row['kl']
    if not base['kl'][0] <= kl <= base['kl'][-1]:
      continue
    base_value = float(np.interp(kl, base['kl'], base['value']))
    base_se = float(np.interp(kl, base['kl'], base['se']))
    difference = row[metric] - base_value
    combined_se = math.sqrt(row[f'{metric}_se'] ** 2 + base_se**2)
    points.append(
        {
            'beta': row['beta'],
            'kl': kl,
            'challenger': row[metric],
            'challenger_se': row[f'{metric}_se'],
            'baseline': base_value,
            'baseline_se': base_se,
            'difference': difference,
            'standard_errors': difference / combined_se if combined_se else 0.0,
        }
    )
  name = f'{challenger} against {baseline} on {label}'
  if not points:
    kl_range = f'{base["kl"][0]:.3f}..{base["kl"][-1]:.3f}'
    return {
        'points': [],
        'verdict': 'no_overlap',
        'statement': (
            f'{name}: no matched KL. Every {challenger} run lies outside the '
            f'{baseline} KL range {kl_range} nats, and the curves are not '
            'extrapolated; widen config.rl.kl_targets.'
        ),
    }
  z_scores = [point['standard_errors'] for point in points]
  details = '; '.join(
      f'KL {p["kl"]:.3f}: {p["challenger"]:.3f} vs {p["baseline"]:.3f} '
      f'({p["difference"]:+.3f}, {p["standard_errors"]:+.1f} SE)'
      for p in points
  )
  if all(z >= CLEAR_WIN_STANDARD_ERRORS for z in z_scores):
    verdict, summary = 'beat', 'Yes, beyond noise at every matched KL'
  elif all(z > 0 for z in z_scores):
    verdict = 'ahead_within_noise'
    summary = (
        'Ahead at every matched KL, but not everywhere by '
        f'{CLEAR_WIN_STANDARD_ERRORS:g} standard errors'
    )
  elif all(z <= -CLEAR_WIN_STANDARD_ERRORS for z in z_scores):
    verdict, summary = 'behind', 'No, behind beyond noise at every matched KL'
  elif all(z < 0 for z in z_scores):
    verdict = 'behind_within_noise'
    summary = (
        'No, behind at every matched KL, but not everywhere by '
        f'{CLEAR_WIN_STANDARD_ERRORS:g} standard errors'
    )
  else:
    verdict, summary = 'mixed', 'Mixed: ahead at some matched KLs only'
  return {
      'points': points,
      'verdict': verdict,
      'statement': f'Did {name} win at matched KL? {summary}. {details}.',
  }


def plot_metric(
    path: epath.Path,
    rows: Sequence[Mapping[str, Any]],
    predictions: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    metric: str,
    label: str,
    methods: Sequence[str],
) -> None:
  """Plot `metric` against KL: measured curves and calibrated predictions."""
  figure, axes = plt.subplots(figsize=(6.4, 4.8))
  max_kl = max([row['kl'] for row in rows] + [0.05])
  for method in methods:
    color = COLORS.get(method)
    curve = measured_curve(rows, method, metric)
    method_rows = [row for row in rows if row['method'] == method]
    axes.plot(curve['kl'], curve['value'], '-', color=color, alpha=0.6)
    axes.errorbar(
        [row['kl'] for row in method_rows],
        [row[metric] for row in method_rows],
        xerr=[row['kl_se'] for row in method_rows],
        yerr=[row[f'{metric}_se'] for row in method_rows],
        fmt='o',
        color=color,
        capsize=3,
        label=f'{method} (measured)',
    )
    prediction = predictions.get(method)
    if prediction is not None:
      kl = np.asarray(prediction['kl'])
      keep = kl <= 1.5 * max_kl
      axes.plot(
          kl[keep],
          np.asarray(prediction[metric])[keep],
          '--',
          color=color,
          label=f'{method} (calibrated-space prediction)',
      )
  axes.axhline(0.5, color='black', linewidth=0.5)
  axes.set_xlabel('KL(policy || reference) [nats]')
  axes.set_ylabel(f'{label} against the reference policy')
  axes.set_title(f'{label} versus KL on held-out movie-review prompts')
  axes.legend(fontsize='small')
  axes.grid(alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def _format(value: Any, digits: int = 3) -> str:
  if value is None:
    return '-'
  if isinstance(value, float) and math.isnan(value):
    return 'nan'
  return f'{value:.{digits}f}'


def table_markdown(
    rows: Sequence[Mapping[str, Any]], *, procedure_n: int
) -> str:
  """Render the results table (one row per method and beta)."""
  header = (
      '| method | KL target | beta | t | KL | W_1 | '
      f'W_BoN,{procedure_n} | W_WoN,{procedure_n} | reward | VADER judge |'
  )
  lines = [header, '|' + '---|' * 10]
  for row in rows:
    cells = [
        row['method'],
        _format(row.get('kl_target'), 2),
        '-' if row['beta'] is None else f'{row["beta"]:.4g}',
        _format(row.get('t'), 2),
    ]
    for metric in ('kl', 'w1', 'bon', 'won', 'reward', 'judge'):
      cells.append(f'{_format(row[metric])} ± {_format(row[metric + "_se"])}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_report(
    directory: epath.Path,
    *,
    rows: Sequence[Mapping[str, Any]],
    predictions: Mapping[str, Mapping[str, Sequence[float]]],
    procedure_n: int,
    methods: Sequence[str],
    sections: Mapping[str, Any],
) -> dict[str, Any]:
  """Write report.md, report.json and one PNG per win rate into `directory`.

  Args:
    directory: the report stage's folder.
    rows: evaluated policies; the reference policy's own row has method
      'reference' and beta None. Keys: method, beta, t, and the metrics of
      `evaluation.summarize` with their `_se` twins.
    predictions: per calibrated method, calibrated-space curves over a beta
      grid: lists under 'beta', 'kl', 'w1', 'bon', 'won'.
    procedure_n: N of the BoN and WoN win rates.
    methods: methods of the RL sweep, in plotting order.
    sections: upstream results shown before the table (reference LM, reward
      model, calibration, chosen t), as JSON-serializable mappings.

  Returns:
    The report.json payload.
  """
  runs = [row for row in rows if row['method'] != 'reference']
  comparisons = {}
  if 'baseline' in methods:
    for challenger, metric, label in (
        ('exp', 'bon', f'W_BoN,{procedure_n}'),
        ('neg_exp', 'won', f'W_WoN,{procedure_n}'),
    ):
      if challenger in methods:
        comparisons[f'{challenger}_vs_baseline_{metric}'] = (
            compare_at_matched_kl(
                runs,
                challenger=challenger,
                baseline='baseline',
                metric=metric,
                label=label,
            )
        )

  plots = []
  for metric, label, stem in METRICS:
    label = label.format(n=procedure_n)
    file_name = stem.format(n=procedure_n) + '.png'
    plot_metric(
        directory / file_name,
        runs,
        predictions,
        metric=metric,
        label=label,
        methods=methods,
    )
    plots.append(file_name)

  payload = {
      'table': list(rows),
      'comparisons': comparisons,
      'predictions': predictions,
      'plots': plots,
      **sections,
  }
  common.write_json_atomic(directory / 'report.json', payload)
  (directory / 'report.md').write_text(
      _markdown(rows, comparisons, plots, procedure_n, sections)
  )
  return payload


def _markdown(rows, comparisons, plots, procedure_n, sections) -> str:
  lines = [
      '# CTRL on human-rated movie-review sentences',
      '',
      'Every policy is evaluated against the reference policy on held-out',
      'movie-review prompts. KL is the mean sequence log-probability ratio',
      'of policy samples; win rates are the unbiased sample estimators',
      '(ties count one half); the VADER judge is the mean compound score of',
      'prompt plus continuation. Each number is followed by its standard',
      'error over prompts.',
      '',
  ]
  for title, section in sections.items():
    lines.append(f'## {title.replace("_", " ").capitalize()}')
    lines.append('')
    for key, value in section.items():
      if isinstance(value, list):
        lines.append(f'- {key}:')
        lines += [f'  - `{item!r}`' for item in value]
      elif isinstance(value, float):
        lines.append(f'- {key}: {value:.4g}')
      else:
        lines.append(f'- {key}: {json.dumps(value, default=str)}')
    lines.append('')
  lines += ['## Results', '', table_markdown(rows, procedure_n=procedure_n), '']
  lines += [
      '## Matched-KL comparisons',
      '',
      "Each method's measured curve runs through its points sorted by KL,",
      'starting at the reference policy (KL 0, win rate 1/2). At every KL',
      "where the challenger was measured inside the baseline's KL range, the",
      "baseline's win rate and standard error are interpolated linearly",
      'between its two neighbouring points; the difference is divided by',
      "sqrt(se_challenger^2 + se_baseline^2). The KL estimates' own standard",
      'errors are not propagated. A clear win needs '
      f'{CLEAR_WIN_STANDARD_ERRORS:g} standard errors at every matched KL.',
      '',
  ]
  if not comparisons:
    lines.append('The sweep has no baseline or no exp / neg_exp method.')
  for comparison in comparisons.values():
    lines.append(f'- {comparison["statement"]}')
  lines += ['', '## Plots', '']
  lines += [f'![{plot}]({plot})' for plot in plots]
  lines += [
      '',
      'Dashed lines: the calibrated-space prediction of each transform over',
      'beta, for a policy that reaches the KL-regularized optimum. The',
      'baseline trains on the raw reward, which has no calibrated-space',
      'prediction.',
      '',
  ]
  return '\n'.join(lines)
