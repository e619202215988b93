"""The seeds' demo: same model both ways, the seed's output line, `best` within its limits."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import mlp_memory
from remat_kit import models

TINY = ["--batch", "256", "--din", "16", "--width", "32"]


def test_the_pre_activation_layout_is_the_seed_model():
  """PreActMLP regroups the seed's ops (ReLU -> Dropout -> Dense per unit): same function."""
  x = jax.random.normal(jax.random.key(0), (8, 12))
  seed = models.CheckpointedMLP(width=16, checkpoint=False)
  p = seed.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x)["params"]
  hidden = [p[f"hidden_{i}"]["Dense_0"] for i in range(4)]
  q = {"input": p["input"]["Dense_0"],
       "hidden": {"layers": {"Dense_0": jax.tree.map(lambda *a: jnp.stack(a), *hidden)}},
       "output": {"Dense_0": p["output"]}}
  for policy in (False, "full"):
    ours = mlp_memory.PreActMLP(16, policy=policy)
    np.testing.assert_allclose(ours.apply({"params": q}, x, False),
                               seed.apply({"params": p}, x, False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["false", "true"])
def test_prints_the_seed_line_and_what_the_peak_is_made_of(mode, tmp_path, capsys):
  out = tmp_path / "r.json"
  assert mlp_memory.main(["--checkpoint", mode, *TINY, "--json", str(out)]) == 0
  text = capsys.readouterr().out
  m = re.search(r"^Peak memory: ([\d.]+) MB with Checkpoint = (True|False)$", text, re.M)
  assert m and m.group(2) == mode.capitalize()
  assert "how: XLA:CPU reserves" in text and "made of: parameters" in text
  data = json.loads(out.read_text())
  assert abs(data["peak_bytes"] / 2**20 - float(m.group(1))) < 0.06
  if mode == "true":
    assert 0 < data["memory_ratio"] < 1.0 and "x the peak without checkpointing" in text
    assert data["time_ratio"] > 0 and "step time" in text


@pytest.mark.slow
def test_best_reports_both_ratios_and_equal_gradients(tmp_path, capsys):
  out = tmp_path / "best.json"
  # A short timing budget: the test checks the choice follows the timings, not their precision.
  assert mlp_memory.main(["--checkpoint", "best", *TINY, "--time-budget", "15", "--json",
                          str(out)]) == 0
  text = capsys.readouterr().out
  assert "Peak memory:" in text and "with Checkpoint = best" in text
  assert "step time" in text and "PyTorch torch.utils.checkpoint: 7.07 -> 5.05 GB" in text
  data = json.loads(out.read_text())
  # rk.auto tried every plan at every slice count and with either dropout PRNG
  cands = data["candidates"]
  assert {c["microbatches"] for c in cands} == set(mlp_memory.MICROBATCHES)
  assert {c["prng"] for c in cands} == set(mlp_memory.PRNGS)
  assert {"SaveNothing()", "SavePrimitives(primitives=('lt',))"} <= {c["policy"] for c in cands}
  chosen = next(c for c in data["candidates"] if c["label"] == data["chosen"])
  fits = [c for c in data["candidates"] if c["time_ratio"] <= mlp_memory.TIME_LIMIT]
  if fits:  # the least memory among those within the time limit
    assert chosen["memory_ratio"] == min(c["memory_ratio"] for c in fits)
  assert data["gradient_max_abs_diff"] < 1e-5


@pytest.mark.parametrize(("bad", "says"), [
    (["--json", "/"], "--json '/': must be a file in an existing directory"),
    (["--json", "/no/such/dir/x.json"], "must be a file in an existing directory"),
    (["--batch", "0"], "--batch must be positive, got 0"),
    (["--target", "tpu:v9"], "tpu:v9"),
])
def test_bad_arguments_fail_before_any_work(bad, says, capsys):
  with pytest.raises((SystemExit, ValueError)) as e:
    mlp_memory.main(["--checkpoint", "true", *bad])
  assert says in capsys.readouterr().err + str(e.value)


def test_checkpoint_takes_true_false_or_best(capsys):
  with pytest.raises(SystemExit):
    mlp_memory.main(["--checkpoint", "maybe"])
  assert "--checkpoint takes true, false, best or plain, got 'maybe'" in capsys.readouterr().err
