"""What fine-tuning the whole EfficientNet-Lite0 reaches on a data set, and what it costs on this CPU.

A study, not a pipeline stage: the trainer trains a tail on cached activations of a frozen prefix
(at most the last units). This script answers what the whole network, trained end to end from the
decoded images, gets over a head on the frozen trunk (same rows, same test split), at which
resolution, and in how many minutes on the machine it runs on.

Data as in ``trainer_learning.py`` (same loader, same splits; its "mixed" labels at ``--size 224``,
its feature size): a stratified test split of 20 % with true labels, never seen before the end;
``--labels mixed`` gives 20 % of the rest people's labels (half of them the validation split) and
auto-labels the others with a logistic regression on frozen ImageNet features (confidence = its
probability, used as the row's weight); ``--labels people`` trains on the same people's labels only
(no auto-labels); ``--labels true`` gives every pool item its label (10 % of it is the validation split).

Training: every parameter, AdamW with a one-cycle schedule (10 % warm-up, cosine decay) sized for
``--max-epochs``, class-balanced cross-entropy times the row's weight (normalized by the class
weights of the batch), a random dihedral view of each image (``--views dihedral``; ``none`` for sets
with an upright), channels-last, batch 32 (a last batch of one image joins the one before it); the
state with the lowest validation loss is kept (patience ``--patience`` epochs). The trainer's ``fit``
differs in two ways: it keeps the highest validation accuracy (loss breaking ties), and normalizes
the loss by class times row weights. Test: accuracy at the argmax with its exact 95 % interval, per-class recall,
for ELPV the accuracy at the highest test threshold keeping defect recall >= 0.95; each also averaged
over the eight dihedral views (TTA), and for a frozen-trunk reference (logistic regression on the
ImageNet features of the same training rows, same weights, same test split, no views;
``--max-epochs 0`` measures only it).

    python benchmarks/finetune_full.py --dataset elpv --labels mixed --size 224
    python benchmarks/finetune_full.py --dataset digits --labels mixed --size 64

Prints a table and writes benchmarks/results/finetune-full-<dataset>-<labels>-<size>-<views>-s<seed>.json
(``-reference`` added with ``--max-epochs 0``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_name
from PIL import Image
from trainer_learning import load_images, mixed_labels, scores, true_labels

from dlforge.common.intervals import clopper_pearson
from dlforge.vision.images import DIHEDRAL_VIEWS, to_array, to_tensor
from dlforge.vision.networks import build_network, spec_of

ARCH = "efficientnet_lite0"
RESULTS = Path(__file__).resolve().parent / "results"


def decode_all(blobs: list[bytes], size: int) -> np.ndarray:
    """uint8 N x size x size x 3 (gray replicated), resized once."""
    return np.stack([to_array(Image.open(io.BytesIO(b)), size=size, channels=3) for b in blobs])


def tensor(pixels: np.ndarray, size: int) -> torch.Tensor:
    spec = dataclasses.replace(spec_of(ARCH), input_size=size)
    return to_tensor(pixels, spec).contiguous(memory_format=torch.channels_last)


def predict(net: torch.nn.Module, pixels: np.ndarray, size: int, views: list[str]) -> np.ndarray:
    """Softmax averaged over ``views`` (each applied to the whole batch)."""
    net.eval()
    out = []
    with torch.inference_mode():
        for v in views:
            moved = np.ascontiguousarray(DIHEDRAL_VIEWS[v](pixels))
            p = [torch.softmax(net(tensor(moved[lo:lo + 64], size)), 1) for lo in range(0, len(moved), 64)]
            out.append(torch.cat(p).numpy())
    return np.mean(out, axis=0)


def val_loss(net: torch.nn.Module, pixels: np.ndarray, y: np.ndarray, size: int) -> tuple[float, float]:
    proba = predict(net, pixels, size, ["identity"])
    loss = float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None)).mean())
    return loss, float((proba.argmax(1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["elpv", "digits", "fashion-mnist"], default="elpv")
    parser.add_argument("--limit", type=int, default=100_000, help="class-stratified subset size (default: all)")
    parser.add_argument("--labels", choices=["mixed", "people", "true"], default="mixed")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--views", choices=["dihedral", "none"], default="dihedral")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--max-minutes", type=float, default=40.0, help="training time cap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()

    blobs, labels, classes = load_images(args.dataset, args.limit, args.seed)
    index = {c: i for i, c in enumerate(classes)}
    y_all = np.array([index[lab] for lab in labels])
    # the same stratified 20 % test split as trainer_learning.make_manifest
    rng = np.random.default_rng(args.seed + 1)
    is_test = np.zeros(len(labels), dtype=bool)
    for k in range(len(classes)):
        members = np.flatnonzero(y_all == k)
        is_test[rng.choice(members, size=round(0.2 * len(members)), replace=False)] = True
    t0 = time.perf_counter()
    pixels = decode_all(blobs, args.size)
    decode_seconds = time.perf_counter() - t0
    pool_rows, test_rows = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    y_pool = y_all[pool_rows]

    torch.manual_seed(args.seed)
    net = build_network(ARCH, len(classes), pretrained=True).to(memory_format=torch.channels_last)
    net.eval()
    with torch.inference_mode():  # frozen ImageNet features: the auto-labeler's and the reference's
        feats = np.concatenate([net.backbone(tensor(pixels[lo:lo + 64], args.size)).numpy()
                                for lo in range(0, len(pixels), 64)])
    if args.labels in ("mixed", "people"):
        lab, conf, people, val_mask = mixed_labels(feats[pool_rows], y_pool, people_fraction=0.2, seed=args.seed)
    else:
        lab, conf, people, val_mask = true_labels(y_pool, seed=args.seed)
    auto = ~people
    auto_acc = float((lab[auto] == y_pool[auto]).mean()) if auto.any() else None
    tr = np.flatnonzero(~val_mask & (people if args.labels == "people" else True))
    va = np.flatnonzero(val_mask)
    train_px, train_y, train_w = pixels[pool_rows[tr]], lab[tr], conf[tr].astype(np.float32)
    val_px, val_y = pixels[pool_rows[va]], y_pool[va]
    test_px, test_y = pixels[test_rows], y_all[test_rows]
    counts = np.bincount(train_y, minlength=len(classes)).astype(np.float64)
    class_w = torch.tensor(len(train_y) / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32)
    print(f"{args.dataset} at {args.size} px: train {len(tr)} ({int(auto[tr].sum())} auto-labeled, "
          f"auto-label accuracy {auto_acc}), val {len(va)} (people), test {len(test_rows)}; "
          f"CPU {cpu_name()}, {args.threads} threads", flush=True)

    positive = "defect" if args.dataset == "elpv" else None
    # the reference: what a head on the frozen trunk gets from the same rows (logistic regression,
    # class-balanced, the rows' confidence as weights), on the same test split
    from sklearn.linear_model import LogisticRegression

    ftr = feats[pool_rows[tr]]
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    probe = LogisticRegression(max_iter=3000, C=0.1, class_weight="balanced")
    probe.fit((ftr - mu) / sd, train_y, sample_weight=train_w)
    ref_proba = np.zeros((len(test_rows), len(classes)))
    ref_proba[:, probe.classes_] = probe.predict_proba((feats[test_rows] - mu) / sd)
    reference = scores(ref_proba, test_y, classes, positive)
    reference["accuracy_interval"] = clopper_pearson(int((ref_proba.argmax(1) == test_y).sum()),
                                                     len(test_y)).model_dump()
    print(f"frozen-trunk reference (logistic regression): test accuracy {reference['accuracy']:.4f}", flush=True)

    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(tr) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, pct_start=0.1, anneal_strategy="cos",
                                                total_steps=steps_per_epoch * max(args.max_epochs, 1))
    view_names = list(DIHEDRAL_VIEWS) if args.views == "dihedral" else ["identity"]
    gen = np.random.default_rng(args.seed + 3)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, float]] = []
    train_started = time.perf_counter()
    stop_reason = "max_epochs" if args.max_epochs else "reference_only"
    for epoch in range(args.max_epochs):  # --max-epochs 0: the reference only
        net.train()
        t_epoch = time.perf_counter()
        order = gen.permutation(len(tr))
        total = 0.0
        starts = list(range(0, len(order), args.batch))
        if len(starts) > 1 and len(order) - starts[-1] == 1:
            starts.pop()  # a batch of one image: BatchNorm in training mode needs two
        for lo, hi in zip(starts, [*starts[1:], len(order)], strict=True):
            rows = order[lo:hi]
            batch = train_px[rows]
            views = gen.integers(len(view_names), size=len(rows))
            batch = np.stack([DIHEDRAL_VIEWS[view_names[v]](b[None])[0] for b, v in zip(batch, views, strict=True)])
            x = tensor(batch, args.size)
            y = torch.from_numpy(train_y[rows])
            per_row = torch.nn.functional.cross_entropy(net(x), y, weight=class_w, reduction="none")
            loss = (per_row * torch.from_numpy(train_w[rows])).sum() / class_w[y].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(rows)
        vl, va_acc = val_loss(net, val_px, val_y, args.size)
        history.append({"epoch": epoch + 1, "train_loss": total / len(tr), "val_loss": vl, "val_accuracy": va_acc,
                        "seconds": time.perf_counter() - t_epoch})
        print(f"  epoch {epoch + 1}: train loss {total / len(tr):.4f}, val loss {vl:.4f}, val accuracy "
              f"{va_acc:.4f}, {time.perf_counter() - t_epoch:.0f} s", flush=True)
        if best is None or vl < best[0]:
            best = (vl, epoch + 1, copy.deepcopy(net.state_dict()))
        elif epoch + 1 - best[1] >= args.patience:
            stop_reason = "early_stopped"
            break
        if time.perf_counter() - train_started > args.max_minutes * 60:
            stop_reason = "out_of_time"
            break
    train_seconds = time.perf_counter() - train_started
    out: dict[str, Any] = {"frozen_reference": reference}
    for name, views in (("plain", ["identity"]), ("tta", view_names)):
        if best is None:
            break
        net.load_state_dict(best[2])
        proba = predict(net, test_px, args.size, views)
        s = scores(proba, test_y, classes, positive)
        k = int((proba.argmax(1) == test_y).sum())
        s["accuracy_interval"] = clopper_pearson(k, len(test_y)).model_dump()
        out[name] = s
    result = {
        "dataset": args.dataset, "labels": args.labels, "size": args.size, "views": args.views, "seed": args.seed,
        "lr": args.lr, "weight_decay": args.weight_decay, "batch": args.batch, "max_epochs": args.max_epochs,
        "patience": args.patience, "max_minutes": args.max_minutes, "limit": args.limit,
        "load_average_before": load_before, "train_items": len(tr), "auto_labeled": int(auto[tr].sum()),
        "auto_label_accuracy": auto_acc, "val_items": len(va), "test_items": len(test_rows),
        "best_epoch": best[1] if best else None, "stop": stop_reason, "epochs": history,
        "decode_seconds": decode_seconds,
        "train_seconds": train_seconds, "seconds": time.perf_counter() - started, "test": out,
        "cpu": cpu_name(), "threads": args.threads, "machine": platform.machine(),
    }
    print(f"\n| {args.dataset} {args.labels} {args.size} px | test accuracy [95 %] | per-class recall | "
          "at recall 0.95 |\n|---|---|---|---|")
    for name in out:
        s = out[name]
        iv = s["accuracy_interval"]
        rec = ", ".join(f"{c} {r:.3f}" for c, r in s["recall"].items())
        at = f"{s['accuracy_at_recall_95']:.3f}" if "accuracy_at_recall_95" in s else "-"
        print(f"| {name} | {s['accuracy']:.4f} [{iv['low']:.3f}, {iv['high']:.3f}] | "
              f"{rec} | {at} |")
    print(f"training {train_seconds:.0f} s ({stop_reason}, best epoch {result['best_epoch']}), "
          f"{result['seconds']:.0f} s in all")
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "-reference" if best is None else ""
    path = RESULTS / f"finetune-full-{args.dataset}-{args.labels}-{args.size}-{args.views}-s{args.seed}{suffix}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
