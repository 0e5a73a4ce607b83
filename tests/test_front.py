"""The front of an accuracy-versus-cost search and its files, from leaderboard rows."""

from __future__ import annotations

import csv
import dataclasses
import random
from pathlib import Path

import pytest

from coatnet import CoAtNetConfig
from coatnet.search.contracts import Candidate, Hyperparameters
from coatnet.search.front import (export_front, format_front, front_of, hypervolume_history,
                                  parse_pick, pick_best)
from coatnet.search.pareto import Objective
from coatnet.search.results import LeaderboardRow

OBJECTIVES = (Objective("val_accuracy", "max"), Objective("macs", "min"))


def _row(trial_id: str, status: str, accuracy: float | None, macs: int,
         width: int) -> LeaderboardRow:
    model = CoAtNetConfig(image_height=32, image_width=32, image_channel=1,
                          num_blocks_in_layers=[1, 1, 1, 1, 1],
                          block_type_in_layers=["C", "C", "T", "T"],
                          num_channels_in_layers=[16, 16, 32, width, width],
                          expand_scale_in_layers=2, heads=2, num_classes=10).to_dict()
    hparams = Hyperparameters(lr=1e-3, weight_decay=0.01, label_smoothing=0.0, batch_size=32,
                              warmup_epochs=0)
    candidate = Candidate(model=model, hparams=hparams, params=macs // 10, macs=macs)
    return LeaderboardRow(trial_id=trial_id, status=status, best_value=accuracy,
                          epochs_done=4 if status == "completed" else 2, params=macs // 10,
                          macs=macs, candidate=candidate, checkpoint=f"/ckpt/{trial_id}")


def _rows(seed: int) -> list[LeaderboardRow]:
    rng = random.Random(seed)
    statuses = ["completed"] * 4 + ["early-stopped"]
    return [_row(f"t{i:02d}", rng.choice(statuses), round(rng.uniform(0.5, 0.99), 3),
                 rng.choice([10**5, 3 * 10**5, 10**6, 3 * 10**6]), rng.choice([64, 128]))
            for i in range(25)]


@pytest.mark.parametrize("seed", range(4))
def test_front_rows_are_mutually_non_dominated_and_dominate_the_rest(seed: int) -> None:
    rows = _rows(seed)
    front = front_of(rows, OBJECTIVES, metric="val_accuracy")

    def dominates(a: LeaderboardRow, b: LeaderboardRow) -> bool:  # computed here, apart
        return (a.best_value >= b.best_value and a.macs <= b.macs
                and (a.best_value > b.best_value or a.macs < b.macs))

    assert front
    for a in front:
        assert a.status == "completed"
        assert not any(dominates(b, a) for b in front if b is not a)
    for row in rows:
        if row.status == "completed" and row not in front:
            assert any(dominates(f, row) or (f.best_value, f.macs) == (row.best_value, row.macs)
                       for f in front), row.trial_id
    assert [r.macs for r in front] == sorted(r.macs for r in front)


def test_export_writes_csv_configs_plot_and_hypervolume(tmp_path: Path) -> None:
    rows = [_row("cheap", "completed", 0.80, 10**5, 64),
            _row("big", "completed", 0.95, 10**6, 128),
            _row("worse", "completed", 0.70, 5 * 10**5, 64),
            _row("cut", "early-stopped", 0.60, 2 * 10**5, 64),
            _row("nan", "diverged", None, 3 * 10**5, 64)]
    files = export_front(rows, tmp_path, objectives=OBJECTIVES, metric="val_accuracy")
    assert [r.trial_id for r in files.front] == ["cheap", "big"]
    with files.pareto_csv.open() as handle:
        table = list(csv.DictReader(handle))
    assert [(r["trial_id"], float(r["best_val_accuracy"]), float(r["macs"])) for r in table] == \
        [("cheap", 0.80, 1e5), ("big", 0.95, 1e6)]
    for path in files.configs:
        assert CoAtNetConfig.from_yaml(path).num_channels_in_layers[-1] in (64, 128)
    assert files.plot is not None and files.plot.stat().st_size > 1000
    # reference (0, 1.1e6): cheap's box 0.8 x 1e6, big's extra 0.15 x 1e5
    assert files.reference == pytest.approx((0.0, 1.1e6))
    assert files.hypervolume == pytest.approx(0.8 * 1.0e6 + 0.15 * 1.0e5)


# ---------------------------------------------------------------------------- --pick
def test_pick_reads_clauses_and_refuses_what_it_cannot_use() -> None:
    rule = parse_pick("macs<=1e6, latency_ms < 5")
    assert [str(c) for c in rule] == ["macs<=1e+06", "latency_ms<5"]
    assert parse_pick(None) == () and parse_pick("  ") == ()
    for bad, says in (("test_accuracy>=0.9", "held-out"), ("flops<=1e6", "allowed"),
                      ("macs=1e6", "OP one of"), ("macs<=lots", "not a number"),
                      ("macs<=inf", "finite")):
        with pytest.raises(ValueError, match="--pick") as info:
            parse_pick(bad)
        assert says in str(info.value), (bad, str(info.value))


def test_pick_takes_the_most_accurate_front_member_under_the_rule() -> None:
    rows = [_row("big", "completed", 0.95, 3 * 10**6, 128),
            _row("mid", "completed", 0.90, 10**6, 64),
            _row("small", "completed", 0.80, 3 * 10**5, 64)]
    front = front_of(rows, OBJECTIVES, metric="val_accuracy")
    assert [r.trial_id for r in front] == ["small", "mid", "big"]
    assert pick_best(front, (), metric="val_accuracy", mode="max").trial_id == "big"
    assert pick_best(front, parse_pick("macs<=1e6"), metric="val_accuracy",
                     mode="max").trial_id == "mid"
    assert pick_best(front, parse_pick("macs<1e6"), metric="val_accuracy",
                     mode="max").trial_id == "small"
    assert pick_best(front, parse_pick("macs<1e5"), metric="val_accuracy", mode="max") is None


def test_hypervolume_history_grows_in_the_order_trials_ended() -> None:
    rows = [dataclasses.replace(_row("a", "completed", 0.5, 10**6, 64), ended_at=1.0),
            dataclasses.replace(_row("b", "early-stopped", 0.9, 10**5, 64), ended_at=2.0),
            dataclasses.replace(_row("c", "completed", 0.8, 10**6, 64), ended_at=3.0)]
    reference = (0.0, 2.0 * 10**6)
    history = hypervolume_history(rows, OBJECTIVES, metric="val_accuracy", reference=reference)
    assert [k for k, _ in history] == [1, 2, 3]
    # a: 0.5 x 1e6; b (early-stopped) adds nothing; c dominates a: 0.8 x 1e6
    assert [v for _, v in history] == pytest.approx([0.5e6, 0.5e6, 0.8e6])


def test_format_front_lists_members_cheapest_first() -> None:
    rows = [_row("big", "completed", 0.95, 3 * 10**6, 128),
            _row("small", "completed", 0.80, 3 * 10**5, 64)]
    text = format_front(front_of(rows, OBJECTIVES, metric="val_accuracy"),
                        objectives=OBJECTIVES, metric="val_accuracy")
    assert text.index("small") < text.index("big")
    assert "best_val_accuracy" in text and "macs" in text and "pareto/big.yaml" in text
