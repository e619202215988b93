"""remat_kit.planner (`rk.auto`) on the GPT stack: its plan fits the budget when compiled anew."""

import functools

import jax
import pytest

import remat_kit as rk
from remat_kit import models, policies
from remat_kit.planner import Roofline, Search, auto, parse_bytes

# A GPT stack whose activations dominate its compiled temp memory.
GPT = models.GPT(vocab_size=64, max_len=256, d_model=32, num_heads=4, num_layers=16)
TOKENS = jax.random.randint(jax.random.key(1), (4, 256), 0, 64)


@functools.cache
def _search():
  params = GPT.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, TOKENS)
  return Search(GPT, params["params"], TOKENS, max_subsets=2)


# Fixed presets and JAX built-ins, named as users would write them.
FIXED = {
    "full": "full", "save_dots": "save_dots", "save_dots_no_batch": "save_dots_no_batch",
    "jax dots_saveable": "dots_saveable", "save_qkv_attn_out": "save_qkv_attn_out",
}


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_auto_plan_fits_when_compiled_independently(fraction):
  search = _search()
  budget = int(fraction * search.none.activation_bytes)
  result = search.solve(budget)
  assert result.choice.temp_bytes <= budget
  # Rebuild the chosen plan outside the search and compile it: the budget holds there too,
  # so the search's bookkeeping (labels, cached measurements) did not pick a wrong plan.
  loss = search.build(result.choice.policy, result.choice.groups)
  fresh = rk.report.compiled_memory(jax.grad(loss), search.params)
  assert fresh["temp_size"] == result.choice.temp_bytes
  assert fresh["temp_size"] <= budget
  fixed = [search.measure(label, policies.from_config(p)) for label, p in FIXED.items()]
  fitting = [c for c in fixed if c.temp_bytes <= budget]
  best = min(fitting, key=lambda c: c.cost_s)
  print(f"\nbudget {fraction:.0%} of {search.none.activation_bytes / 2**20:.1f} MiB: auto chose "
        f"{result.choice.label} ({result.choice.temp_bytes / 2**20:.1f} MiB, roofline "
        f"{result.choice.cost_s * 1e3:.2f} ms, +{result.choice.recompute_pct:.1f}% FLOPs); best "
        f"fixed that fits: {best.label} ({best.temp_bytes / 2**20:.1f} MiB, "
        f"{best.cost_s * 1e3:.2f} ms); {len(fitting)}/{len(fixed)} fixed fit")
  assert [c.temp_bytes for c in result.pareto] == sorted(c.temp_bytes for c in result.pareto)


def test_infeasible_budget_gives_the_least_memory():
  with pytest.raises(ValueError, match=r"no plan fits `budget`=1,000 bytes.*least reached is"):
    _search().solve(1000)


def test_auto_entry_point_and_bad_inputs():
  from remat_kit.flax import LayerStack

  stack = LayerStack(models.HiddenLayer(32, 0.1), 4)
  x = jax.random.normal(jax.random.key(2), (64, 32))
  params = stack.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, True)
  params = params["params"]
  result = rk.auto(stack, params, x, True, budget="64MiB", roofline=Roofline(1e12, 1e11),
                   presets=("none", "full"), max_subsets=1)
  assert result.choice.temp_bytes <= 64 * 2**20
  assert {c.label for c in result.candidates} >= {"none", "full", "save:dense", "save:relu"}
  assert result.to_dict()["choice"]["label"] == result.choice.label
  with pytest.raises(ValueError, match=r"`budget` must be a positive number.*'4GiB'"):
    parse_bytes("4 lots")
  with pytest.raises(ValueError, match=r"`cost` must be 'auto', 'roofline', 'measured' or"):
    auto(stack, params, x, True, budget=1e9, cost="guess")
  with pytest.raises(TypeError, match="has no `policy` attribute"):
    auto(models.HiddenLayer(4), params, x, True, budget=1e9)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("jax_plugins.xla_cuda12"),
                    reason="no CUDA plugin for deviceless GPU compiles")
def test_auto_on_an_accelerator_target_uses_its_estimate():
  from remat_kit.flax import LayerStack

  stack = LayerStack(models.HiddenLayer(64, 0.1), 4)
  x = jax.random.normal(jax.random.key(2), (256, 64))
  params = stack.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, True)
  result = rk.auto(stack, params["params"], x, True, budget="1GiB", target="gpu:h100",
                   presets=("none", "full"), max_subsets=1)
  assert result.choice.temp_bytes <= 2**30
  assert {c.cost_kind for c in result.candidates} == {"estimated"}
  assert all(c.cost_s > 0 for c in result.candidates)
  with pytest.raises(ValueError, match="cost='measured' runs the step"):
    rk.auto(stack, params["params"], x, True, budget="1GiB", target="gpu:h100",
            cost="measured")
