"""A frozen-LM VLM training step with and without the shared prefix (``VLM.shared_prefix``).

    .venv/bin/python benchmarks/bench_shared_prefix.py [--recipe vlm_easyvqa_instructblip] [--threads 2]

With a frozen language model and spliced visual tokens, the tokens every sample shares before its
image (system block, chat header) are computed for one row and not backpropagated. This builds the
recipe's real model (pretrained parts as in training), encodes one training batch of easy-VQA, and
times forward + backward + AdamW on it with ``model.share_prefix`` on and off, interleaved rounds,
the median; the two losses are printed as the check that the step computes the same thing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch

from bench_vit_cpu import time_steps  # same folder: python puts the script's folder on sys.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="vlm_easyvqa_instructblip")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iters", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from vlkit.cli import load_recipe
    from vlkit.data.base import collate
    from vlkit.tasks.vlm import (ConversationEncoder, _wrap, build_datasets, build_text, build_vlm, encode_batch,
                                 pad_right)

    cfg, _ = load_recipe(args.recipe, ["system="])
    train_raw, _ = build_datasets(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tok, chat, eos = build_text(cfg, tmp, train_raw)
    torch.manual_seed(0)
    model = build_vlm(cfg).train()
    encoder = ConversationEncoder(tok, chat, model.image_token_id, model.placeholders_per_image(), eos, cfg.system)
    data = _wrap(train_raw, cfg, True)
    rows, images = encode_batch(collate([data[i] for i in range(args.batch)]), encoder, cfg.max_length)
    ids, mask, labels = pad_right(rows, cfg.max_length, tok.pad_id)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    losses = {}

    def step_fn(share: bool):
        def step():
            model.share_prefix = share
            loss = model(ids, mask, images, labels)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[share] = loss.item()
        return step

    steps = {True: step_fn(True), False: step_fn(False)}
    for s in steps.values():
        time_steps(s, torch.device("cpu"), 1)
    opt.param_groups[0]["lr"] = 0.0  # the timed steps leave the weights as they are: the losses compare
    times = {True: [], False: []}
    for r in range(args.rounds):
        for share in ((True, False) if r % 2 == 0 else (False, True)):
            times[share].append(time_steps(steps[share], torch.device("cpu"), args.iters))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"recipe": args.recipe, "batch": args.batch, "tokens": int(mask.sum()), "seq_len": ids.shape[1],
                      "shared_prefix": model.shared_prefix(ids, mask, labels), "threads": args.threads,
                      "s_per_step_shared": round(med[True], 3), "s_per_step_full": round(med[False], 3),
                      "speedup": round(med[False] / med[True], 3),
                      "loss_shared": losses[True], "loss_full": losses[False]}, indent=1))


if __name__ == "__main__":
    main()
