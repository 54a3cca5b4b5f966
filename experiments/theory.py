"""The analytical tool: win rate against KL for transformed rewards.

Everything here is computed in calibrated space by `infalign_jax.analysis`,
with no sampling or training. Outputs in the workdir:

* curves.csv, curves.json: one row per (procedure, N, method, beta) with KL
  and the procedure's win rate. Methods: identity, log, exp_t<t>,
  neg_exp_t<t> and optimal (the fixed-point optimum at each beta).
* chosen_t.csv, chosen_t.json: the t that maximizes the procedure's win rate
  at each KL budget, its beta and win rate, beside the identity transform's
  win rate at the same KL. `at_limit` is 'low' or 'high' when the best t
  sits at that end of config.t_range (the optimum may lie outside it; a
  warning is logged), else empty.
* bon_points.json: for each N, the best-of-N policy itself (log transform at
  beta = 1 / (N - 1)): KL = log N - (N - 1)/N and W_1 = N/(N + 1) in closed
  form, the same two computed by the analysis (`kl_analysis`,
  `win_rate_standard_analysis`), and its best-of-N and worst-of-N win
  rates.
* tradeoff_<procedure>.png (one panel per N) and tradeoff_standard.png.

Launch: see experiments/configs/theory.py.
"""

import csv
import io
import math
import os
import time
from typing import Any

from absl import logging
from etils import epath
import matplotlib

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from infalign_jax import analysis  # noqa: E402
from infalign_jax import transforms  # noqa: E402

_PROCEDURE_TITLES = {
    'bon': 'best-of-N',
    'won': 'worst-of-N',
    'standard': 'standard sampling',
}
_CURVE_FIELDS = ('procedure', 'n', 'method', 't', 'beta', 'kl', 'win_rate')
_CHOSEN_FIELDS = (
    'procedure',
    'n',
    'kl_budget',
    'family',
    't',
    'beta',
    'win_rate',
    'win_rate_identity',
    'at_limit',
)


def _write_text_atomic(path: epath.Path, text: str) -> None:
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}'
  tmp.write_text(text)
  os.replace(tmp, path)


def _write_csv(path: epath.Path, fields, rows) -> None:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=fields)
  writer.writeheader()
  for row in rows:
    writer.writerow({k: row[k] for k in fields})
  _write_text_atomic(path, buffer.getvalue())


def _save_figure(figure, path: epath.Path) -> None:
  tmp = path.parent / f'.{path.name}.tmp-{os.getpid()}.png'
  figure.savefig(tmp, dpi=110)
  plt.close(figure)
  os.replace(tmp, path)


def _transform_specs(config) -> list[tuple[str, transforms.Transform, float]]:
  """Return (method name, transform, t or NaN) for every curve."""
  specs = [
      ('identity', transforms.make_transform('identity'), math.nan),
      ('log', transforms.make_transform('log'), math.nan),
  ]
  for family in ('exp', 'neg_exp'):
    for t in config.ts:
      specs.append(
          (f'{family}_t{t:g}', transforms.make_transform(family, t=t), t)
      )
  return specs


def _beta_grid(transform, config) -> np.ndarray:
  """Log-spaced betas whose KL spans [kl_min, kl_max] where reachable."""
  num_points = config.num_points
  beta_high = analysis.beta_for_kl(
      transform, config.kl_min, num_points=num_points
  )
  try:
    beta_low = analysis.beta_for_kl(
        transform, config.kl_max, num_points=num_points
    )
  except ValueError:
    # Bounded transforms (neg_exp with large t) flatten out below kl_max:
    # take beta down to where the tilt no longer changes.
    spread = float(transform(1.0) - transform(0.0))
    beta_low = 1e-4 * spread
  return np.geomspace(beta_low, beta_high, config.num_betas)


def _curves(config) -> list[dict[str, Any]]:
  rows = []
  for method, transform, t in _transform_specs(config):
    betas = _beta_grid(transform, config)
    for n in config.ns:
      predicted = analysis.predict(
          transform, betas, n, num_points=config.num_points
      )
      for procedure in ('standard', *config.procedures):
        if procedure == 'standard' and n != config.ns[0]:
          continue  # The standard curve does not depend on N.
        wins = predicted[f'win_rate_{procedure}']
        for beta, kl, win in zip(betas, predicted['kl'], wins, strict=True):
          rows.append(
              {
                  'procedure': procedure,
                  'n': 1 if procedure == 'standard' else n,
                  'method': method,
                  't': t,
                  'beta': float(beta),
                  'kl': float(kl),
                  'win_rate': float(win),
              }
          )
  betas = np.geomspace(
      config.optimal_beta_min,
      config.optimal_beta_max,
      config.num_optimal_betas,
  )
  for procedure in config.procedures:
    for n in config.ns:
      for beta in betas:
        solution = analysis.solve_optimal(
            procedure, n, float(beta), num_points=config.num_points
        )
        if not solution.converged:
          continue
        rows.append(
            {
                'procedure': procedure,
                'n': n,
                'method': 'optimal',
                't': math.nan,
                'beta': float(beta),
                'kl': solution.kl,
                'win_rate': solution.win_rate,
            }
        )
  return rows


def _chosen_t(config) -> list[dict[str, Any]]:
  rows = []
  identity = transforms.make_transform('identity')
  for procedure in config.procedures:
    for n in config.ns:
      for budget in config.kl_budgets:
        chosen = analysis.choose_t_details(
            procedure,
            n,
            budget,
            t_range=tuple(config.t_range),
            num_points=config.num_points,
        )
        beta = analysis.beta_for_kl(
            identity, budget, num_points=config.num_points
        )
        chosen['win_rate_identity'] = analysis.win_rate(
            identity, beta, procedure, n, num_points=config.num_points
        )
        rows.append(
            {'procedure': procedure, 'n': n, 'kl_budget': budget, **chosen}
        )
        logging.info(
            '%s N=%d KL=%g: t=%.3g beta=%.3g win rate %.4f (identity %.4f)%s',
            procedure,
            n,
            budget,
            chosen['t'],
            chosen['beta'],
            chosen['win_rate'],
            chosen['win_rate_identity'],
            ''
            if chosen['at_limit'] is None
            else f' AT THE {chosen["at_limit"].upper()} END OF t_range',
        )
  return rows


def _bon_points(config) -> list[dict[str, Any]]:
  points = []
  for n in config.ns:
    predicted = (
        analysis.predict('log', 1.0 / (n - 1), n, num_points=config.num_points)
        if n > 1
        else None
    )
    points.append(
        {
            'n': n,
            'kl': math.log(n) - (n - 1) / n,
            'win_rate_standard': n / (n + 1),
            'kl_analysis': None if predicted is None else predicted['kl'],
            'win_rate_standard_analysis': None
            if predicted is None
            else predicted['win_rate_standard'],
            'win_rate_bon': None
            if predicted is None
            else predicted['win_rate_bon'],
            'win_rate_won': None
            if predicted is None
            else predicted['win_rate_won'],
        }
    )
  return points


def _label(method: str) -> str:
  if method == 'optimal':
    return 'optimal (fixed point)'
  if '_t' in method:
    family, t = method.rsplit('_t', 1)
    return f'{family} t={t}'
  return method


def _style(method: str) -> dict[str, Any]:
  if method == 'optimal':
    return {'color': 'black', 'linewidth': 2.4, 'zorder': 5}
  if method == 'identity':
    return {'color': 'tab:gray', 'linewidth': 1.8, 'linestyle': '--'}
  if method == 'log':
    return {'color': 'tab:brown', 'linewidth': 1.8, 'linestyle': ':'}
  family, t = method.rsplit('_t', 1)
  colors = plt.get_cmap('Blues' if family == 'exp' else 'Reds')
  # Darker for larger t; t values are few, so a log scale spreads them.
  shade = 0.35 + 0.6 * min(math.log10(float(t) + 1) / math.log10(201), 1.0)
  return {'color': colors(shade), 'linewidth': 1.3}


def _plot_panel(panel, rows, chosen, bon_points, procedure, n, config):
  """Draw every method's curve for one (procedure, N) into `panel`."""
  methods = list(dict.fromkeys(r['method'] for r in rows))
  for method in methods:
    selected = [
        r
        for r in rows
        if r['procedure'] == procedure
        and r['n'] == n
        and r['method'] == method
        and r['kl'] <= config.kl_max
    ]
    if not selected:
      continue
    selected.sort(key=lambda r: r['kl'])
    panel.plot(
        [r['kl'] for r in selected],
        [r['win_rate'] for r in selected],
        label=_label(method),
        **_style(method),
    )

  picks = [c for c in chosen if c['procedure'] == procedure and c['n'] == n]
  if picks:
    panel.scatter(
        [c['kl_budget'] for c in picks],
        [c['win_rate'] for c in picks],
        marker='D',
        s=30,
        color='tab:green',
        zorder=6,
        label='chosen t per KL budget',
    )
  point = next(p for p in bon_points if p['n'] == n)
  if point[f'win_rate_{procedure}'] is not None:
    panel.scatter(
        [point['kl']],
        [point[f'win_rate_{procedure}']],
        marker='*',
        s=140,
        color='tab:orange',
        zorder=7,
        label='best-of-N policy (log transform, beta = 1/(N-1))',
    )

  panel.set_title(f'{_PROCEDURE_TITLES[procedure]}, N = {n}')
  panel.set_xlabel('KL(pi || pi_ref) [nats]')
  panel.set_ylabel(f'win rate under {_PROCEDURE_TITLES[procedure]}')
  panel.set_xlim(0.0, config.kl_max)
  panel.grid(alpha=0.3)


def _plot_procedure(rows, chosen, bon_points, procedure, config, path) -> None:
  ns = list(config.ns)
  columns = min(len(ns), 2)
  rows_of_panels = math.ceil(len(ns) / columns)
  figure, axes = plt.subplots(
      rows_of_panels,
      columns,
      figsize=(6.2 * columns, 4.6 * rows_of_panels),
      squeeze=False,
  )
  for panel, n in zip(axes.flat, ns, strict=False):
    _plot_panel(panel, rows, chosen, bon_points, procedure, n, config)

  for panel in list(axes.flat)[len(ns) :]:
    panel.set_visible(False)
  handles, labels = axes.flat[0].get_legend_handles_labels()
  figure.legend(
      handles,
      labels,
      loc='lower center',
      ncol=min(len(labels), 6),
      fontsize=8,
      frameon=False,
  )
  figure.suptitle(
      f'Calibrated-space trade-off: {_PROCEDURE_TITLES[procedure]} win rate '
      'against KL'
  )
  figure.tight_layout(rect=(0, 0.07, 1, 0.97))
  _save_figure(figure, path)


def _plot_standard(rows, bon_points, config, path) -> None:
  figure, panel = plt.subplots(figsize=(7.0, 5.0))
  methods = list(dict.fromkeys(r['method'] for r in rows))
  for method in methods:
    selected = sorted(
        (
            r
            for r in rows
            if r['procedure'] == 'standard'
            and r['method'] == method
            and r['kl'] <= config.kl_max
        ),
        key=lambda r: r['kl'],
    )
    if selected:
      panel.plot(
          [r['kl'] for r in selected],
          [r['win_rate'] for r in selected],
          label=_label(method),
          **_style(method),
      )
  panel.scatter(
      [p['kl'] for p in bon_points],
      [p['win_rate_standard'] for p in bon_points],
      marker='*',
      s=140,
      color='tab:orange',
      zorder=7,
      label='best-of-N policies: (log N - (N-1)/N, N/(N+1))',
  )
  for p in bon_points:
    panel.annotate(
        f'N={p["n"]}',
        (p['kl'], p['win_rate_standard']),
        textcoords='offset points',
        xytext=(5, -12),
        fontsize=8,
    )
  panel.set_xlabel('KL(pi || pi_ref) [nats]')
  panel.set_ylabel('standard win rate W_1')
  panel.set_xlim(0.0, config.kl_max)
  panel.set_title('Standard win rate against KL')
  panel.grid(alpha=0.3)
  panel.legend(fontsize=8, loc='lower right')
  figure.tight_layout()
  _save_figure(figure, path)


def run(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
  """Compute the curves, chosen t, best-of-N points and plots into workdir.

  Returns:
    final_step 0 and final_params_sha256 None (nothing is trained), and
    the path of every file written, under 'outputs'.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.time()
  rows = _curves(config)
  logging.info('Curves: %d rows in %.1f s', len(rows), time.time() - start)
  start = time.time()
  chosen = _chosen_t(config)
  logging.info('Chosen t: %d rows in %.1f s', len(chosen), time.time() - start)
  bon_points = _bon_points(config)

  outputs = {
      'curves_csv': workdir / 'curves.csv',
      'curves_json': workdir / 'curves.json',
      'chosen_t_csv': workdir / 'chosen_t.csv',
      'chosen_t_json': workdir / 'chosen_t.json',
      'bon_points_json': workdir / 'bon_points.json',
      'plot_standard': workdir / 'tradeoff_standard.png',
  }
  _write_csv(outputs['curves_csv'], _CURVE_FIELDS, rows)
  common.write_json_atomic(outputs['curves_json'], rows)
  _write_csv(outputs['chosen_t_csv'], _CHOSEN_FIELDS, chosen)
  common.write_json_atomic(outputs['chosen_t_json'], chosen)
  common.write_json_atomic(outputs['bon_points_json'], bon_points)
  _plot_standard(rows, bon_points, config, outputs['plot_standard'])
  for procedure in config.procedures:
    path = workdir / f'tradeoff_{procedure}.png'
    _plot_procedure(rows, chosen, bon_points, procedure, config, path)
    outputs[f'plot_{procedure}'] = path
  logging.info('Wrote %s', ', '.join(str(p) for p in outputs.values()))
  return {
      'final_step': 0,
      'final_params_sha256': None,
      'outputs': {k: str(v) for k, v in outputs.items()},
      'num_curve_rows': len(rows),
  }
