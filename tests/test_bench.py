"""make bench as a user meets it: where it writes, Ctrl-C, --out, and timings read honestly."""

import json

import pytest

from experiments import _io, bench


def _row(strategy, temp, ms, spread):
  return {"model": "m", "strategy": strategy, "temp_bytes": temp, "step_ms_median": ms,
          "step_ms_spread": spread, "error": None}


def test_pareto_steps_only_on_speedups_beyond_the_timing_spread():
  rows = [_row("no remat", 100, 10.0, 0.5), _row("a", 60, 10.3, 0.5),
          _row("b", 50, 14.0, 0.5), _row("c", 55, 13.8, 0.5)]
  # From the least memory up: b; c is not faster than b beyond the spreads; a is;
  # no remat ties a on time and uses more memory.
  assert bench.pareto(rows) == ["b", "a"]
  # With tight spreads, no remat is faster than a beyond noise and stays.
  tight = [_row("no remat", 100, 10.0, 0.05), _row("a", 60, 10.3, 0.05)]
  assert bench.pareto(tight) == ["a", "no remat"]


def test_auto_check_names_a_fitting_strategy_that_beats_auto_beyond_noise():
  auto = dict(_row("auto 50%", 50, 12.0, 0.5), budget_bytes=60, auto_choice="save:x")
  fast_fits = _row("full", 55, 10.0, 0.5)
  fast_too_big = _row("no remat", 100, 8.0, 0.5)
  within_noise = _row("save_dots", 58, 11.5, 0.5)
  assert bench.auto_beaten([auto, fast_too_big, within_noise]) == []
  beaten = bench.auto_beaten([auto, fast_fits, fast_too_big])
  assert len(beaten) == 1 and beaten[0].startswith("auto 50% (save:x) is beaten by full")


def test_overhead_within_noise_is_shown_as_approximately_equal():
  base = _row("no remat", 100, 10.0, 0.5)
  assert bench.overhead_text(_row("x", 50, 9.8, 0.4), base) == "≈0.98"
  assert bench.overhead_text(_row("x", 50, 13.0, 0.4), base) == "1.30"


@pytest.mark.parametrize(("path", "says"), [
    ("/", "must end in .json"),
    ("results.txt", "must end in .json"),
    ("/proc/nope/r.json", "cannot write in '/proc/nope'"),
])
def test_out_is_checked_before_any_work(path, says, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(["--out", path, "--models", "mlp", "--also-target", "none"])
  assert e.value.code == 2 and says in capsys.readouterr().err


def test_a_directory_named_like_json_is_refused(tmp_path):
  d = tmp_path / "x.json"
  d.mkdir()
  assert "is a directory" in _io.check_out(d)


def test_default_output_is_the_ignored_local_folder():
  import subprocess
  ignored = subprocess.run(["git", "check-ignore", "-q", str(_io.LOCAL / "cpu-cpu.json")],
                           cwd=bench.RESULTS.parent.parent, check=False)
  assert ignored.returncode == 0


def test_ctrl_c_keeps_finished_models_and_exits_cleanly(tmp_path, monkeypatch, capsys):
  out = tmp_path / "r.json"
  real = bench.time_interleaved
  calls = []

  def interrupt_second_model(rows, repeats, max_rounds=0, budget_s=None):
    calls.append(rows[0]["model"])
    if len(calls) == 2:
      raise KeyboardInterrupt
    real(rows, 1, max_rounds=1)

  monkeypatch.setattr(bench, "time_interleaved", interrupt_second_model)
  code = bench.main(["--out", str(out), "--models", "mlp", "rnn", "--only", "no remat",
                     "full", "--auto", "--repeats", "1", "--also-target", "none"])
  assert code == 130
  err = capsys.readouterr().err
  assert "interrupted: the models finished so far are in" in err and "Traceback" not in err
  data = json.loads(out.read_text())
  assert data["complete"] is False and {r["model"] for r in data["rows"]} == {"mlp"}
  assert all("step_ms_median" in r for r in data["rows"])


@pytest.mark.slow
def test_where_auto_runs_the_rows_show_the_timings_it_chose_from(tmp_path):
  out = tmp_path / "r.json"
  code = bench.main(["--out", str(out), "--models", "mlp", "--only", "no remat", "full",
                     "--auto", "1.0", "--repeats", "1", "--also-target", "none",
                     "--time-budget", "5"])
  assert code == 0
  rows = json.loads(out.read_text())["rows"]
  assert all(r["timing_source"].startswith("auto's search: timed") for r in rows), rows
  from experiments.auto_plan import _SEARCHES

  search = next(s for k, s in _SEARCHES.items() if k.startswith("dropout MLP"))
  for r in rows:  # each row's timing is its candidate's in auto's search: one measurement
    cand = search.measured[r["auto_choice"]] if r.get("auto_choice") else \
        search.candidate(r["config"]["policy"], r["config"].get("levels"))
    assert r["step_ms_median"] == cand.cost_s * 1e3
    assert r["step_ms_spread"] == cand.cost_spread_s * 1e3
