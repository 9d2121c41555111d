"""Make the demo's "pretrained" backbone: a small ViT trained on the digits 'pretrain' split.

The demo stands in for ImageNet-pretrained ViT-B/16: this script trains a small ViT on a split of the
digits that is disjoint from the continual-learning train and test splits, then saves it with
`save_pretrained` so that the demo config loads it through the same local-folder path as real weights.
It runs on one thread, always, so that the backbone is the same on every machine load
(the thread count changes the order of float reductions).

    python launch/pretrain_demo_backbone.py --config configs/demo_digits.json
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sdlora_ds import errors
from sdlora_ds.config import BackboneConfig, load_config
from sdlora_ds.data import ShardIndex, build_loader
from sdlora_ds.model.backbone import build_backbone, cls_features


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo_digits.json", help="the demo run config (data + backbone.path)")
    p.add_argument("--split", default="pretrain", help="index split to pretrain on (disjoint from train/test)")
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
        index = ShardIndex.load(cfg.data.index, clues=[cfg.name])
    except ValueError as e:
        return errors.report_error(e)
    out = cfg.backbone.path
    # Always one thread: CPU reductions change their summation order with the thread count, so a
    # load-dependent count gave another backbone (and other demo numbers) on a busy machine.
    threads = 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    if args.split not in index.splits:
        return errors.report_error(ValueError(f"index {cfg.data.index} has no split {args.split!r} (has "
                                              f"{index.splits}); rebuild it with `python -m shards.digits`"))
    arch = BackboneConfig(source="config", hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                          mlp_size=2 * args.hidden, patch_size=args.patch, image_size=cfg.data.image_size)
    arch.validate("backbone")
    vit = build_backbone(arch)
    for q in vit.parameters():
        q.requires_grad_(True)
    head = torch.nn.Linear(args.hidden, index.num_classes)
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    classes = list(range(index.num_classes))
    start = time.time()
    bar = tqdm(range(args.epochs), desc=f"pretraining demo backbone ({threads} threads)")
    for epoch in bar:
        loader = build_loader(index, cfg.data, split=args.split, class_ids=classes, train=True,
                              batch_size=args.batch, rank=0, world_size=1, seed=args.seed, epoch=epoch)
        correct = total = 0
        for images, labels in loader:
            logits = head(cls_features(vit, images))
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
        bar.set_postfix(loss=f"{loss.item():.3f}", train_acc=f"{100 * correct / total:.1f}%")
    os.makedirs(out, exist_ok=True)
    vit.save_pretrained(out)
    print(f"saved demo backbone to {out} ({time.time() - start:.0f}s, final train accuracy "
          f"{100 * correct / total:.1f}% on the '{args.split}' split)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
