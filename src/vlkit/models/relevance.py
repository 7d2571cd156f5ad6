"""Where in the image a VLM's answer comes from: occlusion (Zeiler & Fergus 2014, §4.2) and Grad-CAM
(Selvaraju et al. 2017, eqs. 1-2). Both score the answer's log-likelihood under the model (teacher
forcing: the prompt with its image, then the answer tokens), so they work for every connector and
injection style vlkit builds (spliced tokens, Flamingo cross-attention, eP-ALM injection, LLaMA-Adapter
prompts).

- ``occlusion`` (the default of ``vlkit predict --attention``): each cell of a ``grid x grid`` partition
  of the image is replaced by the image's mean colour in turn; a cell's relevance is how much the answer's
  log-likelihood drops. Faithful by construction: batched forwards (16 images each) of ``grid^2 + 1`` images.
- ``grad_cam``: one backward pass. The gradient of the log-likelihood with respect to activations ``A``:
  the visual features the connector reads when they are spatial (``features=last``/``last_n``), else
  inside the tower (ViT: the tokens entering the first block whose output the features read, the layer
  pytorch-grad-cam targets for ViTs; convnet: the output of the stage read). Per channel
  ``alpha_c = mean_n dlogp/dA_nc``; the map is ``ReLU(sum_c alpha_c A_nc)`` on the patch grid.

Both maps are divided by their maximum. They can disagree: on easy-VQA, with a frozen EfficientNet whose
4 x 4 map cells each see most of the 64 px image, the occlusion peak falls on the shape asked about 3 times
as often as Grad-CAM's (``experiments/vlm_pointing.py``; README).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from vlkit.models.vlm import IGNORE_INDEX, VLM


def _target_module(model: VLM, layer: str = "auto") -> tuple[nn.Module, str]:
    """(module whose activation is explained, "pre" for its input / "post" for its output).

    ``layer``: ``features`` = the visual features the connector reads (spatial for ``features=last`` /
    ``last_n``), ``block`` = inside the tower (see the module doc), ``auto`` = ``features`` when spatial."""
    feats = model.features
    enc, cfg = feats.encoder, feats.cfg
    if layer == "features" or (layer == "auto" and cfg.features in ("last", "last_n")):
        if cfg.features not in ("last", "last_n"):
            raise ValueError(f"features={cfg.features!r} are not spatial: explain layer='block'")
        return feats, "post"
    deep = cfg.features in ("last_n", "cls_last_n")
    if feats.is_vit:
        n = len(enc.blocks)
        return enc.blocks[max(0, n - cfg.num_layers) if deep else n - 1], "pre"
    stages = getattr(enc, "convnet", enc).blocks  # through the input adapter of a pretrained convnet
    return stages[len(stages) - cfg.num_layers] if cfg.features == "last_n" else stages[-1], "post"


@contextlib.contextmanager
def capture_activation(model: VLM, layer: str = "auto") -> Iterator[dict]:
    """While active, the vision tower's explained activation is replaced by a leaf tensor that requires
    grad, kept in the yielded dict under ``"A"`` (the graph before it is cut: nothing upstream is needed)."""
    module, where = _target_module(model, layer)
    store: dict = {}
    enc = model.features.encoder
    checkpointing = getattr(enc, "grad_checkpointing", False)
    if checkpointing:  # a recomputed forward would replace the captured leaf
        enc.grad_checkpointing = False

    def leaf(t: torch.Tensor) -> torch.Tensor:
        store["A"] = t.detach().requires_grad_(True)
        return store["A"]

    if where == "pre":
        handle = module.register_forward_pre_hook(lambda m, args: (leaf(args[0]), *args[1:]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: leaf(out))
    try:
        yield store
    finally:
        handle.remove()
        if checkpointing:
            enc.grad_checkpointing = True


def answer_gradient(model: VLM, input_ids: torch.Tensor, images: torch.Tensor, answer: list[int],
                    layer: str = "auto") -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, dlogp/dA, logp): the explained activation of the one image, the gradient of the answer's
    log-likelihood ``logp`` (summed over its tokens) with respect to it. ``input_ids`` (1, T): the prompt
    with the image's placeholders; ``images`` (1, C, H, W); ``answer``: the answer's token ids (no end token)."""
    _check(input_ids, images, answer)
    tail = torch.tensor([answer], dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([input_ids, tail], 1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, input_ids.shape[1]:] = tail
    with capture_activation(model, layer) as store, torch.enable_grad():
        loss = model(ids, None, images, labels)["loss"]  # mean over the answer tokens
        logp = -loss * len(answer)
        (grad,) = torch.autograd.grad(logp, store["A"])
    return store["A"].detach(), grad, float(logp.detach())


def grad_cam(acts: torch.Tensor, grad: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM map (gh, gw) in [0, 1] from one image's activation and gradient: tokens (1, T, C) whose
    last gh * gw are the patches, or a feature map (1, C, gh, gw)."""
    if acts.ndim == 3:
        n = grid[0] * grid[1]
        a, g = acts[0, -n:], grad[0, -n:]  # (N, C)
        cam = (a * g.mean(0)).sum(-1).reshape(grid)
    else:
        a, g = acts[0], grad[0]  # (C, h, w)
        cam = (a * g.mean((1, 2))[:, None, None]).sum(0)
    cam = cam.float().clamp(min=0)
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def _check(input_ids: torch.Tensor, images: torch.Tensor, answer: list[int]) -> None:
    if input_ids.shape[0] != 1 or images.shape[0] != 1:
        raise ValueError(f"one prompt with one image, got {input_ids.shape[0]} prompts and {images.shape[0]} images")
    if not answer:
        raise ValueError("the answer is empty: nothing to explain")


@torch.no_grad()
def answer_logprobs(model: VLM, input_ids: torch.Tensor, images: torch.Tensor, answer: list[int],
                    batch_size: int = 16) -> torch.Tensor:
    """The log-likelihood of ``answer`` after the prompt ``input_ids`` (1, T) with each of ``images``
    (M, C, H, W) in turn -> (M,): the vocabulary projection only at the answer's positions. The images are
    encoded with the prompt alone, as in generation and training: an instruction-aware connector (InstructBLIP's
    Q-Former) never reads the answer it is scored on."""
    tail = torch.tensor([answer], dtype=input_ids.dtype, device=input_ids.device)
    ids = torch.cat([input_ids, tail], 1)
    n = len(answer)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        visual = model.encode_images(chunk, input_ids.expand(len(chunk), -1))
        logits = model(ids.expand(len(chunk), -1), None, logits_to_keep=n + 1, visual=visual)["logits"][:, :-1]
        out.append(logits.log_softmax(-1).gather(-1, tail.expand(len(chunk), -1)[..., None])[..., 0].sum(1))
    return torch.cat(out)


def occlusion_relevance(model: VLM, input_ids: torch.Tensor, images: torch.Tensor, answer: list[int],
                        grid: int = 8, fill: Optional[torch.Tensor] = None, signed: bool = False
                        ) -> tuple[torch.Tensor, float]:
    """(map (grid, grid), logp): the drop of the answer's log-likelihood when each cell (row-major) is
    painted ``fill`` (per channel, default the image's mean colour), ReLU and / max unless ``signed``."""
    _check(input_ids, images, answer)
    image = images[0]
    C, H, W = image.shape
    if not 1 <= grid <= min(H, W):
        raise ValueError(f"occlusion grid {grid} must be in 1..{min(H, W)} for a {H}x{W} image")
    paint = (image.mean((1, 2)) if fill is None else fill.to(image)).reshape(C, 1, 1)
    copies = [image]
    for gy in range(grid):
        for gx in range(grid):
            occluded = image.clone()
            occluded[:, gy * H // grid:(gy + 1) * H // grid, gx * W // grid:(gx + 1) * W // grid] = paint
            copies.append(occluded)
    logp = answer_logprobs(model, input_ids, torch.stack(copies), answer)
    drop = (logp[0] - logp[1:]).reshape(grid, grid).float()
    if signed:
        return drop, float(logp[0])
    drop = drop.clamp(min=0)
    peak = drop.max()
    return (drop / peak if peak > 0 else drop), float(logp[0])


def answer_relevance(model: VLM, input_ids: torch.Tensor, images: torch.Tensor, answer: list[int],
                     method: str = "occlusion", layer: str = "auto", grid: int = 8) -> tuple[torch.Tensor, float]:
    """(map in [0, 1] of where ``answer`` comes from in the one image, its log-likelihood): ``method``
    ``occlusion`` (a ``grid x grid`` map) or ``grad_cam`` (on the patch / feature-map grid, ``layer`` as
    :func:`capture_activation` takes it)."""
    if method == "occlusion":
        return occlusion_relevance(model, input_ids, images, answer, grid)
    if method != "grad_cam":
        raise ValueError(f"relevance method must be 'occlusion' or 'grad_cam', got {method!r}")
    acts, grad, logp = answer_gradient(model, input_ids, images, answer, layer)
    if acts.ndim == 3 and not model.features.is_vit:  # a convnet's map read as tokens (features=last/last_n)
        grid = _convnet_grid(model, images)
    elif acts.ndim == 3:
        grid = model.features.encoder.patch_embed.grid_size(tuple(images.shape[-2:]))
    else:
        grid = tuple(acts.shape[-2:])
    return grad_cam(acts, grad, grid), logp


def _convnet_grid(model: VLM, images: torch.Tensor) -> tuple[int, int]:
    with torch.no_grad():
        return tuple(model.features.encoder.forward_features(images).shape[-2:])
