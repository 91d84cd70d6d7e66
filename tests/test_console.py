"""The console while the ranks run (runner.console on the ranks, runner.driver.console in the driver) and the verdict
a completed run ends with (runner.driver.verdict), on hand-made launcher output and summaries."""

from __future__ import annotations

import io
import json

import pytest

from runner import console
from runner.driver.console import Console
from runner.driver.verdict import verdict

TRACEBACK = """[rank0]: Traceback (most recent call last):
[rank0]:   File "/x/runner/worker.py", line 36, in main
[rank0]:     getattr(importlib.import_module(module), function)(cfg, run_dir, dist)
[rank0]:   File "/x/my_rewards.py", line 2, in raises
[rank0]:     return 1 / 0
[rank0]: ZeroDivisionError: division by zero
[rank0]:
[rank0]: The above exception was the direct cause of the following exception:
[rank0]:
[rank0]: Traceback (most recent call last):
[rank0]:   File "/x/runner/rewards/common.py", line 40, in score
[rank0]: ValueError: reward function raises raised ZeroDivisionError
[2026-11-30 19:38:35,660] [ERROR] [launch.py:325:sigkill_handler] exits with return code = 1
[rank1]: Traceback (most recent call last):
[rank1]: RuntimeError: Connection reset by peer
"""


def marked(**event) -> str:
    return console.MARK + json.dumps(event) + "\n"


def screen() -> tuple[Console, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return Console(out, err), out, err


def test_only_marked_lines_reach_the_console_and_the_bar_shows_what_rank_0_sends():
    con, out, err = screen()
    for text in [
        "[2026-11-30 19:38:35,660] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile\n",
        "[transformers] OPTForSequenceClassification LOAD REPORT\n",
        marked(bar="sft", total=40, n=0),
        "Writing model shards: 100%|##########| 1/1\n",
        marked(n=20, post={"loss": "3.977"}),
        "worker-1: " + marked(line="step 20: eval loss 3.6687"),  # (a multi-node launcher's host prefix)
        marked(line="note: waiting for the lock", err=True),
        marked(n=40, post={"loss": "3.119"}),
        marked(end=True),
    ]:
        con.feed(text)
    con.close()
    assert out.getvalue().splitlines() == ["step 20: eval loss 3.6687"]
    shown = err.getvalue()
    assert "note: waiting for the lock" in shown and "40/40" in shown and "loss=3.119" in shown
    assert "hostfile" not in shown + out.getvalue() and "LOAD REPORT" not in shown and "shards" not in shown
    assert con.failure()[-1] == "Writing model shards: 100%|##########| 1/1"  # (the tail, when there is no traceback)


def test_a_failure_shows_the_first_traceback_to_its_last_chained_exception():
    con, out, err = screen()
    for text in TRACEBACK.splitlines(keepends=True):
        con.feed(text)
    lines = con.failure()
    assert lines[-1] == "ValueError: reward function raises raised ZeroDivisionError"  # not rank 1's lost connection
    assert "ZeroDivisionError: division by zero" in lines and "[rank0]" not in "".join(lines)
    plain, _, _ = screen()  # (DeepSpeed's launcher passes a rank's lines as they are)
    for text in TRACEBACK.replace("[rank0]: ", "").replace("[rank0]:", "").splitlines(keepends=True):
        plain.feed(text)
    assert plain.failure() == lines
    assert out.getvalue() == err.getvalue() == ""  # shown once, by the driver's record of the failure


def test_lines_the_log_could_not_keep_are_shown():
    con, out, err = screen()
    con.feed("[INFO] something DeepSpeed said\n", echo=True)
    assert err.getvalue() == "[INFO] something DeepSpeed said\n"


def test_the_bar_shows_loss_reward_and_kl(capsys):
    bar = console.Progress("ppo", 60, 0, every_s=3600)  # (no event from advance within the hour)
    bar.show({"actor_loss": 0.123456, "reward_mean": 1.5, "kl": 0.02, "lr": 1e-5})
    bar.advance(3)
    bar.close()
    events = [console.parse(x) for x in capsys.readouterr().out.splitlines()]
    assert events[0] == {"bar": "ppo", "total": 60, "n": 0}
    assert events[-2] == {"n": 3, "post": {"loss": "0.1235", "reward": "1.5", "kl": "0.02"}}
    assert events[-1] == {"end": True} and len(events) == 4
    assert console.parse("no mark here") is None and console.parse(console.MARK + "not json") is None


SFT = {
    "steps": 400,
    "objective_name": "loss",
    "objective": 1.0047,
    "objective_mode": "min",
    "eval_perplexity": 2.731,
    "eval_first": {"step": 100, "loss": 1.4417, "perplexity": 4.2278},
}


def test_the_verdict_says_how_much_the_objective_improved():
    assert verdict(SFT) == [
        "held-out loss: 1.005 (from 1.442 at step 100: -0.437, -30.3%, better); perplexity 2.731 (from 4.228)"
    ]
    reward = {"steps": 150, "objective_name": "accuracy", "objective": 0.9, "objective_mode": "max"}
    reward |= {"eval_first": {"step": 50, "accuracy": 0.8}, "best": {"accuracy": 0.95}}
    assert verdict(reward, "reward") == [
        "reward: held-out accuracy: 0.9 (from 0.8 at step 50: +0.1, +12.5%, better); "
        "best 0.95, kept in checkpoints/best"
    ]
    assert verdict({"objective_name": "loss", "objective": 2.0}) == ["held-out loss: 2"]  # (an older summary)


def test_the_verdict_warns_when_it_got_worse():
    worse = verdict({**SFT, "objective": 1.6, "eval_perplexity": 4.95})
    assert worse[0].endswith("+11.0%, worse); perplexity 4.95 (from 4.228)")
    assert worse[1].startswith("warning: held-out loss got worse during training (1.442 at step 100 -> 1.6 at step")
    ppo = {"steps": 60, "objective_name": "reward_mean", "objective": 1.3, "objective_mode": "max"}
    ppo |= {"eval_reward_initial": 1.45, "eval_reward_final": 1.3, "eval_reward_gain": -0.15, "eval_judge": "tiny"}
    lines = verdict(ppo, "ppo")
    assert lines[0] == "ppo: held-out reward (tiny): 1.450 before training -> 1.300 after (-0.150)"
    assert lines[1].startswith("warning: ppo: the trained policy's answers") and len(lines) == 2


@pytest.mark.parametrize("value", [1.4417, None])
def test_no_change_and_no_value_say_no_more_than_they_know(value):
    lines = verdict({**SFT, "objective": value})
    same = "held-out loss: 1.442 (unchanged since step 100); perplexity 2.731 (from 4.228)"
    assert lines == ([] if value is None else [same])
