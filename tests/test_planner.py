"""remat_kit.planner (`rk.auto`): a complete search, honest costs, fit and monotone guarantees."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import remat_kit as rk
from remat_kit import models
from remat_kit.planner import Candidate, Roofline, Search, auto, choose, parse_bytes
from remat_kit.policies import from_config, registered

# A scanned stack whose activations dominate its compiled temp memory, with three names.
X = jnp.linspace(-1, 1, 1024 * 64).reshape(1024, 64)
WS = {"w1": jnp.full((6, 64, 256), 0.02), "w2": jnp.full((6, 256, 64), 0.02)}


def build(policy, levels):
  def loss(ws):
    def body(c, w):
      h = rk.checkpoint_name(c @ w["w1"], "up")
      g = rk.checkpoint_name(jnp.tanh(h), "act")
      y = rk.checkpoint_name(g @ w["w2"], "down")
      return c + jnp.sin(y), None
    out, _ = rk.remat_scan(body, X, ws, policy=policy, levels=levels)
    return jnp.mean(out ** 2)
  return loss


@functools.cache
def _search():
  return Search(build, WS, search="exhaustive")


@pytest.mark.slow
def test_the_search_is_complete_and_every_candidate_is_costed_honestly():
  search = _search()
  search.solve(search.none.temp_bytes)  # times every candidate
  labels = {c.label for c in search.measured.values()}
  names = ("act", "down", "up")
  subsets = {"save:" + ",".join(c) for r in (1, 2, 3) for c in itertools.combinations(names, r)}
  assert search.names == list(names) and search.exact
  # Every subset of the names, each policy once (an equal preset may carry the label).
  policies = {c.policy for c in search.measured.values() if c.levels is None}
  for s in subsets:
    assert from_config(s) in policies, s
  # Every registered preset that applies (its names are tagged; no offload without host memory).
  for p in registered():
    pol = from_config(p)
    if not pol.referenced_names() - set(names) and not pol.offloads:
      assert pol in policies, p
  assert {"full + nested (2 levels)", "full + nested (3 levels)"} <= labels
  assert not any(c.source == "offload" for c in search.measured.values())  # CPU: no host memory
  for c in search.measured.values():
    assert c.cost_kind == "measured" and c.cost_s > 0 and c.cost_spread_s >= 0
    assert c.cost_source.startswith("timed: median of")


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.75])
def test_the_plan_fits_when_compiled_anew(fraction):
  search = _search()
  budget = int(fraction * search.none.temp_bytes)
  result = search.solve(budget)
  assert result.choice.temp_bytes <= budget
  loss = build(result.choice.policy, result.choice.levels)
  fresh = rk.report.compiled_memory(jax.grad(loss), WS)
  assert fresh["temp_size"] == result.choice.temp_bytes <= budget
  # Nothing that fits is faster beyond the timing noise.
  fits = [c for c in result.candidates if c.temp_bytes <= budget]
  ch = result.choice
  assert not any(c.cost_s + c.cost_spread_s < ch.cost_s - ch.cost_spread_s for c in fits)
  assert [c.temp_bytes for c in result.pareto] == sorted(c.temp_bytes for c in result.pareto)


def test_a_larger_budget_never_returns_a_plan_beaten_by_the_smaller_budgets_plan():
  search = _search()
  budgets = sorted({c.temp_bytes for c in search.measured.values()})
  chosen = [search.solve(b).choice for b in budgets]
  for small, large in itertools.pairwise(chosen):
    assert not small.cost_s + small.cost_spread_s < large.cost_s - large.cost_spread_s


@pytest.mark.slow
def test_budget_in_peak_bytes():
  search = _search()
  budget = int(0.6 * search.none.peak_bytes)
  result = search.solve(budget, budget_kind="peak")
  assert result.choice.peak_bytes <= budget < search.none.peak_bytes
  assert result.to_dict()["budget_kind"] == "peak"
  with pytest.raises(ValueError, match="`budget_kind` must be 'temp'"):
    search.solve(budget, budget_kind="live")


def _cand(i, nbytes, cost, spread):
  return Candidate(f"c{i}", None, None, "names", nbytes, nbytes, 0, 0, 0.0, cost, spread,
                   "measured", "")


candidate_sets = st.lists(st.tuples(st.integers(1, 100), st.floats(1.0, 100.0),
                                    st.floats(0.0, 10.0)), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(candidate_sets, st.integers(1, 100), st.integers(1, 100), st.booleans())
def test_choose_fits_and_is_monotone(raw, b1, b2, exact_costs):
  cands = [_cand(i, n, c, 0.0 if exact_costs else s) for i, (n, c, s) in enumerate(raw)]
  small, large = sorted((b1, b2))
  a, b = choose(cands, small), choose(cands, large)
  for ch, budget in ((a, small), (b, large)):
    fits = [c for c in cands if c.temp_bytes <= budget]
    assert (ch is None) == (not fits)
    if ch is not None:
      assert ch.temp_bytes <= budget
  if a is not None:
    assert b is not None
    if exact_costs:
      assert b.cost_s <= a.cost_s  # estimates: never a costlier plan
    else:
      assert not a.cost_s + a.cost_spread_s < b.cost_s - b.cost_spread_s


def test_infeasible_budget_gives_the_least_memory():
  with pytest.raises(ValueError, match=r"no plan fits `budget`=1,000 bytes.*least reached is"):
    _search().solve(1000)


def test_auto_entry_point_and_bad_inputs():
  from remat_kit.flax import LayerStack

  stack = LayerStack(models.HiddenLayer(32, 0.1), 4)
  x = jax.random.normal(jax.random.key(2), (64, 32))
  params = stack.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, True)
  params = params["params"]
  result = rk.auto(stack, params, x, True, budget="64MiB", presets=("no_remat", "full"), levels=(),
                   search="exhaustive")
  assert result.choice.temp_bytes <= 64 * 2**20
  assert {c.label for c in result.candidates} >= {"no_remat", "full", "save:dense", "save:relu",
                                                  "save:dense,dropout,relu"}
  assert result.to_dict()["choice"]["label"] == result.choice.label
  with pytest.raises(ValueError, match=r"`budget` must be a positive number.*'4GiB'"):
    parse_bytes("4 lots")
  with pytest.raises(ValueError, match=r"`cost` must be one of"):
    auto(stack, params, x, True, budget=1e9, cost="guess")
  with pytest.raises(ValueError, match=r"`levels` are nesting levels, ints >= 2"):
    auto(stack, params, x, True, budget=1e9, levels=(1,))
  with pytest.raises(ValueError, match=r"`flops_per_s` must be a positive number"):
    Roofline(0.0, 1e9)
  with pytest.raises(TypeError, match="has no `policy` attribute"):
    auto(models.HiddenLayer(4), params, x, True, budget=1e9)


def test_a_roofline_is_calibrated_and_labelled():
  r = Roofline.measure(repeats=3)
  assert r.flops_per_s > 0 and r.bytes_per_s > 0 and r.source.startswith("measured on")
  search = Search(build, WS, cost="roofline", roofline=r, presets=("no_remat", "full"),
                  max_names_exact=0, levels=(), search="exhaustive")
  c = search.full
  assert c.cost_kind == "roofline" and "measured on" in c.cost_source and c.cost_s > 0


@pytest.mark.slow
def test_auto_on_an_accelerator_target_uses_its_estimate_and_offloads():
  from remat_kit.flax import LayerStack

  stack = LayerStack(models.HiddenLayer(64, 0.1), 4)
  x = jax.random.normal(jax.random.key(2), (256, 64))
  params = stack.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, True)
  result = rk.auto(stack, params["params"], x, True, budget="1GiB", target="gpu:h100",
                   presets=("no_remat", "full"), max_names_exact=1, max_subsets=1, levels=(),
                   search="exhaustive")
  assert result.choice.temp_bytes <= 2**30
  assert {c.cost_kind for c in result.candidates} == {"estimated"}
  assert all(c.cost_s > 0 and "roofline sum" in c.cost_source for c in result.candidates)
  assert {"offload:dense", "offload:dense,dropout,relu"} <= {c.label for c in result.candidates}
  with pytest.raises(ValueError, match="cost='measured' runs the step"):
    rk.auto(stack, params["params"], x, True, budget="1GiB", target="gpu:h100",
            cost="measured")


def test_auto_on_a_chain_of_uneven_layers():
  widths = [128, 256, 128, 384, 128, 256, 128, 256, 128, 192, 128]
  ws = [jnp.full((a, b), 0.01) for a, b in itertools.pairwise(widths)]
  layers = [lambda w, h: jnp.tanh(h @ w)] * len(ws)
  x = jnp.ones((512, widths[0]))
  plain = rk.report.compiled_memory(jax.grad(lambda ws, x: jnp.sum(
      functools.reduce(lambda h, w: jnp.tanh(h @ w), ws, x))), ws, x)["temp_size"]
  budget = int(0.6 * plain)
  result = rk.auto(layers, ws, x, budget=budget)
  assert result.choice.temp_bytes <= budget and result.choice.source == "chain"
  assert result.plan is not None and result.plan.bound_budget is not None
  # The plan, compiled on its own (remat kept on CPU), fits; its gradients are the plain ones.
  opts = {"xla_disable_hlo_passes": "cse_barrier_expander"}
  loss = lambda ws, x: jnp.sum(result.fn(ws, x))
  fresh = jax.jit(jax.grad(loss)).lower(ws, x).compile(opts).memory_analysis()
  assert fresh.temp_size_in_bytes <= budget
  want = jax.grad(lambda ws, x: jnp.sum(functools.reduce(lambda h, w: jnp.tanh(h @ w), ws, x)))
  chex.assert_trees_all_close(jax.grad(loss)(ws, x), want(ws, x), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="one entry of `params` per layer"):
    rk.auto(layers, ws[:2], x, budget=budget)


def test_a_tie_broken_by_memory_is_timed_again_first(monkeypatch):
  """Where the memory tie-break would pick a plan over a faster median, those plans are
  timed again by themselves; a tie that was noise separates, and the faster plan wins."""
  from remat_kit.planner import search as search_mod
  from remat_kit.report.timing import Timing

  medians = {"no_remat": 10.0, "save:up": 10.5, "save:act": 10.9, "save:down": 11.0, "full": 11.5}
  calls = []

  def fake(steps, repeats, budget_s=None):
    calls.append(sorted(steps))
    spread = 1.0 if len(calls) == 1 else 0.1  # the first pass cannot tell them apart
    return {k: Timing(medians.get(k, 12.0) * 1e-3, spread * 1e-3, repeats) for k in steps}

  monkeypatch.setattr(search_mod, "time_interleaved", fake)
  search = Search(build, WS, presets=[], max_names_exact=0, levels=(), search="exhaustive")
  # First pass: all tied, so the largest budget would get the least memory (full remat).
  everything = search.none.temp_bytes
  res = search.solve(everything)
  # calls: the first pass, its confirmation, then the knapsack subsets' pass (and theirs).
  assert len(calls) >= 2 and set(calls[1]) <= set(calls[0])
  assert {"no_remat", "full"} <= set(calls[1])
  assert res.choice.label == "no_remat"  # separated by the second pass: the fastest wins
  assert "re-timed among" in search.none.cost_source
  assert search.solve(search.full.temp_bytes).choice.label == "full"
  # Solving again re-times no contender set a second time: the re-timing is bounded.
  n = len(calls)
  search.solve(everything)
  search.solve(search.full.temp_bytes)
  assert len(calls) == n


def test_a_timing_budget_bounds_every_pass(monkeypatch):
  """With time_budget_s, each pass gets what is left; once spent, no tie is re-timed and
  every candidate still has a cost (one round)."""
  from remat_kit.planner import search as search_mod
  from remat_kit.report.timing import Timing

  budgets = []

  def fake(steps, repeats, budget_s=None):
    budgets.append(budget_s)
    __import__("time").sleep(0.05)
    return {k: Timing(1e-3, 1e-3, 1) for k in steps}  # all tied, unreliable

  monkeypatch.setattr(search_mod, "time_interleaved", fake)
  search = Search(build, WS, presets=[], max_names_exact=0, levels=(), time_budget_s=0.04,
                  search="exhaustive")
  search.solve(search.none.temp_bytes)
  assert budgets[0] == pytest.approx(0.04)
  assert search.time_left_s < 0
  assert all(b == pytest.approx(1e-3) for b in budgets[1:])  # spent: the floor, one round
  assert all(c.cost_s is not None for c in search.measured.values())
  with pytest.raises(ValueError, match=r"`time_budget_s` must be a positive number.*-1"):
    Search(build, WS, presets=[], max_names_exact=0, levels=(), time_budget_s=-1)


@pytest.mark.slow
def test_auto_on_a_model_written_without_remat_kit():
  """A Python-loop Flax model with boxed (nn.Partitioned) params and no policy/levels
  attributes, its inputs as ShapeDtypeStructs, planned for the H100 compiler: the build
  takes only the policy, so no nested plans are tried, and nothing is closed over."""
  import flax.linen as nn
  import optax

  from remat_kit.models import TransformerLM

  cfg = dict(vocab_size=256, emb_dim=64, num_heads=2, num_layers=2, mlp_dim=256, max_len=64,
             deterministic=True)
  tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  with jax.numpy_dtype_promotion("standard"):
    params = jax.eval_shape(
        lambda: TransformerLM(**cfg).init(jax.random.key(0), jnp.ones((2, 64), jnp.int32)))
  assert any(isinstance(x, nn.Partitioned) for x in jax.tree_util.tree_leaves(
      params, is_leaf=lambda x: isinstance(x, nn.Partitioned)))

  def build(policy):
    lm = TransformerLM(**cfg, remat=rk.to_jax_policy(policy))

    def loss(params, tokens):
      logits = lm.apply(params, tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
    return loss

  with jax.numpy_dtype_promotion("standard"):
    search = Search(build, params, tokens, target="gpu:h100", max_names_exact=0)
    none, full = search.none, search.full
    res = search.solve((none.temp_bytes + full.temp_bytes) // 2)
  assert full.temp_bytes < none.temp_bytes
  assert res.choice.temp_bytes <= (none.temp_bytes + full.temp_bytes) // 2
  assert not any("nested" in c.label for c in res.candidates)
  assert all(c.cost_kind == "estimated" for c in res.candidates)
  with pytest.raises(ValueError, match="ShapeDtypeStructs"):
    Search(build, params, tokens, max_names_exact=0)  # measured locally: needs arrays


def _dropout_stack(policy, prng="threefry"):
  """A scanned stack with dropout whose loss averages over the batch: the PRNG impl
  is a build option."""
  def loss(ws, x, key):
    if prng != "threefry":
      key = jax.random.key(jax.random.bits(key, dtype=jnp.uint32), impl=prng)

    def body(c, w):
      h = rk.checkpoint_name(jnp.tanh(c @ w["w1"]), "up")
      keep = jax.random.bernoulli(jax.random.fold_in(key, 0), 0.9, h.shape)
      return c + jnp.where(keep, h, 0.0) @ w["w2"], None
    out, _ = rk.remat_scan(body, x, ws, policy=policy)
    return jnp.mean(out ** 2)
  return loss


def test_microbatches_and_options_are_searched_with_every_plan():
  """Each plan is compiled at every slice count and build option, slices lower the peak,
  no budget gives the fastest plan, and `least_memory` answers the other question from
  the same costs."""
  x, key = X[:512], jax.random.key(0)
  search = Search(_dropout_stack, WS, x, key, presets=["full"], max_names_exact=0,
                  microbatches=(1, 4), options={"prng": ("threefry", "unsafe_rbg")},
                  repeats=3)
  res = search.solve(None, budget_kind="peak")
  labels = {c.label for c in res.candidates}
  assert {"no_remat", "full", "no_remat x4 microbatches", "full x4 microbatches, prng=unsafe_rbg",
          "save:up x4 microbatches, prng=unsafe_rbg"} <= {lb.replace(", prng=threefry", "")
                                                          for lb in labels}
  assert len(labels) == 3 * 2 * 2  # (no_remat, full, save:up) x slices x prngs
  sliced = search.candidate(False, None, 4)
  whole = search.candidate(False, None, 1)
  assert sliced is not None and whole is not None
  assert sliced.microbatches == 4 and sliced.activation_bytes is None
  assert dict(sliced.options) == {"prng": "threefry"}
  assert search.candidate("full", None, 4, prng="unsafe_rbg").options == (("prng", "unsafe_rbg"),)
  assert sliced.peak_bytes < whole.peak_bytes
  assert not any(rk.report.timing.faster(c.timing, res.choice.timing) for c in res.candidates)
  small = res.least_memory(100.0)
  assert small.peak_bytes == min(c.peak_bytes for c in res.candidates)
  assert res.least_memory(1.0).cost_s <= search.none.cost_s
  with pytest.raises(ValueError, match="max_slowdown"):
    res.least_memory(0.5)


def test_microbatch_and_option_arguments_are_checked():
  x, key = X[:512], jax.random.key(0)
  with pytest.raises(ValueError, match="does not divide loss argument 1"):
    Search(_dropout_stack, WS, x, key, microbatches=(1, 3))
  with pytest.raises(ValueError, match="`microbatches` must be"):
    Search(_dropout_stack, WS, x, key, microbatches=0)
  with pytest.raises(ValueError, match="PRNG keys are split"):
    Search(_dropout_stack, WS, x, key, microbatches=(2,), batch_argnums=(2,))
  with pytest.raises(ValueError, match=r"options\['prng'\]"):
    Search(_dropout_stack, WS, x, key, options={"prng": "unsafe_rbg"})
  with pytest.raises(ValueError, match="searches itself"):
    Search(_dropout_stack, WS, x, key, options={"policy": ("full",)})
  with pytest.raises(ValueError, match="chain of layers"):
    auto([lambda p, x: x], [{}], x, budget="1GiB", microbatches=(2,))


# --------------------------------------------------------------------------
# search="model": plans costed from the per-tensor graph, a few compiles to verify
# --------------------------------------------------------------------------
@pytest.mark.slow
def test_the_model_search_compiles_few_plans_and_is_as_good_as_the_exhaustive_one():
  kw = dict(target="gpu:h100", presets=("no_remat", "full", "save_dots", "save_dots_no_batch"),
            levels=())
  exhaustive = Search(build, WS, search="exhaustive", per_tensor=False, **kw)
  fast = Search(build, WS, **kw)
  assert fast.mode == "model" and list(fast.measured) == ["full"]  # full remat: calibration
  # Every plan is costed from the graph, and a plan's predicted bytes are what JAX saves.
  assert {"save_dots", "save:act", "save:act,down,up", "offload:up"} <= set(fast.predicted)
  for label in ("full", "save_dots", "save:up"):
    p = fast.predicted[label]
    measured = rk.report.saved_residuals(build(from_config(label), None), WS)
    assert p.saved_bytes == sum(r.bytes for r in measured if r.kind == "activation"), label
  budget = (exhaustive.none.temp_bytes + exhaustive.full.temp_bytes) // 2
  best = exhaustive.solve(budget).choice
  got = fast.solve(budget)
  assert got.choice.temp_bytes <= budget
  assert got.choice.cost_s <= best.cost_s * (1 + 1e-9)
  assert len(fast.measured) <= 5 < len(exhaustive.measured)
  if got.choice.source == "per-tensor":  # the loss with the plan applied
    chex.assert_trees_all_close(jax.grad(got.fn)(WS), jax.grad(build(False, None))(WS),
                                rtol=1e-5, atol=1e-6)


def test_search_options_are_checked():
  with pytest.raises(ValueError, match="`search` must be 'auto', 'model' or 'exhaustive'"):
    Search(build, WS, search="fast")
  with pytest.raises(ValueError, match="search='model' costs plans of the step as written"):
    Search(_dropout_stack, WS, X[:512], jax.random.key(0), microbatches=(1, 2), search="model")
  with pytest.raises(TypeError, match="`per_tensor` must be a bool"):
    Search(build, WS, per_tensor="yes")
