"""Text generation with a KV-cached :class:`~vlkit.decoders.causal_lm.CausalLM`.

- greedy, or sampling with temperature, top-k and top-p (nucleus, Holtzman et al. 2020), applied
  in that order (as transformers does);
- beam search (``num_beams`` > 1) with a length penalty: finished hypotheses are scored by
  sum log p / length ** length_penalty, the search stops once every batch row has
  ``num_beams`` finished ones;
- batches of prompts of different lengths, left-padded (the model counts positions over real
  tokens), end-of-sequence ids and stop strings (``generate_text`` decodes as it goes);
- speculative decoding (:func:`speculative_generate`): a cheaper draft model proposes tokens, the
  model checks them all in one forward and keeps those it would have chosen itself;
- ``static`` / ``compile``: after the prompt, every step has the same shapes
  (:meth:`CausalLM.decode_step`), so ``torch.compile`` (CUDA graphs with ``mode="reduce-overhead"`` on
  a GPU) runs it without recompiling, and the finished-rows check reads the device every 16 steps only.
"""
from __future__ import annotations

from dataclasses import dataclass
import weakref
from typing import Callable, Optional, Sequence

import torch

from vlkit.decoders.causal_lm import CausalLM
from vlkit.nn.kv_cache import KVCache


@dataclass
class GenerationConfig:
    """Decoding settings; recorded next to every score a VLM reports."""

    max_new_tokens: int = 64
    do_sample: bool = False  # False: greedy (or beam search with num_beams > 1)
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: score = sum log p / length ** length_penalty
    eos_token_ids: tuple[int, ...] = ()  # empty: the model's eos_token_id
    stop_strings: tuple[str, ...] = ()  # generate_text: stop (and cut) at the first of these
    pad_token_id: int = 0  # written after a sequence has ended
    seed: int = 0  # sampling generator seed
    static: bool = False  # fixed-shape decoding steps (no layer hooks: not for Flamingo / eP-ALM / LLaMA-Adapter VLMs)
    compile: bool = False  # torch.compile the fixed-shape step (implies static; CUDA graphs on a GPU)
    speculative: int = 0  # > 0: the same greedy tokens, drafted this many a round by the model's quantized copy (CPU)
    draft_bits: int = 4  # the speculative draft's weights: 4 (int4, groups of 32) or 8 (int8)

    def __post_init__(self):
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search with sampling is not supported: set do_sample=false or num_beams=1")
        if self.temperature <= 0 and self.do_sample:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.speculative < 0:
            raise ValueError(f"speculative must be >= 0 (draft tokens a round), got {self.speculative}")
        if self.draft_bits not in (4, 8):
            raise ValueError(f"draft_bits must be 4 or 8, got {self.draft_bits}")
        if self.speculative and (self.do_sample or self.num_beams > 1 or self.static or self.compile):
            raise ValueError("speculative decoding is greedy with the plain cache: do_sample=false, num_beams=1, "
                             "static=false, compile=false")


def filter_logits(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """logits (B, V) / temperature, then top-k, then top-p; removed entries become -inf."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _eos_ids(model: CausalLM, cfg: GenerationConfig, device) -> torch.Tensor:
    ids = cfg.eos_token_ids or ((model.cfg.eos_token_id,) if model.cfg.eos_token_id is not None else ())
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def generate(model: CausalLM, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             cfg: GenerationConfig = GenerationConfig(),
             stop_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             inputs_embeds: Optional[torch.Tensor] = None, layer_hook=None) -> torch.Tensor:
    """New tokens (B, <= max_new_tokens) for left-padded prompts ``input_ids`` (B, T); after a row's
    end-of-sequence token (kept) or stop (``stop_fn(new tokens so far) -> (B,) bool``) it holds pad.
    A VLM passes the prompt as ``inputs_embeds`` (visual tokens spliced in) and/or a ``layer_hook``."""
    if cfg.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, cfg, inputs_embeds, layer_hook)
    if cfg.speculative:
        if layer_hook is not None:
            raise ValueError("speculative decoding takes no layer hook (Flamingo / eP-ALM / LLaMA-Adapter VLMs): speculative=0")
        return speculative_generate(model, quantized_draft(model, cfg.draft_bits), input_ids, attention_mask, cfg,
                                    cfg.speculative, stop_fn, inputs_embeds)
    B, T = input_ids.shape
    cache = _new_cache(model, B, T + cfg.max_new_tokens, cfg.compile)
    eos = _eos_ids(model, cfg, input_ids.device)
    g = torch.Generator(device=input_ids.device).manual_seed(cfg.seed)
    logits = model(None if inputs_embeds is not None else input_ids, attention_mask, inputs_embeds, cache=cache,
                   logits_to_keep=1, layer_hook=layer_hook)[:, -1]
    step = _static_step(model, cfg, layer_hook, cache)
    emit = _Emitter(B, cfg, eos, stop_fn, input_ids.device, check_every=1 if step is None else 16)
    while cfg.max_new_tokens:
        if cfg.do_sample:
            token = torch.multinomial(filter_logits(logits, cfg).softmax(-1), 1, generator=g)
        else:
            token = logits.argmax(-1, keepdim=True)
        if emit(token):
            break
        if step is None:
            logits = model(emit.last, cache=cache, logits_to_keep=1, layer_hook=layer_hook)[:, -1]
        else:
            logits = step(emit.last)
    return emit.result(input_ids)


@torch.no_grad()
def speculative_generate(model: CausalLM, draft: CausalLM, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None, cfg: GenerationConfig = GenerationConfig(),
                         num_draft: int = 4, stop_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                         inputs_embeds: Optional[torch.Tensor] = None, stats: Optional[dict] = None) -> torch.Tensor:
    """``model``'s greedy tokens, as :func:`generate` returns them, sped up by a cheaper ``draft`` with the
    same vocabulary (speculative decoding, Leviathan et al. 2023, Chen et al. 2023; e.g. the model's own
    int4 or int8 copy, :func:`quantized_draft`). Each round the draft proposes ``num_draft``
    tokens one by one; ``model`` reads them all in ONE forward and keeps the longest prefix it would have
    chosen itself, plus its own next token: 1 to num_draft + 1 tokens for one pass over its weights, the
    cost of decoding a token on a memory-bound CPU. The output is the model's, not the draft's (up to the
    float rounding of a many-token forward against a one-token one). In a batch, rows advance together by
    the fewest accepted tokens (finished rows aside). A prompt given as ``inputs_embeds`` (a VLM's) is read
    by the draft too, so the draft must have the model's width (its own quantized copy). ``stats`` (a
    dict) receives the rounds, drafted and accepted tokens."""
    if cfg.do_sample or cfg.num_beams > 1:
        raise ValueError("speculative decoding is greedy here: do_sample=false, num_beams=1")
    if num_draft < 1:
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")
    B, T = input_ids.shape
    if cfg.max_new_tokens == 0:
        return input_ids.new_zeros(B, 0)
    device = input_ids.device
    cache, dcache = model.new_cache(B, T + cfg.max_new_tokens), draft.new_cache(B, T + cfg.max_new_tokens)
    ids = None if inputs_embeds is not None else input_ids
    token = model(ids, attention_mask, inputs_embeds, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
    draft_embeds = None if inputs_embeds is None else inputs_embeds.to(draft.embed_tokens.weight.dtype)
    first = draft(ids, attention_mask, draft_embeds, cache=dcache, logits_to_keep=1)
    if first.shape[-1] != model.cfg.vocab_size:
        raise ValueError(f"the draft's vocabulary ({first.shape[-1]}) is not the model's ({model.cfg.vocab_size})")
    emit = _Emitter(B, cfg, _eos_ids(model, cfg, device), stop_fn, device)
    pending, rounds, accepted, drafted = token, 0, 0, 0  # pending: tokens the draft has not read yet
    while not emit(token):
        last, before = emit.last, dcache.length
        K = min(num_draft, cfg.max_new_tokens - len(emit.out) - 1)  # no draft past the tokens still to come
        proposals, x = [], pending
        for _ in range(K):
            x = draft(x, cache=dcache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
            proposals.append(x)
        d = torch.cat(proposals, 1) if K else last[:, :0]  # (B, K); the draft has read pending, d_1 .. d_{K-1}
        past = cache.length
        chosen = model(torch.cat([last, d], 1), cache=cache).argmax(-1)  # (B, K + 1): model's pick after each
        agree = (d == chosen[:, :K]).long().cumprod(1).sum(1).masked_fill(emit.done, K)
        n = int(agree.min())
        token = torch.cat([d[:, :n], chosen[:, n:n + 1]], 1)  # (B, n + 1) new tokens
        cache.length = past + 1 + n  # keeps last, d_1 .. d_n: the rest is overwritten next round
        if K:  # (K == 0: the last token, nothing left for the draft)
            dcache.length = before + pending.shape[1] + min(n, K - 1)
            pending = token[:, min(n, K - 1):]
        rounds, accepted, drafted = rounds + 1, accepted + n, drafted + K
    if stats is not None:
        stats.update(rounds=rounds, accepted=accepted, drafted=drafted)
    return emit.result(input_ids)


_DRAFTS: "weakref.WeakKeyDictionary[CausalLM, tuple[tuple, CausalLM]]" = weakref.WeakKeyDictionary()


def quantized_draft(model: CausalLM, bits: int = 4) -> CausalLM:
    """``model``'s copy with int4 (groups of 32) or int8 weights (:mod:`vlkit.decoders.quantize`) and
    bfloat16 everything else (activations, norms, its KV cache: no conversion around every quantized
    matmul, a SmolLM2 draft token 36-42 ms instead of 43-46), the draft of ``GenerationConfig.speculative``:
    made once and kept while the model's weights are unchanged (rebuilt after an optimizer step, a load
    or a move: the parameters' version counters, storage or dtype changed)."""
    import copy

    from vlkit.decoders.quantize import quantize_int4, quantize_int8

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    version = (bits,) + tuple((id(p), p._version, p.data_ptr(), p.dtype) for p in model.parameters()) \
        + tuple(id(m.packed) for m in model.modules() if hasattr(m, "packed"))  # prepacked layers: no parameters
    if model not in _DRAFTS or _DRAFTS[model][0] != version:
        quantize = quantize_int4 if bits == 4 else quantize_int8  # from float32 weights, then the rest in bfloat16
        _DRAFTS[model] = (version, quantize(copy.deepcopy(model)).to(torch.bfloat16))
    return _DRAFTS[model][1]


class _Emitter:
    """Collects new tokens (B, n) column by column: pad after a row's end token or stop, done at
    ``max_new_tokens`` or when every row has ended (looked at every ``check_every`` tokens: reading the
    device back costs a fixed-shape loop its speed). ``__call__`` returns True when generation is over."""

    def __init__(self, B: int, cfg: GenerationConfig, eos: torch.Tensor, stop_fn, device, check_every: int = 1):
        self.cfg, self.eos, self.stop_fn, self.check_every = cfg, eos, stop_fn, check_every
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.out: list[torch.Tensor] = []

    def __call__(self, tokens: torch.Tensor) -> bool:
        for j in range(tokens.shape[1]):
            token = tokens[:, j].masked_fill(self.done, self.cfg.pad_token_id)
            self.out.append(token)
            self.done = self.done | torch.isin(token, self.eos)
            if self.stop_fn is not None:
                self.done = self.done | self.stop_fn(torch.stack(self.out, 1))
            n = len(self.out)
            if n == self.cfg.max_new_tokens or (n % self.check_every == 0 and bool(self.done.all())):
                return True
        return False

    @property
    def last(self) -> torch.Tensor:
        return self.out[-1][:, None]

    def result(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.out, 1) if self.out else input_ids.new_zeros(input_ids.shape[0], 0)


_COMPILED: "weakref.WeakKeyDictionary[CausalLM, Callable]" = weakref.WeakKeyDictionary()
_STATIC_CACHES: "weakref.WeakKeyDictionary[CausalLM, dict]" = weakref.WeakKeyDictionary()


def _new_cache(model: CausalLM, batch: int, needed: int, compiled: bool) -> KVCache:
    """A fresh cache; for a compiled step, the same tensors on every call with this batch size (length
    rounded up to 256), marked as static addresses: a compiled graph (and its CUDA graph, which
    updates them in place) is reused instead of recompiled or re-recorded for every prompt."""
    if not compiled:
        return model.new_cache(batch, needed)
    p = model.embed_tokens.weight
    key = (batch, -(-needed // 256) * 256, p.dtype, p.device)
    pool = _STATIC_CACHES.setdefault(model, {})
    if key not in pool:
        pool[key] = model.new_cache(batch, key[1])
        for t in (pool[key].k, pool[key].v, pool[key].key_mask):
            torch._dynamo.mark_static_address(t)
    pool[key].reset()
    return pool[key]


def _static_step(model: CausalLM, cfg: GenerationConfig, layer_hook, cache) -> Optional[Callable]:
    """``step(token (B, 1)) -> logits (B, V)`` over fixed shapes after the prompt, or None (the plain path)."""
    if not (cfg.static or cfg.compile):
        return None
    if layer_hook is not None:
        raise ValueError("fixed-shape decoding takes no layer hook (Flamingo / eP-ALM / LLaMA-Adapter VLMs): static=false")
    fn = model.decode_step
    if cfg.compile:
        if model not in _COMPILED:
            mode = "reduce-overhead" if cache.k.is_cuda else None  # CUDA graphs on a GPU
            _COMPILED[model] = torch.compile(model.decode_step, mode=mode, fullgraph=True, dynamic=False)
        fn = _COMPILED[model]
    positions = cache.key_mask[:, :cache.length].sum(1, keepdim=True)  # real tokens so far = next position

    def step(token: torch.Tensor) -> torch.Tensor:
        nonlocal positions
        slot = torch.full((1,), cache.length, dtype=torch.long, device=token.device)
        logits = fn(token, positions, slot, cache)
        cache.advance(1)
        positions = positions + 1
        return logits
    return step


@torch.no_grad()
def beam_search(model: CausalLM, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                cfg: GenerationConfig, inputs_embeds: Optional[torch.Tensor] = None, layer_hook=None) -> torch.Tensor:
    """The best beam per row (B, <= max_new_tokens), padded with ``pad_token_id``. A ``layer_hook``
    must accept the B * num_beams rows (each row's beams are consecutive)."""
    B, T = input_ids.shape
    K, device = cfg.num_beams, input_ids.device
    eos = set(_eos_ids(model, cfg, device).tolist())
    cache = model.new_cache(B * K, T + cfg.max_new_tokens)
    mask = attention_mask.repeat_interleave(K, 0) if attention_mask is not None else None
    embeds = inputs_embeds.repeat_interleave(K, 0) if inputs_embeds is not None else None
    ids = None if embeds is not None else input_ids.repeat_interleave(K, 0)
    logprobs = model(ids, mask, embeds, cache=cache, logits_to_keep=1,
                     layer_hook=layer_hook)[:, -1].log_softmax(-1)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    seqs = input_ids.new_zeros(B * K, 0)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    V = logprobs.shape[-1]
    for step in range(cfg.max_new_tokens):
        cand = (scores.view(B * K, 1) + logprobs).view(B, K * V)
        top_scores, top_ids = cand.topk(min(2 * K, K * V), dim=1)
        parents, tokens, new_scores = _select_beams(top_scores, top_ids, V, K, eos, finished, seqs, step, cfg)
        if all(len(f) >= K for f in finished) or step == cfg.max_new_tokens - 1:
            break
        flat = torch.tensor(parents, device=device)
        cache.reorder(flat)
        seqs = torch.cat([seqs[flat], torch.tensor(tokens, device=device)[:, None]], 1)
        scores = torch.tensor(new_scores, device=device).view(B, K)
        logprobs = model(seqs[:, -1:], cache=cache, logits_to_keep=1, layer_hook=layer_hook)[:, -1].log_softmax(-1)
    return _best_beams(finished, seqs, scores, cfg, B, K, device)


def _select_beams(top_scores, top_ids, V, K, eos, finished, seqs, step, cfg):
    """Per row, walk the 2K best extensions: an end token finishes a hypothesis, others fill the K
    live beams. Returns (parent rows, tokens, scores) of the B*K live beams."""
    parents, tokens, new_scores = [], [], []
    for b in range(top_scores.shape[0]):
        live = 0
        for s, idx in zip(top_scores[b].tolist(), top_ids[b].tolist()):
            beam, token = divmod(idx, V)
            row = b * K + beam
            if token in eos or step == cfg.max_new_tokens - 1:
                if len(finished[b]) < K and s > float("-inf"):
                    hyp = seqs[row].tolist() + [token]
                    finished[b].append((s / len(hyp) ** cfg.length_penalty, hyp))
                if token in eos:
                    continue
            if live < K:
                parents.append(row)
                tokens.append(token)
                new_scores.append(s)
                live += 1
        while live < K:  # fewer candidates than beams (tiny vocabularies): pad with dead beams
            parents.append(b * K)
            tokens.append(cfg.pad_token_id)
            new_scores.append(float("-inf"))
            live += 1
    return parents, tokens, new_scores


def _best_beams(finished, seqs, scores, cfg, B, K, device) -> torch.Tensor:
    best = []
    for b in range(B):
        hyps = list(finished[b])
        if not hyps:  # nothing finished (cannot happen after max_new_tokens, kept for safety)
            hyps = [(float(scores[b, k]) / max(1, seqs.shape[1]) ** cfg.length_penalty, seqs[b * K + k].tolist())
                    for k in range(K)]
        best.append(max(hyps, key=lambda h: h[0])[1])
    width = max(len(h) for h in best)
    out = torch.full((B, width), cfg.pad_token_id, dtype=torch.long, device=device)
    for b, h in enumerate(best):
        out[b, :len(h)] = torch.tensor(h, dtype=torch.long)
    return out


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids (B, T) left-padded, attention_mask (B, T))."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask
