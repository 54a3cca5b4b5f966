"""Checks of the public API: names exist, are documented, and are callable."""

import inspect
import types

from absl.testing import absltest
from absl.testing import parameterized

import infalign_jax
from infalign_jax import analysis
from infalign_jax import base
from infalign_jax import calibration
from infalign_jax import procedures
from infalign_jax import transforms

_MODULES = (infalign_jax, analysis, base, calibration, procedures, transforms)


class PublicApiTest(parameterized.TestCase):

  @parameterized.parameters(*_MODULES)
  def test_all_names_exist_and_documented(self, module):
    self.assertTrue(module.__doc__, f'{module.__name__} has no docstring')
    for name in module.__all__:
      self.assertTrue(hasattr(module, name), f'{module.__name__}.{name}')
      value = getattr(module, name)
      is_constant = not (callable(value) or isinstance(value, types.ModuleType))
      if is_constant:
        continue
      self.assertTrue(
          inspect.getdoc(value), f'{module.__name__}.{name} has no docstring'
      )

  def test_names_from_the_issue(self):
    self.assertIs(
        infalign_jax.sort_reference_rewards,
        calibration.sort_reference_rewards,
    )
    self.assertIs(
        infalign_jax.calibrated_rewards, calibration.calibrated_rewards
    )
    self.assertIs(infalign_jax.make_transform, transforms.make_transform)
    self.assertIs(infalign_jax.win_rate, procedures.win_rate)
    self.assertIs(infalign_jax.analysis, analysis)
    for name in ('kl', 'win_rate', 'choose_t', 'optimal_transform'):
      self.assertIn(name, analysis.__all__)
    for module in ('calibration', 'transforms', 'procedures', 'analysis'):
      self.assertIn(module, infalign_jax.__all__)

  def test_signatures(self):
    parameters = inspect.signature(infalign_jax.win_rate).parameters
    self.assertEqual(
        list(parameters), ['policy_rewards', 'ref_rewards', 'procedure', 'n']
    )
    self.assertEqual(parameters['procedure'].default, 'standard')
    self.assertEqual(parameters['n'].default, 1)
    parameters = inspect.signature(analysis.win_rate).parameters
    self.assertEqual(
        list(parameters)[:4], ['transform', 'beta', 'procedure', 'n']
    )
    self.assertEqual(
        list(inspect.signature(analysis.choose_t).parameters)[:3],
        ['procedure', 'n', 'kl_budget'],
    )


if __name__ == '__main__':
  absltest.main()
