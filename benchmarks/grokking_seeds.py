"""Does notebook 01's grokking recipe grok for seeds nobody chose? One line per data/model seed pair.

The same model, split and full-batch AdamW as the notebook (no checkpoints, no analysis), test accuracy read every
`--eval-every` epochs. Prints, per pair, the first epoch at which test accuracy reaches 99% (or never), the final
test accuracy, how many test pairs stay wrong and how many of those have their mirror (b, a) among the training
pairs, the wall time, and the share of pairs that grokked.

    python benchmarks/grokking_seeds.py                          # the notebook's defaults (p = 41), 8 pairs
    python benchmarks/grokking_seeds.py --p 31 --weight-decay 2 --pairs 1,2 7,8
"""
from __future__ import annotations

import argparse
import time

import torch

from helpers.models.load import build_native_model
from helpers.tasks.modular import batch_loss, grokking_phases, make_data, train_test_metrics
from helpers.models.training import TrainConfig, train
from helpers.models.zoo import grokking_transformer_config

SEED_PAIRS = ((598, 999), (0, 0), (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12))


def parse_pair(text: str) -> tuple[int, int]:
    data_seed, model_seed = (int(part) for part in text.split(","))
    return data_seed, model_seed


def run(p: int, frac_train: float, lr: float, weight_decay: float, epochs: int, eval_every: int,
        data_seed: int, model_seed: int) -> dict:
    """Train one pair; the epoch test accuracy first reaches 99% (None if never) and what is left wrong."""
    torch.manual_seed(model_seed)
    data = make_data(p, "modular", frac_train=frac_train, seed=data_seed)
    model = build_native_model(grokking_transformer_config(d_vocab=p + 1, d_vocab_out=data.n_classes), seed=model_seed)
    config = TrainConfig(steps=epochs, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98), seed=model_seed,
                         frozen=("bias",), eval_every=eval_every)
    start = time.perf_counter()
    history = train(model, (data.tokens[data.train_indices], data.labels[data.train_indices]), batch_loss, config,
                    eval_fn=train_test_metrics(data), progress=False)
    seconds = time.perf_counter() - start
    test_loss, train_acc, test_acc = (torch.tensor(history.metric(name))
                                      for name in ("test_loss", "train_acc", "test_acc"))
    grokked = grokking_phases(torch.tensor(history.eval_steps), test_loss, train_acc, test_acc)["test accuracy 99%"]
    with torch.no_grad():
        predicted = model(data.tokens[data.test_indices])[:, -1].argmax(-1)
    wrong = data.test_indices[predicted != data.labels[data.test_indices]]        # rows a * p + b
    mirror = (wrong % p) * p + wrong // p                                        # the row of (b, a)
    trained_mirror = int(torch.isin(mirror, data.train_indices).sum())
    return dict(grokked=grokked, final=float(test_acc[-1]), wrong=len(wrong), trained_mirror=trained_mirror,
                n_test=len(data.test_indices), seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=int, default=41)
    parser.add_argument("--frac-train", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=3500)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--pairs", type=parse_pair, nargs="+", default=list(SEED_PAIRS),
                        help="data_seed,model_seed pairs (default: the eight of docs/robustness.md)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"p {args.p}, frac_train {args.frac_train}, lr {args.lr}, weight decay {args.weight_decay}, "
          f"{args.epochs} epochs, {args.threads} thread(s)")
    print("| data seed, model seed | test accuracy 99% at epoch | final test accuracy | test pairs wrong "
          "| of them with (b, a) trained | seconds |")
    print("|---|---|---|---|---|---|")
    grokked = 0
    for data_seed, model_seed in args.pairs:
        result = run(args.p, args.frac_train, args.lr, args.weight_decay, args.epochs, args.eval_every,
                     data_seed, model_seed)
        grokked += result["grokked"] is not None
        print(f"| {data_seed}, {model_seed} | {result['grokked'] or 'never'} | {result['final']:.1%} | "
              f"{result['wrong']} of {result['n_test']} | {result['trained_mirror']} | {result['seconds']:.0f} |",
              flush=True)
    print(f"grokked: {grokked}/{len(args.pairs)}")


if __name__ == "__main__":
    main()
