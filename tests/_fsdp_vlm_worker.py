"""One FSDP2 training step of a tiny VLM in 2 processes (run by torchrun from test_vlm.py) where rank 0's
batch has images and rank 1's has none: every rank must still run the same sharded blocks (a hang
otherwise), and the gathered gradients must equal one unsharded process's on both batches.

usage: torchrun --nproc_per_node 2 _fsdp_vlm_worker.py
"""
import copy
import sys

import torch

from test_vlm import IMG, make_vlm
from vlkit.connectors import ConnectorConfig, build_connector
from vlkit.models.peft import TuningConfig
from vlkit.train import distributed as dist
from vlkit.train import fsdp


def tiny(style: str, connector: str):
    if style == "inject":  # eP-ALM: class tokens of the 2 last ViT layers into the 2 last decoder layers
        model = make_vlm(style, features="cls_last_n", connector=connector, num_layers=2)
    elif style == "adapter":  # LLaMA-Adapter: text-only rows read the prompts too; gates open
        model = make_vlm(style, features="pooled", connector=connector, adapter_layers=2, adapter_prompts=3)
        for adapter in model.adapter.values():
            torch.nn.init.constant_(adapter.gate, 0.5)
    else:
        model = make_vlm(style=style, connector="resampler" if connector == "resampler" else "avgpool")
    if connector == "instruction_qformer":  # InstructBLIP: the connector reads the prompt
        model.connector = build_connector(ConnectorConfig(kind="qformer", num_tokens=4, width=16, num_heads=2,
                                                          instruction=True), 24, 32)
    model.blank_image_size = 16
    model.apply_tuning(TuningConfig(vision="full", connector="full", decoder="frozen"))  # a shared prefix on rank 0
    return model.train()


def batches(model):
    """(ids, images, labels) of each rank: two questions about two images, then two text-only rows."""
    marks = [IMG] * model.placeholders_per_image()
    with_images = torch.tensor([[5, 6, *marks, 7, 8, 9], [5, 6, *marks, 7, 10, 11]])
    text_only = torch.tensor([[5, 6, 12, 13, 14], [5, 6, 12, 15, 16]])
    out = []
    for ids, images in ((with_images, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))),
                        (text_only, None)):
        labels = ids.clone()
        labels[:, :-2] = -100  # the answer: the last 2 tokens
        out.append((ids, images, labels))
    return out


def check(style: str, connector: str) -> None:
    model = tiny(style, connector)
    reference = copy.deepcopy(model)
    data = batches(model)
    fsdp.shard(model, torch.device("cpu"), 2)
    ids, images, labels = data[dist.rank()]
    model(ids, images=images, labels=labels)["loss"].backward()
    grads = {n: fsdp.full(p.grad) for n, p in model.named_parameters() if p.requires_grad}  # collective
    if dist.is_main():
        loss = sum(reference(i, images=im, labels=lab)["loss"] for i, im, lab in data) / 2
        loss.backward()
        for name, p in reference.named_parameters():
            if p.requires_grad:
                expected = p.grad if p.grad is not None else torch.zeros_like(p)
                torch.testing.assert_close(grads[name], expected, atol=1e-6, rtol=1e-5, msg=f"{style} {connector}: {name}")
        print(f"ok {style} {connector}: {len(grads)} trainable tensors", flush=True)
    dist.barrier()


def main() -> int:
    torch.set_num_threads(1)
    dist.init_distributed()
    for style, connector in (("tokens", "instruction_qformer"), ("cross_attention", "resampler"), ("inject", "linear"),
                             ("adapter", "mlp")):
        check(style, connector)
    dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
