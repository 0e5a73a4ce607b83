"""Resolution transfer and trial sources without Ray or MLflow: ``at_image_size``,
``evaluate_at_sizes`` on synthetic data, ``parse_sizes`` and the errors of ``resolve_trial``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coatnet import CoAtNetConfig, CoAtNetWithLinearClassifier
from coatnet.search.checkpoints import save_state
from coatnet.search.errors import SearchInputError
from coatnet.search.sources import resolve_trial
from coatnet.search.transfer import (at_image_size, evaluate_at_sizes, format_sizes,
                                     parse_sizes, sizes_table)

MODEL = dict(image_height=32, image_width=32, image_channel=3, num_classes=4,
             num_blocks_in_layers=[1, 1, 1, 1, 1], num_channels_in_layers=[8, 8, 16, 16, 16],
             block_type_in_layers=["C", "C", "T", "T"], expand_scale_in_layers=2, head_dim=8)
DATA = dict(dataset="synthetic", image_size=32, num_classes=4, image_channel=3,
            num_samples=160, val_fraction=0.25, test_fraction=0.25)


def trained_model() -> CoAtNetWithLinearClassifier:
    torch.manual_seed(0)
    model = CoAtNetWithLinearClassifier(CoAtNetConfig.from_dict(MODEL))
    with torch.no_grad():  # tables that are not constant, so interpolation shows
        for attention in model.relative_attentions():
            attention.relative_bias_table.normal_()
    return model.eval()


def test_at_image_size_stores_tables_for_the_new_size_and_matches_the_dynamic_path() -> None:
    model = trained_model()
    moved = at_image_size(model, 48)
    assert moved.config.image_height == moved.config.image_width == 48
    assert model.config.image_height == 32  # the source is untouched
    # 48 px: S3 is 3x3 and S4 2x2, so their tables are 5x5 and 3x3
    assert [tuple(a.relative_bias_table.shape[-2:]) for a in moved.relative_attentions()] == \
        [(5, 5), (3, 3)]
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():  # the source interpolates inside its forward; the same numbers
        assert torch.allclose(moved.eval()(images), model(images), atol=1e-5)
    state = moved.state_dict()
    again = CoAtNetWithLinearClassifier(moved.config)
    again.load_state_dict(state)  # builds and loads like a model made at 48 px
    assert at_image_size(model, 32) is not model  # same size: a copy


def test_evaluate_at_sizes_gives_a_row_per_size_with_the_trained_one_marked() -> None:
    rows = evaluate_at_sizes(trained_model(), data=DATA, seed=0, sizes=[32, 48, 64])
    assert [r.image_size for r in rows] == [32, 48, 64]
    for row in rows:
        assert 0.0 <= row.val_accuracy <= 1.0 and row.test_accuracy is not None
        assert row.latency_ms > 0 and row.device.startswith("cpu")
        assert row.trained_size == 32
    table = sizes_table(rows, stage="before")
    assert table["image_size"] == [32, 48, 64] and table["stage"] == ["before"] * 3
    text = format_sizes(rows)
    assert "32px" in text and "(trained)" in text and "64px" in text


@pytest.mark.parametrize("text, message", [("32,abc", "whole numbers"), ("", "at least one"),
                                           ("32,16", "16 px is below")])
def test_bad_image_sizes_name_the_flag(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="--image-sizes") as err:
        parse_sizes(text)
    assert message in str(err.value)
    assert parse_sizes("32, 48,64") == (32, 48, 64)


def test_resolve_trial_reads_a_checkpoint_with_its_trial_settings(tmp_path: Path) -> None:
    model = trained_model()
    trial_dir = tmp_path / "trial_abc"
    save_state({"epoch": 3, "model": model.state_dict(), "model_config": MODEL},
               trial_dir / "checkpoint_000002")
    config = {"candidate": {"model": MODEL, "hparams": {"lr": 0.01}}, "data": DATA,
              "trial": {"epochs": 3}, "seed": 5, "latency": None}
    (trial_dir / "params.json").write_text(json.dumps(config))
    source = resolve_trial(str(trial_dir / "checkpoint_000002"))
    assert source.trial_id == "abc" and source.image_size == 32
    assert source.trial["seed"] == 5 and source.trial["data"] == DATA
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source.model()(images), model(images))
    assert source.experiment_dir is None  # no search_state.json above it


def test_resolve_trial_errors_say_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(SearchInputError, match="no such directory"):
        resolve_trial(str(tmp_path / "missing"))
    with pytest.raises(SearchInputError, match="not an experiment directory"):
        resolve_trial(str(tmp_path))
    lone = tmp_path / "lone"
    save_state({"epoch": 1, "model": trained_model().state_dict(), "model_config": MODEL},
               lone)
    with pytest.raises(SearchInputError, match="params.json"):
        resolve_trial(str(lone))  # a checkpoint without its trial's settings
    with pytest.raises(SearchInputError, match="--trial"):
        resolve_trial(str(lone), trial_id="x")  # --trial needs an experiment directory
    (tmp_path / "search_state.json").write_text("{}")
    with pytest.raises(SearchInputError, match="leaderboard.csv"):
        resolve_trial(str(tmp_path))  # a search that has not finished
