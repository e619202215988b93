"""Readouts you can trust: one count per buffer, credit by provenance, the peak explained,
lint for remat that silently does nothing."""

import json

import jax
import jax.numpy as jnp
import pytest
from _facts import TANH_DERIVATIVE

import remat_kit as rk
from remat_kit.__main__ import main
from remat_kit.report import activation_bytes, explain_peak, saved_residuals

try:
  import jax_cuda12_plugin  # noqa: F401
  HAVE_GPU = True
except ImportError:  # pragma: no cover
  HAVE_GPU = False


# --------------------------------------------------------------------------
# One buffer, one count
# --------------------------------------------------------------------------
def test_a_named_tanh_output_is_one_buffer():
  """h is the tanh output: kept once, with 1 - tanh**2 (129,024 bytes were reported)."""
  def f(w1, w2, x):
    h = rk.checkpoint_name(jnp.tanh(x @ w1), "h")
    return jnp.sum(h @ w2)

  args = jnp.ones((64, 168)), jnp.ones((168, 4)), jnp.ones((64, 64))
  assert activation_bytes(f, *args) == 86_016
  rows = [r for r in saved_residuals(f, *args) if r.kind == "activation"]
  assert sorted(r.primitive for r in rows) == sorted([TANH_DERIVATIVE, "tanh"])
  assert next(r for r in rows if r.primitive == "tanh").names == ("h",)


def test_a_buffer_reached_by_two_names_and_a_reshape_is_one_row_with_both_names():
  def f(w, v, x):
    y = jnp.exp(x @ w)  # exp's derivative reads y; a @ v and b * b read a and b: one buffer
    a = rk.checkpoint_name(y, "a")
    b = rk.checkpoint_name(y.reshape(-1), "b")
    return jnp.sum(a @ v) + jnp.sum(b * b)

  rows = [r for r in saved_residuals(f, jnp.ones((4, 4)), jnp.ones((4, 3)), jnp.ones((2, 4)))
          if r.kind == "activation"]
  assert len(rows) == 1 and set(rows[0].names) == {"a", "b"} and rows[0].bytes == 32


def test_a_cast_to_another_dtype_is_another_buffer():
  def f(w, x):
    y = rk.checkpoint_name(jnp.exp(x @ w), "y")
    yb = y.astype(jnp.bfloat16)
    return jnp.sum(y * y) + jnp.sum(yb * yb).astype(jnp.float32)

  rows = [r for r in saved_residuals(f, jnp.ones((4, 4)), jnp.ones((2, 4)))
          if r.kind == "activation"]
  assert {r.dtype for r in rows} == {"float32", "bfloat16"}


# --------------------------------------------------------------------------
# Credit by provenance
# --------------------------------------------------------------------------
def test_a_residual_made_outside_remat_is_not_credited_to_its_policy(remat_impl):
  """x @ w is computed outside the remat: shape matching used to credit it to the policy."""
  inner = rk.remat(lambda w, y: jnp.sum(jnp.sin(y @ w.T)), policy="full")
  g = lambda w, x: inner(w, (x @ w) ** 2)
  rep = rk.memory_report(g, jnp.ones((32, 32)), jnp.ones((16, 32)), live=False,
                         before_xla=True)
  # As compiled: the remat's input, and x @ w (which the square's derivative reads).
  acts = [r for r in rep.residuals if r.kind == "activation"]
  assert acts and not any("saved by policy" in r.rule for r in acts)
  rules = {r.primitive: r.rule for r in acts}
  assert rules["integer_pow"].startswith("the input of a remat")
  assert rules["dot_general"] == "kept by autodiff outside remat"
  # Before XLA, autodiff keeps 2 * (x @ w) instead; XLA keeps the product it came from.
  before = {r.primitive: r.rule for r in rep.residuals_before_xla if r.kind == "activation"}
  assert before["integer_pow"].startswith("the input of a remat")
  assert before["mul"] == "kept by autodiff outside remat"


def test_a_residual_saved_inside_a_scanned_remat_is_credited_to_its_name(remat_impl):
  def body(c, w):
    h = rk.checkpoint_name(c @ w, "pre")
    return jnp.tanh(h), None

  f = lambda ws, x: jnp.sum(rk.remat_scan(body, x, ws, policy="save:pre")[0])
  rep = rk.memory_report(f, jnp.ones((4, 8, 8)), jnp.ones((2, 8)), live=False)
  pre = [r for r in rep.residuals if "pre" in r.names]
  assert pre and all("saved by policy" in r.rule and "'pre'" in r.rule for r in pre)


# --------------------------------------------------------------------------
# explain_peak
# --------------------------------------------------------------------------
def _wide(w, x):
  y = rk.checkpoint_name(jnp.exp(x @ w), "wide")
  return jnp.sum(jnp.tanh(y) @ w.T)


WIDE_ARGS = (jax.ShapeDtypeStruct((256, 4096), jnp.float32),
             jax.ShapeDtypeStruct((2048, 256), jnp.float32))
WIDE_BYTES = 2048 * 4096 * 4


def _allocated(rep):
  """What the GPU compiler allocates for the step: `total_allocation_bytes` (JAX 0.12),
  else temp + arguments + output (JAX 0.10/0.11, whose `peak_memory_in_bytes` it was)."""
  c = rep.compiler
  return c.get("total_allocation", c["temp_size"] + c["argument_size"] + c["output_size"])


def _check_peak(rep, compiler_fields=True):
  d = rep.to_dict()
  assert set(d["rows"][0]) >= {"bytes", "name", "op", "kind", "source"}
  total = sum(r["bytes"] for r in d["rows"])
  assert abs(total - d["peak_bytes"]) <= 0.05 * d["peak_bytes"]
  assert d["peak_bytes"] <= _allocated(rep)
  json.dumps(d)


@pytest.mark.parametrize("target", [
    None, pytest.param("gpu:h100", marks=pytest.mark.skipif(not HAVE_GPU, reason="no CUDA"))])
def test_explain_peak_names_the_large_residual_and_adds_up(target):
  rep = explain_peak(_wide, *WIDE_ARGS, target=target, top=5, argnums=(0, 1))
  _check_peak(rep)
  assert rep.peak_bytes >= WIDE_BYTES
  saved = [r for r in rep.rows if r.kind == "saved residual"]
  assert saved and saved[0].bytes >= WIDE_BYTES
  assert saved[0].source.startswith("test_readouts.py:")
  if target is None:
    assert (saved[0].name, saved[0].op, saved[0].bytes) == ("wide", "exp", WIDE_BYTES)
  else:
    # XLA:GPU may keep the matmul (padded to its tile) and fuse `exp` into the kernels
    # that read it, forward and backward: then the matmul is the residual, untagged.
    assert (saved[0].name, saved[0].op) in (("wide", "exp"), (None, "dot_general"))
  assert rep.rows[-1].kind == "other"
  table = rep.table()
  assert table.index("saved residual") < table.index("instruction")  # kinds first


@pytest.mark.skipif(not HAVE_GPU, reason="no CUDA plugin")
@pytest.mark.parametrize("policy", ["no_remat", "full", "save:pre"])
def test_explain_peak_equals_the_h100_compilers_peak(policy):
  def body(c, w):
    h = rk.checkpoint_name(c @ w, "pre")
    return jnp.tanh(h) * 0.5 + c, None

  def loss(ws, x):
    return jnp.sum(rk.remat_scan(body, x, ws, policy=policy)[0] ** 2)

  args = (jax.ShapeDtypeStruct((6, 256, 256), jnp.float32),
          jax.ShapeDtypeStruct((512, 256), jnp.float32))
  rep = explain_peak(loss, *args, target="gpu:h100")
  _check_peak(rep)
  assert abs(rep.peak_bytes - _allocated(rep)) <= 0.01 * _allocated(rep)


def test_explain_peak_of_a_training_step_labels_optimizer_state():
  import optax
  opt = optax.adam(1e-3)
  w = jnp.ones((64, 256))
  state = opt.init(w)

  def step(w, state, x):
    g = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2))(w)
    upd, state = opt.update(g, state, w)
    return optax.apply_updates(w, upd), state

  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes dtypes
    rep = explain_peak(step, w, state, jnp.ones((128, 64)), grad=False,
                       arg_kinds=("parameter", "optimizer state", "input"),
                       out_kinds=("parameter", "optimizer state"))
  _check_peak(rep)
  assert {"parameter", "optimizer state", "input"} <= set(rep.by_kind)


def test_explain_peak_rejects_bad_arguments():
  with pytest.raises(ValueError, match="`top`"):
    explain_peak(_wide, *WIDE_ARGS, top=0)
  with pytest.raises(ValueError, match="`arg_kinds` has 1 entries"):
    explain_peak(_wide, *WIDE_ARGS, arg_kinds=("parameter",))
  with pytest.raises(ValueError, match="`argnums`"):
    explain_peak(_wide, *WIDE_ARGS, argnums=2)
  with pytest.raises(TypeError, match="`fn` must be callable"):
    explain_peak(3, *WIDE_ARGS)


def test_memory_report_reconciles_residuals_with_the_peak():
  rep = rk.memory_report(_wide, jnp.ones((256, 1024)), jnp.ones((512, 256)), live=False)
  line = rep.reconcile()
  assert line.startswith("peak ") and "saved residual" in line and "% of the peak" in line
  assert line in str(rep) and rep.to_dict()["peak"]["peak_bytes"] == rep.peak.peak_bytes


# --------------------------------------------------------------------------
# lint: silent no-ops
# --------------------------------------------------------------------------
def _mlp(after_gelu):
  def layer(p, x):
    if after_gelu:
      h = rk.checkpoint_name(jax.nn.gelu(x @ p["up"]), "hidden")
      return x + h @ p["down"]
    h = rk.checkpoint_name(x @ p["up"], "hidden")
    return x + jax.nn.gelu(h) @ p["down"]
  return layer


def _stack(layer):
  def loss(params, x):
    for p in params:
      x = layer(p, x)
    return jnp.sum(x)
  return loss


D = 32
PARAMS = [{"up": jnp.ones((D, 4 * D)) / D, "down": jnp.ones((4 * D, D)) / D}] * 3
X = jnp.ones((256, D))


def _codes(fn, *args, target=None):
  return [w.code for w in rk.lint(fn, *args, target=target)]


def test_lint_dominated_flags_a_name_after_the_nonlinearity_only():
  bad = _stack(rk.remat(_mlp(True), policy="save:hidden"))
  good = _stack(rk.remat(_mlp(False), policy="save:hidden"))
  assert "dominated" in _codes(bad, PARAMS, X)
  assert "dominated" not in _codes(good, PARAMS, X)
  msg = next(str(w) for w in rk.lint(bad, PARAMS, X) if w.code == "dominated")
  assert "pre-activation" in msg and "policy='full'" in msg


def test_lint_no_effect_when_the_compiler_keeps_what_remat_drops():
  """The lint fires exactly when the compiled temp does not shrink. XLA:CPU merged the
  recomputation back in a Python loop up to JAX 0.10 (not from 0.11 on); a scan keeps
  the saving on every version."""
  loop = _stack(rk.remat(_mlp(False), policy="full"))
  temp = lambda f: rk.report.compiled_memory(jax.grad(f), PARAMS, X)["temp_size"]
  undone = temp(loop) >= 0.99 * temp(_stack(_mlp(False)))
  assert ("no-effect" in _codes(loop, PARAMS, X)) == undone
  if undone:
    assert "XLA:CPU" in str(next(w for w in rk.lint(loop, PARAMS, X) if w.code == "no-effect"))
  # remat of a layer whose backward reads only its inputs saves nothing on any compiler
  linear = _stack(rk.remat(lambda p, x: x * jnp.mean(p["up"]), policy="full"))
  assert "no-effect" in _codes(linear, PARAMS, X)

  def body(x, p):
    return _mlp(False)(p, x), None

  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *PARAMS)
  scanned = lambda ps, x: jnp.sum(rk.remat_scan(body, x, ps, policy="full")[0])
  assert "no-effect" not in _codes(scanned, stacked, X)


def test_command_line_peak(tmp_path, capsys):
  case = tmp_path / "case.py"
  case.write_text(
      "import jax.numpy as jnp, remat_kit as rk\n"
      "def wide(w, x):\n"
      "  y = rk.checkpoint_name(jnp.exp(x @ w), 'wide')\n"
      "  return jnp.sum(jnp.tanh(y) @ w.T)\n"
      "def case():\n"
      "  return wide, (jnp.ones((64, 512)), jnp.ones((128, 64)))\n")
  out = tmp_path / "peak.json"
  assert main(["peak", f"{case}:case", "--top", "3", "--json", str(out)]) == 0
  text = capsys.readouterr().out
  assert "saved residual" in text and "wide" in text
  data = json.loads(out.read_text())
  assert next(iter(data.values()))["rows"][-1]["kind"] == "other"
  with pytest.raises(SystemExit, match="--top"):
    main(["peak", f"{case}:case", "--top", "0"])


@pytest.mark.parametrize("target", [
    None, pytest.param("gpu:h100", marks=pytest.mark.skipif(not HAVE_GPU, reason="no CUDA"))])
def test_explain_peak_finds_the_residuals_a_scanned_gpt_stacks(target):
  """Without remat, the residuals the layer scan stacks are the largest kind at the peak;
  full remat leaves a much smaller share of them."""
  from remat_kit.models import GPT
  tokens = jnp.zeros((4, 64), jnp.int32)
  params = GPT(128, 64, 64, 4, 4, policy=False).init(
      {"params": jax.random.key(0), "dropout": jax.random.key(1)}, tokens)["params"]

  def loss_for(policy):
    model = GPT(128, 64, 64, 4, 4, policy=policy)
    return lambda p: jnp.mean(model.apply({"params": p}, tokens,
                                          rngs={"dropout": jax.random.key(2)}) ** 2)

  plain = explain_peak(loss_for(False), params, target=target)
  full = explain_peak(loss_for(True), params, target=target)
  for rep in (plain, full):
    _check_peak(rep)
  assert max(plain.by_kind, key=plain.by_kind.get) == "saved residual"
  share = lambda r: r.by_kind.get("saved residual", 0) / r.peak_bytes
  assert share(full) < share(plain) / 2
  if target == "gpu:h100":
    assert abs(plain.peak_bytes - _allocated(plain)) <= 0.01 * plain.peak_bytes


def _scanned_mlp_loss(params, x, policy="save:hidden"):
  def layer(h, p):
    u = rk.checkpoint_name(h @ p["up"], "hidden")
    return h + jax.nn.gelu(u) @ p["down"], None
  return jnp.sum(jax.lax.scan(rk.remat(layer, policy=policy), x, params)[0])


SCANNED_MLP_ARGS = ({"up": jnp.ones((4, 128, 512)) / 128, "down": jnp.ones((4, 512, 128)) / 128},
                    jnp.ones((2048, 128)))


def test_bytes_reused_between_a_loop_output_and_its_next_value_are_not_one_buffer():
  """XLA:CPU put a backward temporary in the bytes of the forward loop's output before the
  backward loop's last write there: counted as one buffer, the peak came out 1 MiB over
  what the compiler allocates and explain_peak raised."""
  rep = explain_peak(_scanned_mlp_loss, *SCANNED_MLP_ARGS, fn_kwargs={"policy": "no_remat"})
  assert rep.peak_bytes == _allocated(rep)
  assert not [r for r in rep.rows if r.kind == "packing" and r.bytes < 0]


@pytest.mark.parametrize("policy", ["no_remat", "full", "save:hidden"])
def test_a_string_keyword_is_passed_as_it_is_not_traced(policy):
  rep = explain_peak(_scanned_mlp_loss, *SCANNED_MLP_ARGS, fn_kwargs={"policy": policy})
  mem = rk.report.compiled_memory(jax.grad(_scanned_mlp_loss), *SCANNED_MLP_ARGS,
                                  fn_kwargs={"policy": policy})
  assert rep.peak_bytes == _allocated(rep)
  assert mem["temp_size"] == rep.compiler["temp_size"]
  full = explain_peak(_scanned_mlp_loss, *SCANNED_MLP_ARGS, fn_kwargs={"policy": "full"})
  if policy == "no_remat":
    assert full.peak_bytes < rep.peak_bytes  # the string reached rk.remat: plans differ
