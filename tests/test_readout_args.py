"""One argument convention for every readout: ``fn(*args, **fn_kwargs)``, the readout's own
options as keywords, ``argnums`` where a gradient is taken, ``static_argnames`` for keywords
that must stay Python values; errors name the readout the user called."""

import jax
import jax.numpy as jnp
import pytest

import remat_kit as rk
from remat_kit import _args
from remat_kit.report import compiled_memory, count_flops, flop_breakdown, saved_residuals


def loss(w, x, *, scale=1.0, train=False):
  h = jnp.tanh(x @ w) * scale
  if train:  # a Python branch: `train` must be static
    h = jnp.sin(h)
  return jnp.sum(h**2)


W, X = jnp.ones((64, 64)) / 64, jnp.ones((32, 64))

# Each readout as the user calls it: (name, call(fn, *args, **options)).
READOUTS = [
    ("memory_report", lambda f, *a, **k: rk.memory_report(f, *a, live=False, **k)),
    ("explain_peak", rk.explain_peak),
    ("memory_timeline", rk.memory_timeline),
    ("lint", rk.lint),
    ("compare", lambda f, *a, **k: rk.compare({"f": f}, *a, live=False, **k)),
    ("saved_residuals", saved_residuals),
    ("flop_breakdown", flop_breakdown),
    ("count_flops", lambda f, *a, **k: count_flops(f, *a, **k)),
    ("compiled_memory", lambda f, *a, **k: compiled_memory(jax.grad(f), *a, **k)),
]
TAKES_ARGNUMS = {"memory_report", "explain_peak", "memory_timeline", "lint", "compare",
                 "saved_residuals", "flop_breakdown"}


@pytest.mark.parametrize("api,call", READOUTS, ids=[n for n, _ in READOUTS])
def test_every_readout_takes_fn_kwargs_and_static_argnames(api, call):
  # A traced float and a static bool, both passed the same way to every readout.
  call(loss, W, X, fn_kwargs={"scale": 2.0, "train": True}, static_argnames=("train",))
  # Python scalars the caller passes are traced: a Python branch on one fails (JAX's
  # error) until it is named static.
  with pytest.raises(jax.errors.TracerBoolConversionError):
    call(loss, W, X, fn_kwargs={"train": True})
  # A keyword of the function given as the readout's own is refused, naming the readout.
  with pytest.raises(TypeError, match=rf"`{api}`: got unexpected keyword arguments \['scale'\]"
                     r".*fn_kwargs="):
    call(loss, W, X, scale=2.0)
  with pytest.raises(TypeError, match=rf"`{api}`: `static_argnames` must be"):
    call(loss, W, X, static_argnames=3)


@pytest.mark.parametrize("api,call", [r for r in READOUTS if r[0] in TAKES_ARGNUMS],
                         ids=sorted(TAKES_ARGNUMS, key=[n for n, _ in READOUTS].index))
def test_every_gradient_readout_checks_argnums_in_its_own_name(api, call):
  with pytest.raises(ValueError, match=rf"`{api}`: `argnums` 5 must index the 2 positional"):
    call(loss, W, X, argnums=5)
  with pytest.raises(ValueError, match=rf"`{api}`: `argnums` must be an int"):
    call(loss, W, X, argnums="w")


def test_static_keywords_change_the_program_and_traced_ones_do_not():
  base = count_flops(loss, W, X, fn_kwargs={"scale": 1.0})
  assert count_flops(loss, W, X, fn_kwargs={"scale": 3.0}) == base  # traced: same program
  train = count_flops(loss, W, X, fn_kwargs={"train": True}, static_argnames="train")
  assert train == base + W.shape[0] * X.shape[0]  # one sin per element
  fb = flop_breakdown(loss, W, X, argnums=(0, 1), fn_kwargs={"train": True},
                      static_argnames=("train",))
  assert fb["forward"] == train


def test_the_rule_itself():
  def f(a, b, s, *, flag=True, mode="x"):
    return a

  bound = _args.bind("api", f, (1.0, jnp.ones(2), "name"), {"flag": False, "mode": "y"},
                     static_argnames=("flag",), argnums=(0, 1))
  # A Python float the caller passes is traced; a str is static; a named keyword is static.
  assert bound.args[0] == 1.0 and len(bound.args) == 2 and bound.positions == (0, 1)
  assert bound.kwargs == {} and bound.argnums == (0, 1)
  with pytest.raises(ValueError, match=r"`api`: `argnums` names argument 2, a str"):
    _args.bind("api", f, (1.0, jnp.ones(2), "name"), {}, argnums=2)
  with pytest.raises(TypeError, match="`api`: `fn` must be callable, got 3"):
    _args.bind("api", 3, (), {})


@pytest.mark.parametrize("check,value,message", [
    (lambda v: _args.int_at_least("f", "top", v, 1), 0, r"`f`: `top` must be an int >= 1, got 0"),
    (lambda v: _args.int_at_least("f", "top", v, 1), True, r"`f`: `top` must be an int >= 1"),
    (lambda v: _args.positive_seconds("f", "time_limit", v), -1.0,
     r"`f`: `time_limit` must be a positive number of seconds"),
])
def test_the_shared_validators(check, value, message):
  with pytest.raises(ValueError, match=message):
    check(value)


# --------------------------------------------------------------------------
# One reader of the compiled program: compiles counted with jax.monitoring
# --------------------------------------------------------------------------
_COMPILES: list[str] = []
_LISTENING = [False]


def _on_duration(event, duration, **_):
  if _LISTENING[0] and event == "/jax/core/compile/backend_compile_duration":
    _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def _compiles(thunk):
  _COMPILES.clear()
  _LISTENING[0] = True
  try:
    thunk()
  finally:
    _LISTENING[0] = False
  return len(_COMPILES)


@pytest.mark.parametrize("target", [None, "gpu:h100"])
def test_memory_report_compiles_once_and_the_other_readouts_reuse_it(target):
  def fresh(w, x):  # a new function object: nothing cached from other tests
    return loss(w, x, scale=0.5)

  assert _compiles(lambda: rk.memory_report(fresh, W, X, target=target)) == 1
  assert _compiles(lambda: rk.explain_peak(fresh, W, X, target=target)) == 0
  assert _compiles(lambda: rk.memory_timeline(fresh, W, X, target=target)) == 0
  # Another readout's options are another program: compiled once more, and only once.
  assert _compiles(lambda: rk.explain_peak(fresh, W, X, target=target, argnums=(0, 1))) == 1
