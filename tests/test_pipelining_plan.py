"""remat_kit.pipelining.plan: a pipelined training step compiled for a TPU that is not here."""

import jax
import jax.numpy as jnp
import optax
import pytest

import remat_kit as rk
from remat_kit.pipelining import largest_microbatch, plan_step, stage_mesh

D = 256


def _stage(p, h):  # two dense layers per stage, scanned with remat
  body = lambda c, w: (jnp.tanh(rk.checkpoint_name(c @ w, "pre")), None)
  return rk.remat_scan(body, h, p, policy="save:pre")[0]


def _params(lead):
  return jax.ShapeDtypeStruct(lead + (D, D), jnp.float32)


def _batch(n):
  return jax.ShapeDtypeStruct((n, 32, D), jnp.float32)


def test_plan_step_reads_each_stage_of_a_gpipe_step():
  with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes dtypes
    row = plan_step(_stage, _params((4, 2)), _batch(16), target="tpu:v5e:2x2",
                    microbatches=8, optimizer=optax.adam(1e-3))
  assert (row["stages"], row["fsdp"], row["iterations"]) == (4, 1, 11)
  assert row["bubble_fraction"] == round(3 / 11, 4)
  assert row["fits"] and row["microbatch_size"] == 2
  # A stage holds its own two layers, Adam's two moments and the gradient: >= 4 x 2 x D^2 x 4.
  assert row["argument_size"] >= 4 * 2 * D * D * 4
  assert row["estimated_seconds"] > 0 and "HBM" in row["estimate_source"]


def test_circular_has_fewer_idle_slots_and_fsdp_shards_the_stage():
  gpipe = plan_step(_stage, _params((4, 2)), _batch(16), target="tpu:v5e:2x2",
                    microbatches=8)
  circ = plan_step(_stage, _params((4, 2, 1)), _batch(16), target="tpu:v5e:2x2",
                   microbatches=8, schedule="circular", layers_per_stage=2)
  assert circ["bubble_fraction"] < gpipe["bubble_fraction"]
  two = plan_step(_stage, _params((2, 4)), _batch(16), target="tpu:v5e:2x2", fsdp=2,
                  microbatches=8)
  assert (two["stages"], two["fsdp"]) == (2, 2)
  # Each chip holds half of its stage's four layers.
  assert two["argument_size"] < 4 * D * D * 4 + 16 * 32 * D * 4


@pytest.mark.slow
def test_largest_microbatch_fits_the_budget_it_is_given():
  budget = 64 * 2**20
  best = largest_microbatch(_stage, _params((4, 2)), jax.ShapeDtypeStruct((32, D), jnp.float32),
                            target="tpu:v5e:2x2", microbatches=8, budget_bytes=budget,
                            verify=True)
  assert best["microbatch_size"] > 2
  assert best["verified"] and best["verified_row"]["peak_bytes"] <= budget
  line = best["fixed_bytes"] + best["bytes_per_example"] * best["microbatch_size"]
  assert line <= budget


def test_a_bad_fsdp_names_the_divisors():
  with pytest.raises(ValueError, match=r"`fsdp`=3 must divide the 8 devices.*\[1, 2, 4, 8\]"):
    stage_mesh("cpu", 3) if len(jax.devices()) == 8 else pytest.skip("needs 8 CPU devices")
