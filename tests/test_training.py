"""The generic training loop: deterministic, resumable, respects frozen parameters, learns."""
from __future__ import annotations

import os
import pickle
import time

import pytest
import torch

from helpers.core import cache
from helpers.models import training
from helpers.models.load import build_native_model
from helpers.tasks.modular import accuracy, batch_loss, grokking_phases, last_position_loss, make_data, train_test_metrics
from helpers.models.training import TrainConfig, list_checkpoints, train
from helpers.models.zoo import grokking_transformer_config

DATA = make_data(7, "modular", frac_train=0.6, seed=0)
CONFIG = grokking_transformer_config(d_vocab=8, d_vocab_out=7, d_model=16, d_head=4, d_mlp=32)


def loss_fn(model, batch):
    tokens, labels = batch
    return last_position_loss(model(tokens), labels)


def fresh_model():
    return build_native_model(CONFIG, seed=0, device="cpu")


def data():
    return DATA.tokens[DATA.train_indices], DATA.labels[DATA.train_indices]


def weights(model):
    return {name: value.clone() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("batch_size", [None, 8])
def test_same_seed_gives_identical_weights(batch_size):
    config = TrainConfig(steps=15, lr=1e-2, batch_size=batch_size, seed=1)
    first, second = fresh_model(), fresh_model()
    train(first, data(), loss_fn, config, progress=False)
    train(second, data(), loss_fn, config, progress=False)
    for name, value in weights(first).items():
        assert torch.equal(value, weights(second)[name]), name


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    config = TrainConfig(steps=20, lr=1e-2, batch_size=8, seed=2, checkpoint_every=10, eval_every=5)
    evaluate = lambda model: {"loss": loss_fn(model, data())}  # noqa: E731
    straight = fresh_model()
    straight_result = train(straight, data(), loss_fn, config, eval_fn=evaluate, checkpoint_dir=tmp_path / "a",
                            progress=False)

    interrupted = fresh_model()
    half = TrainConfig(**{**config.__dict__, "steps": 10})
    train(interrupted, data(), loss_fn, half, eval_fn=evaluate, checkpoint_dir=tmp_path / "b", progress=False)
    resumed = fresh_model()  # a new process would start from scratch and find the checkpoint
    resumed_result = train(resumed, data(), loss_fn, config, eval_fn=evaluate, checkpoint_dir=tmp_path / "b",
                           progress=False)

    assert [step for step, _ in list_checkpoints(tmp_path / "b")] == [10, 20]
    assert resumed_result.train_losses == straight_result.train_losses
    assert resumed_result.eval_steps == [5, 10, 15, 20]
    for name, value in weights(straight).items():
        assert torch.equal(value, weights(resumed)[name]), name


def test_a_checkpoint_loads_back_weights_only(tmp_path):
    config = TrainConfig(steps=2, lr=1e-2, batch_size=8, checkpoint_every=2, eval_every=1)
    model = fresh_model()
    train(model, data(), loss_fn, config, eval_fn=lambda m: {"loss": loss_fn(m, data())}, checkpoint_dir=tmp_path,
          progress=False)
    restored = fresh_model()
    checkpoint = training.load_checkpoint(restored, list_checkpoints(tmp_path)[-1][1])
    assert set(checkpoint) == {"step", "model", "optimizer", "history", "config"}
    assert TrainConfig(**checkpoint["config"]) == config
    assert training.TrainResult(**checkpoint["history"]).eval_steps == [1, 2]
    torch.optim.AdamW(restored.parameters()).load_state_dict(checkpoint["optimizer"])
    for name, value in weights(model).items():
        assert torch.equal(value, weights(restored)[name]), name


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_forged_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"model": {}, "step": RunsAShellCommand(marker)}, tmp_path / "step_0000001.pt")
    with pytest.raises(pickle.UnpicklingError):
        training.load_checkpoint(fresh_model(), tmp_path / "step_0000001.pt")
    assert not marker.exists()


def test_training_removes_stale_temp_files_of_killed_checkpoint_writes(tmp_path):
    stale, in_flight = tmp_path / ".step_0000001.pt-k1ll3d00", tmp_path / ".step_0000001.pt-wr1t1ng0"
    for file in (stale, in_flight):
        file.write_bytes(b"half a checkpoint")
    long_ago = time.time() - 2 * cache.STALE_AFTER_S
    os.utime(stale, (long_ago, long_ago))
    train(fresh_model(), data(), loss_fn, TrainConfig(steps=1, checkpoint_every=1), checkpoint_dir=tmp_path,
          progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [in_flight.name, "step_0000001.pt"]


def test_frozen_parameters_do_not_move_and_loss_falls():
    model = fresh_model()
    before = weights(model)
    result = train(model, data(), loss_fn, TrainConfig(steps=60, lr=1e-2, frozen=("bias",)), progress=False)
    after = weights(model)
    biases = [name for name in before if "bias" in name]
    assert biases and all(torch.equal(before[name], after[name]) for name in biases)
    assert any(not torch.equal(before[name], after[name]) for name in before if "bias" not in name)
    assert result.train_losses[-1] < 0.5 * result.train_losses[0]


def test_minibatches_cover_each_epoch_exactly_once():
    seen = torch.cat([training.batch_indices(step, 20, 5, seed=3) for step in range(4)])
    assert sorted(seen.tolist()) == list(range(20))
    assert not torch.equal(training.batch_indices(0, 20, 5, seed=3), training.batch_indices(4, 20, 5, seed=3))


def test_cosine_schedule_warms_up_and_decays():
    config = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine")
    assert training.lr_factor(0, config) == pytest.approx(0.1)
    assert training.lr_factor(10, config) == pytest.approx(1.0)
    assert training.lr_factor(99, config) == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=5, lr=0), dict(steps=5, batch_size=0),
                                 dict(steps=5, lr_schedule="linear"), dict(steps=5, eval_every=0)])
def test_impossible_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_grokking_phases_are_read_off_the_curves():
    epochs = torch.arange(1, 11)
    test_loss = torch.tensor([4.0, 5.0, 6.0, 7.0, 3.0, 1.5, 0.8, 0.2, 0.005, 0.001])
    train_acc = torch.tensor([0.2, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    test_acc = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.5, 0.9, 0.995, 1.0, 1.0])
    phases = grokking_phases(epochs, test_loss, train_acc, test_acc)
    assert phases == {"train accuracy 100%": 3, "test loss peak": 4, "test loss < 1": 7, "test accuracy 99%": 8,
                      "test loss < 0.01": 9}
    memorised = grokking_phases(epochs, test_loss + 2, train_acc, test_acc * 0.9)
    assert memorised["test accuracy 99%"] is None and memorised["test loss < 1"] is None


def test_grokking_metrics_and_batch_loss_match_the_loss_on_each_split():
    model = fresh_model()
    result = train(model, data(), batch_loss, TrainConfig(steps=3, lr=1e-2, eval_every=3),
                   eval_fn=train_test_metrics(DATA), progress=False)
    with torch.no_grad():
        logits = model(DATA.tokens)
    test = DATA.test_indices
    assert result.metric("test_loss")[-1] == pytest.approx(last_position_loss(logits[test], DATA.labels[test]).item())
    assert result.metric("train_acc")[-1] == pytest.approx(accuracy(logits[DATA.train_indices],
                                                                    DATA.labels[DATA.train_indices]))
    assert batch_loss(model, data()).item() == pytest.approx(loss_fn(model, data()).item())
